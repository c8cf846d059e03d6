"""DMARC (RFC 7489): is the RFC5322.From domain authenticated by an aligned SPF or DKIM identity,
and if not, what does the domain ask us to do?

Steps, per From domain:
1. Policy discovery (6.6.3): TXT at _dmarc.<From domain>; records not starting with v=DMARC1 are
   discarded; none left -> the same at _dmarc.<organizational domain>; several left -> no DMARC.
   A DNS failure on the way is a temperror, never "none".
2. Alignment (3.1): DKIM d= of each passing signature, and the SPF-authenticated identity (the
   MAIL FROM domain, or the HELO name for the null sender, as SPFOutcome.domain says), compared
   with the From domain: relaxed = same organizational domain (Public Suffix List, private section
   included, see trustmilter.psl), strict = the same name.
3. Policy (6.6.4, 6.6.3): p for the From domain, sp when the record came from the organizational
   domain on behalf of a subdomain; pct: a message not selected gets the next weaker policy.

The pct draw is deterministic per message: sha256(Message-ID, policy domain) mod 100. ``scan`` and
the milter then agree, and re-scanning a message gives the same verdict. A sender could pick a
Message-ID that is never selected, but that only earns the next weaker policy, which a domain
publishing pct<100 has already accepted for some of its mail.

From handling (6.6.1): no From, or a From that is not a valid mailbox list, or several From
fields/domains is never silently passed. Every domain found is evaluated (for a malformed field
also the ones hidden in the garbage, so junk cannot shield a p=reject domain); if one fails, the
strictest applied policy of the failing ones is enforced; otherwise the result is temperror (if
one was) or permerror, with DMARC_NO_FROM / DMARC_MULTI_FROM scored from config. A pass for one
domain of such a message is reported as permerror: naive Authentication-Results readers look for
"dmarc=pass" anywhere.
"""
from __future__ import annotations

import enum
import hashlib
import re
import email.policy
from dataclasses import dataclass, replace
from email.errors import InvalidHeaderDefect
from typing import TYPE_CHECKING, Any

import idna
from authres.dmarc import DMARCAuthenticationResult

from trustmilter import psl
from trustmilter.checks.base import CheckContext, CheckResult, ForcedAction
from trustmilter.checks.outcomes import ARCOutcome, DKIMOutcome, DMARCOutcome, SPFOutcome
from trustmilter.errors import ConfigError, DNSPermError, DNSTempError, TrustmilterError
from trustmilter.types import Action, AuthStatus, Symbol

if TYPE_CHECKING:
    from trustmilter.pipeline import Engine

NAME = "dmarc"
DEPENDS: tuple[str, ...] = ("spf", "dkim", "arc")

MAX_FROM_DOMAINS = 10   # distinct author domains evaluated (two TXT lookups each at most)


# ----------------------------------------------------------------------------------------------
# The record (RFC 7489 6.3, 6.4)
# ----------------------------------------------------------------------------------------------
class Policy(str, enum.Enum):
    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"

    def weaker(self) -> "Policy":
        """RFC 7489 6.6.4: the next less strict policy, for messages not selected by pct."""
        return {Policy.REJECT: Policy.QUARANTINE, Policy.QUARANTINE: Policy.NONE,
                Policy.NONE: Policy.NONE}[self]

    @property
    def rank(self) -> int:
        return {Policy.NONE: 0, Policy.QUARANTINE: 1, Policy.REJECT: 2}[self]


class Alignment(str, enum.Enum):
    RELAXED = "r"
    STRICT = "s"


class DMARCRecordError(TrustmilterError, ValueError):
    """A TXT string that is not a usable DMARC record."""


class NotDMARCRecord(DMARCRecordError):
    """Does not start with v=DMARC1: discarded during discovery (6.6.3 step 3), not an error of
    the domain's."""


class InvalidPolicyError(DMARCRecordError):
    """p missing/invalid (or sp invalid) with no valid rua to fall back on (6.6.3): permerror."""


class TagSyntaxError(DMARCRecordError):
    """A tag-spec without '=' or a bad tag name (strict parsing only)."""


class TagValueError(DMARCRecordError):
    """A known tag with a value outside its grammar (strict parsing only)."""


class DuplicateTagError(DMARCRecordError):
    """The same tag twice (strict parsing only)."""


@dataclass(frozen=True)
class DMARCRecord:
    p: Policy
    sp: Policy | None = None
    pct: int = 100
    adkim: Alignment = Alignment.RELAXED
    aspf: Alignment = Alignment.RELAXED
    fo: tuple[str, ...] = ("0",)
    rf: tuple[str, ...] = ("afrf",)
    ri: int = 86400
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    # Lenient parsing only: what was discarded in favour of a default (RFC 7489 6.3), and
    # whether p was invalid/missing and replaced by p=none because rua was valid (6.6.3).
    warnings: tuple[str, ...] = ()
    p_defaulted: bool = False

    @property
    def subdomain_policy(self) -> Policy:
        return self.sp if self.sp is not None else self.p


_VERSION = re.compile(r"^[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|$)")
_TAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:[^\s,!;]+(?:![0-9]+[kmgtKMGT]?)?$")
_KEYWORD = re.compile(r"^[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*$")
_POLICIES = {p.value: p for p in Policy}
_ALIGNMENTS = {a.value: a for a in Alignment}


def is_dmarc_record(text: str | bytes) -> bool:
    """True when ``text`` starts with the v=DMARC1 tag (6.6.3 step 3)."""
    return bool(_VERSION.match(_text(text).strip(" \t")))


def parse_record(text: str | bytes, *, strict: bool = True) -> DMARCRecord:
    """Parse a DMARC TXT record.

    ``strict=True`` (tools, tests): any deviation from the RFC 7489 6.4 grammar in a known tag
    raises a ``DMARCRecordError`` subclass; unknown tags are ignored as the RFC demands.
    ``strict=False`` (evaluation): RFC 7489 6.3/6.6.3 leniency: a bad optional tag falls back to
    its default (listed in ``warnings``); an invalid or missing p (or invalid sp) becomes p=none
    when rua holds a valid URI, else ``InvalidPolicyError``. Anything not starting with v=DMARC1
    raises ``NotDMARCRecord`` in both modes.
    """
    raw = _text(text)
    body = raw if strict else raw.strip(" \t")
    if not _VERSION.match(body):
        raise NotDMARCRecord(f"does not start with v=DMARC1: {raw[:40]!r}")
    specs = body.split(";")
    tags: dict[str, str] = {}
    warnings: list[str] = []
    duplicated: set[str] = set()
    for position, spec in enumerate(specs):
        spec = spec.strip(" \t")
        if not spec:
            continue                      # "v=DMARC1;" and ";;" are allowed separators
        name, eq, value = spec.partition("=")
        name, value = name.strip(" \t").lower(), value.strip(" \t")
        if not eq or not _TAG_NAME.match(name):
            if strict:
                raise TagSyntaxError(f"malformed tag-spec {spec[:40]!r}")
            warnings.append(f"ignored malformed tag-spec {spec[:40]!r}")
            continue
        if position > 0 and name == "v":
            if strict:
                raise TagSyntaxError("v must be the first tag only")
            warnings.append("ignored a second v tag")
            continue
        if name in tags:
            if strict:
                raise DuplicateTagError(f"tag {name} appears twice")
            duplicated.add(name)
            warnings.append(f"tag {name} appears twice; the first is used")
            continue
        tags[name] = value

    fields: dict[str, Any] = {}
    rua = _uris(tags.get("rua"), "rua", strict, warnings)
    ruf = _uris(tags.get("ruf"), "ruf", strict, warnings)
    fields["rua"], fields["ruf"] = rua, ruf

    policy_problem = None
    p_text = tags.get("p")
    if p_text is None:
        policy_problem = "p tag missing"
    elif p_text.lower() not in _POLICIES:
        policy_problem = f"invalid p={p_text[:20]!r}"
    elif "p" in duplicated:
        policy_problem = "p tag appears twice"
    sp_text = tags.get("sp")
    if sp_text is not None and sp_text.lower() not in _POLICIES:
        policy_problem = policy_problem or f"invalid sp={sp_text[:20]!r}"
    elif "sp" in duplicated:
        policy_problem = policy_problem or "sp tag appears twice"
    if policy_problem:
        if strict:
            raise InvalidPolicyError(policy_problem)
        if not rua:
            raise InvalidPolicyError(f"{policy_problem} and no valid rua (RFC 7489 6.6.3)")
        # 6.6.3: act as if "v=DMARC1; p=none" was retrieved (reports still flow to rua).
        warnings.append(f"{policy_problem}: treated as p=none because rua is valid")
        fields["p"], fields["sp"], fields["p_defaulted"] = Policy.NONE, None, True
    else:
        fields["p"] = _POLICIES[str(p_text).lower()]
        fields["sp"] = _POLICIES[sp_text.lower()] if sp_text is not None else None

    def bad(tag: str, why: str) -> None:
        if strict:
            raise TagValueError(f"{tag}: {why}")
        warnings.append(f"{tag}: {why}; default used")

    if "pct" in tags:
        value = tags["pct"]
        if re.fullmatch(r"[0-9]{1,3}", value) and int(value) <= 100:
            fields["pct"] = int(value)
        else:
            bad("pct", f"{value[:20]!r} is not 0-100")
    for tag in ("adkim", "aspf"):
        if tag in tags:
            value = tags[tag].lower()
            if value in _ALIGNMENTS:
                fields[tag] = _ALIGNMENTS[value]
            else:
                bad(tag, f"{tags[tag][:20]!r} is not r or s")
    if "fo" in tags:
        options = tuple(o.strip(" \t").lower() for o in tags["fo"].split(":"))
        if options and all(o in ("0", "1", "d", "s") for o in options):
            fields["fo"] = options
        else:
            bad("fo", f"{tags['fo'][:20]!r} is not a list of 0, 1, d, s")
    if "rf" in tags:
        formats = tuple(f.strip(" \t").lower() for f in tags["rf"].split(":"))
        if formats and all(_KEYWORD.match(f) for f in formats):
            fields["rf"] = formats
        else:
            bad("rf", f"{tags['rf'][:20]!r} is not a list of keywords")
    if "ri" in tags:
        value = tags["ri"]
        if re.fullmatch(r"[0-9]{1,10}", value) and int(value) < 2**32:
            fields["ri"] = int(value)
        else:
            bad("ri", f"{value[:20]!r} is not a 32-bit number")
    return DMARCRecord(warnings=tuple(warnings), **fields)


def _uris(value: str | None, tag: str, strict: bool, warnings: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    found = []
    for item in value.split(","):
        item = item.strip(" \t")
        if _URI.match(item):
            found.append(item)
        elif strict:
            raise TagValueError(f"{tag}: {item[:40]!r} is not a URI")
        else:
            warnings.append(f"{tag}: ignored {item[:40]!r} (not a URI)")
    return tuple(found)


def _text(text: str | bytes) -> str:
    if isinstance(text, bytes):
        return text.decode("utf-8", "replace")
    return text


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
_ACTION_CHOICES = {
    "reject_action": {"reject": Action.REJECT, "quarantine": Action.QUARANTINE,
                      "junk": Action.JUNK, "inbox": None},
    "quarantine_action": {"quarantine": Action.QUARANTINE, "junk": Action.JUNK, "inbox": None},
    "arc_override_action": {"quarantine": Action.QUARANTINE, "junk": Action.JUNK, "inbox": None},
    "temperror_action": {"tempfail": Action.TEMPFAIL, "accept": None},
}


@dataclass(frozen=True)
class Settings:
    reject_action: Action | None
    quarantine_action: Action | None
    arc_override_action: Action | None
    temperror_action: Action | None


def settings_from(section: dict[str, Any]) -> Settings:
    """Validated actions. A wrong value is a ConfigError (the pipeline disables the check and
    logs it: a typo must not silently turn p=reject into nothing)."""
    chosen: dict[str, Action | None] = {}
    for key, choices in _ACTION_CHOICES.items():
        value = str(section.get(key, "")).strip().lower()
        if value not in choices:
            raise ConfigError(f"must be one of {', '.join(sorted(choices))}, not {value!r}",
                              key=f"dmarc.{key}")
        chosen[key] = choices[value]
    return Settings(**chosen)


def setup(engine: "Engine") -> None:
    """Validate the actions and load the Public Suffix List once for this engine."""
    engine.cached("dmarc.settings", lambda: settings_from(engine.config.section(NAME)))
    psl.for_engine(engine)


# ----------------------------------------------------------------------------------------------
# Author domains (RFC 7489 6.6.1)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuthorDomains:
    header_count: int
    domains: tuple[str, ...]          # distinct, normalized (lower-case A-labels), in order
    malformed: bool                   # some From content is not a valid mailbox list
    problems: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        """One From field with one valid domain: the ordinary case DMARC is defined for."""
        return self.header_count == 1 and len(self.domains) == 1 and not self.malformed


# Only invalid syntax counts: obsolete forms ("John Q. Public", routes) are common and harmless,
# and 8-bit display names do not touch the domain (a bad domain fails normalize_domain anyway).
_MALFORMED_DEFECTS = (InvalidHeaderDefect,)
_HIDDEN_DOMAIN = re.compile(r"@[ \t]*([^\s<>()\[\]@,;:\"\\]+)")
# "local@domain", "<local@domain>", "Display Name <local@domain>", "\"Display Name\" <...>" with
# atoms of letters and digits only: RFC 5322 mailboxes the stdlib parses without any defect.
_SIMPLE_LOCAL = r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*"
_SIMPLE_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
_SIMPLE_MAILBOX = re.compile(
    rf"(?:(?:[A-Za-z0-9]+(?: [A-Za-z0-9]+)*|\"[A-Za-z0-9]+(?: [A-Za-z0-9]+)*\") ?)?"
    rf"<{_SIMPLE_LOCAL}@(?P<angle>{_SIMPLE_DOMAIN})>"
    rf"|{_SIMPLE_LOCAL}@(?P<bare>{_SIMPLE_DOMAIN})")
_LDH_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def normalize_domain(domain: str) -> str | None:
    """Lower-case A-label form of a host name, or None when it is not one (address literals,
    empty labels, bad IDN). Underscores are allowed: they occur in real names and in DNS."""
    name = domain.strip().rstrip(".")
    if not name or name.startswith("[") or len(name) > 253:
        return None
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
    name = name.lower()
    labels = name.split(".")
    if not all(_LDH_LABEL.match(label) for label in labels):
        return None
    return name


def author_domains(from_values: list[str]) -> AuthorDomains:
    """The From domains of a message, parsed with the RFC 5322 address parser of the standard
    library (before any RFC 2047 decoding: an encoded word may hide an '@' or a comma)."""
    domains: list[str] = []
    problems: list[str] = []
    malformed = False

    def add(candidate: str) -> bool:
        normalized = normalize_domain(candidate)
        if normalized is None:
            return False
        if normalized not in domains:
            domains.append(normalized)
        return True

    for value in from_values:
        field_ok = True
        simple = _SIMPLE_MAILBOX.fullmatch(value)
        if simple is not None:
            # The common plain form: the stdlib parser (slow) would find this one domain and no
            # defect; a unit test holds the two equal.
            address_domains = [simple.group("angle") or simple.group("bare")]
        else:
            try:
                header = email.policy.default.header_factory("From", value)
                address_domains = [address.domain for address in header.addresses]
                defects = list(header.defects)
            except Exception:  # noqa: BLE001 - the stdlib parser raises several types on hostile input
                address_domains, defects, field_ok = [], [], False
            if any(isinstance(d, _MALFORMED_DEFECTS) for d in defects):
                field_ok = False
            if not address_domains and value.strip() and not re.fullmatch(r"[^:]*:\s*;",
                                                                           value.strip()):
                field_ok = False
        for domain in address_domains:
            if not domain or not add(domain):
                field_ok = False
        if not field_ok:
            malformed = True
            problems.append(f"malformed From: {value[:60]!r}")
            # Domains hidden in the garbage are evaluated too: junk must not shield a domain.
            for match in _HIDDEN_DOMAIN.finditer(value):
                add(match.group(1))
    return AuthorDomains(len(from_values), tuple(domains), malformed, tuple(problems))


# ----------------------------------------------------------------------------------------------
# Policy discovery (RFC 7489 6.6.3)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Discovery:
    status: AuthStatus                 # pass = a record was found; none; temperror; permerror
    record: DMARCRecord | None = None
    policy_domain: str | None = None
    reason: str = ""
    final: bool = False                # several records: discovery ends here, no fallback


def discover(ctx: CheckContext, from_domain: str, org_domain: str) -> Discovery:
    found = _lookup(ctx, from_domain)
    if found.status is AuthStatus.NONE and not found.final and org_domain != from_domain:
        found = _lookup(ctx, org_domain)
    return found


def _lookup(ctx: CheckContext, domain: str) -> Discovery:
    name = f"_dmarc.{domain}"
    try:
        texts = ctx.dns.txt(name)
    except DNSTempError as exc:
        return Discovery(AuthStatus.TEMPERROR, reason=f"DNS failed: {exc}")
    except DNSPermError as exc:
        return Discovery(AuthStatus.PERMERROR, reason=f"bad name: {exc}")
    candidates = [t for t in texts if is_dmarc_record(t)]
    if not candidates:
        return Discovery(AuthStatus.NONE, reason=f"no DMARC record at {name}")
    if len(candidates) > 1:
        # 6.6.3 step 5: several records end discovery; no fallback to the organizational domain.
        return Discovery(AuthStatus.NONE, policy_domain=domain, final=True,
                         reason=f"{len(candidates)} DMARC records at {name}: none applied")
    try:
        record = parse_record(candidates[0], strict=False)
    except DMARCRecordError as exc:
        return Discovery(AuthStatus.PERMERROR, policy_domain=domain,
                         reason=f"bad DMARC record at {name}: {exc}")
    return Discovery(AuthStatus.PASS, record, domain)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identities:
    """What SPF and DKIM established, as DMARC needs it."""

    spf_status: AuthStatus | None              # None: SPF not run (disabled) -> no pass
    spf_domain: str | None
    spf_unknown: bool                           # the SPF check crashed: result unknown
    dkim: tuple[tuple[AuthStatus, str], ...]   # (status, normalized d=)
    dkim_unknown_domains: tuple[str, ...]      # d= of signatures a crashed DKIM check left unjudged


_DKIM_D_TAG = re.compile(r"(?:^|;)\s*d\s*=\s*([^;\s]+)", re.IGNORECASE)


def gather_identities(ctx: CheckContext) -> Identities:
    spf_status = spf_domain = None
    spf_unknown = False
    spf_result = ctx.results.get("spf")
    spf = spf_result.outcome if spf_result is not None else None
    if isinstance(spf, SPFOutcome):
        spf_status = spf.mailfrom
        spf_domain = normalize_domain(spf.domain) if spf.domain else None
    elif spf_result is not None and not _disabled(ctx, "spf"):
        # The check ran and produced nothing usable (an internal error): we cannot say SPF did
        # not pass. Judge by the envelope's domain, whose result is unknown.
        spf_unknown = True
        sender = ctx.envelope.mail_from
        identity = sender.rsplit("@", 1)[1] if "@" in sender else (ctx.envelope.helo or "")
        spf_domain = normalize_domain(identity) if identity else None

    dkim_sigs: list[tuple[AuthStatus, str]] = []
    unknown: list[str] = []
    dkim_result = ctx.results.get("dkim")
    dkim = dkim_result.outcome if dkim_result is not None else None
    if isinstance(dkim, DKIMOutcome):
        for sig in dkim.signatures:
            domain = normalize_domain(sig.domain) if sig.domain else None
            if domain:
                dkim_sigs.append((sig.status, domain))
    elif dkim_result is not None and not _disabled(ctx, "dkim"):
        for value in ctx.message.get_all("DKIM-Signature"):
            match = _DKIM_D_TAG.search(value)
            domain = normalize_domain(match.group(1)) if match else None
            if domain:
                unknown.append(domain)
    return Identities(spf_status, spf_domain, spf_unknown, tuple(dkim_sigs), tuple(unknown))


def _disabled(ctx: CheckContext, name: str) -> bool:
    return name in getattr(ctx.engine, "disabled", {})


@dataclass(frozen=True)
class DomainResult:
    from_domain: str
    status: AuthStatus
    policy_domain: str | None = None
    policy: Policy | None = None          # p or sp that applies
    applied: Policy | None = None         # after pct
    spf_aligned: bool = False
    dkim_aligned: bool = False
    record: DMARCRecord | None = None
    reason: str = ""
    temp_matters: bool = True             # for temperror: could the policy still be enforced?


def aligned(identity: str, from_domain: str, mode: Alignment, orgs: psl.OrgDomains) -> bool:
    if mode is Alignment.STRICT:
        return identity == from_domain
    return orgs.organizational_domain(identity) == orgs.organizational_domain(from_domain)


def evaluate_domain(ctx: CheckContext, from_domain: str, ids: Identities,
                    orgs: psl.OrgDomains) -> DomainResult:
    org_domain = orgs.organizational_domain(from_domain)
    found = discover(ctx, from_domain, org_domain)
    if found.status is AuthStatus.TEMPERROR:
        # An identity equal to the From domain passes under any record (relaxed or strict): then
        # whatever the record says, nothing would be enforced and tempfailing is pointless.
        strictly = (ids.spf_status is AuthStatus.PASS and ids.spf_domain == from_domain) or any(
            s is AuthStatus.PASS and d == from_domain for s, d in ids.dkim)
        return DomainResult(from_domain, AuthStatus.TEMPERROR, reason=found.reason,
                            temp_matters=not strictly)
    if found.status is not AuthStatus.PASS or found.record is None:
        return DomainResult(from_domain, found.status, found.policy_domain, reason=found.reason)

    record = found.record
    policy_domain = found.policy_domain or from_domain
    spf_ok = (ids.spf_status is AuthStatus.PASS and ids.spf_domain is not None
              and aligned(ids.spf_domain, from_domain, record.aspf, orgs))
    dkim_ok = any(s is AuthStatus.PASS and aligned(d, from_domain, record.adkim, orgs)
                  for s, d in ids.dkim)
    is_sub = policy_domain != from_domain
    policy = record.subdomain_policy if is_sub else record.p
    base = DomainResult(from_domain, AuthStatus.PASS, policy_domain, policy, policy, spf_ok,
                        dkim_ok, record)
    if spf_ok or dkim_ok:
        which = " and ".join(n for n, ok in (("SPF", spf_ok), ("DKIM", dkim_ok)) if ok)
        return replace(base, reason=f"aligned {which} pass")

    # Not authenticated. A temporary failure of an identity that would have aligned means the
    # answer is unknown, not fail (RFC 7489 leaves it to us; failing would reject good mail).
    temp = []
    if ids.spf_domain and aligned(ids.spf_domain, from_domain, record.aspf, orgs):
        if ids.spf_status is AuthStatus.TEMPERROR:
            temp.append(f"SPF temperror for {ids.spf_domain}")
        elif ids.spf_unknown:
            temp.append(f"SPF result unknown for {ids.spf_domain} (check failed)")
    for status, domain in ids.dkim:
        if status is AuthStatus.TEMPERROR and aligned(domain, from_domain, record.adkim, orgs):
            temp.append(f"DKIM temperror for d={domain}")
    for domain in ids.dkim_unknown_domains:
        if aligned(domain, from_domain, record.adkim, orgs):
            temp.append(f"DKIM result unknown for d={domain} (check failed)")
    if temp:
        return replace(base, status=AuthStatus.TEMPERROR, applied=None,
                       reason="; ".join(temp[:3]), temp_matters=policy is not Policy.NONE)

    selected = pct_selected(ctx, policy_domain, record.pct)
    applied = policy if selected else policy.weaker()
    why = "no aligned SPF or DKIM pass"
    if not selected:
        why += f"; not selected by pct={record.pct}: {policy.value} -> {applied.value}"
    return replace(base, status=AuthStatus.FAIL, applied=applied, reason=why)


def pct_draw(ctx: CheckContext, policy_domain: str) -> int:
    """0-99, the same for the same message and domain every time (see the module notes)."""
    message_id = (ctx.message.get("Message-ID") or "").strip()
    if message_id:
        seed = message_id.encode("utf-8", "surrogateescape")
    else:
        seed = ctx.message.raw[:ctx.message.body_offset]
    digest = hashlib.sha256(seed + b"\0" + policy_domain.encode("ascii", "replace")).digest()
    return int.from_bytes(digest[:8], "big") % 100


def pct_selected(ctx: CheckContext, policy_domain: str, pct: int) -> bool:
    if pct >= 100:
        return True
    if pct <= 0:
        return False
    return pct_draw(ctx, policy_domain) < pct


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------
def run(ctx: CheckContext) -> CheckResult:
    settings: Settings = ctx.engine.cached(
        "dmarc.settings", lambda: settings_from(ctx.config.section(NAME)))
    orgs = psl.for_engine(ctx.engine)
    authors = author_domains(ctx.message.get_all("From"))
    symbols: list[Symbol] = []

    if authors.header_count == 0 or not authors.domains:
        why = "no From header" if authors.header_count == 0 else "no parseable From domain"
        symbols.append(ctx.symbol("DMARC_NO_FROM", why))
        if authors.header_count > 1:
            symbols.append(ctx.symbol("DMARC_MULTI_FROM", f"{authors.header_count} From headers"))
        outcome = DMARCOutcome(AuthStatus.PERMERROR, None, None, None, None, reason=why)
        ar = DMARCAuthenticationResult(result="permerror", result_comment=why)
        return CheckResult(symbols=symbols, authres=[ar], outcome=outcome)

    ids = gather_identities(ctx)
    evaluated = authors.domains[:MAX_FROM_DOMAINS]
    results = [evaluate_domain(ctx, domain, ids, orgs) for domain in evaluated]

    if not authors.malformed and len(authors.domains) == 1:
        # One domain (several From fields naming it are still flagged below).
        decisive = results[0]
        status = decisive.status
    else:
        failing = [r for r in results if r.status is AuthStatus.FAIL]
        temps = [r for r in results if r.status is AuthStatus.TEMPERROR]
        if failing:
            decisive = max(failing, key=lambda r: r.applied.rank if r.applied else -1)
            status = AuthStatus.FAIL
        elif temps:
            decisive, status = temps[0], AuthStatus.TEMPERROR
        else:
            decisive, status = results[0], AuthStatus.PERMERROR

    if authors.malformed:
        symbols.append(ctx.symbol("DMARC_NO_FROM", "; ".join(authors.problems)[:200]))
    if authors.header_count > 1 or len(authors.domains) > 1:
        extra = "" if len(authors.domains) <= MAX_FROM_DOMAINS else \
            f" (only the first {MAX_FROM_DOMAINS} evaluated)"
        symbols.append(ctx.symbol("DMARC_MULTI_FROM",
                                  f"{authors.header_count} From header(s), domains "
                                  f"{', '.join(authors.domains[:5])}{extra}"))

    forced = None
    overridden = False
    arc = _arc(ctx)
    if status is AuthStatus.PASS:
        symbols.append(ctx.symbol("DMARC_POLICY_ALLOW",
                                  f"{decisive.from_domain}: {decisive.reason}"))
    elif status is AuthStatus.FAIL:
        applied = decisive.applied or Policy.NONE
        detail = f"{decisive.from_domain}: {decisive.reason} (policy {applied.value} " \
                 f"from {decisive.policy_domain})"
        if applied is Policy.NONE:
            symbols.append(ctx.symbol("DMARC_POLICY_SOFTFAIL", detail))
        elif arc is not None and arc.status is AuthStatus.PASS and arc.trusted:
            overridden = True
            symbols.append(ctx.symbol("DMARC_ARC_OVERRIDE",
                                      f"{detail}; trusted ARC sealer {arc.sealer} vouches"))
            forced = _arc_forced(decisive, applied, settings, arc)
        else:
            symbols.append(ctx.symbol("DMARC_POLICY_REJECT" if applied is Policy.REJECT
                                      else "DMARC_POLICY_QUARANTINE", detail))
            forced = _policy_forced(decisive.from_domain, applied, settings)
    elif status is AuthStatus.TEMPERROR:
        symbols.append(ctx.symbol("DMARC_DNSFAIL", f"{decisive.from_domain}: {decisive.reason}"))
        if settings.temperror_action is Action.TEMPFAIL and decisive.temp_matters:
            forced = ForcedAction(
                Action.TEMPFAIL,
                f"DMARC policy of {decisive.from_domain} could not be evaluated "
                f"(temporary DNS failure); try again later", "451", "4.7.1")
    elif status is AuthStatus.PERMERROR:
        # A broken record (several From domains without one failing are flagged above).
        bad = next((r for r in results if r.status is AuthStatus.PERMERROR), None)
        if bad is not None:
            symbols.append(ctx.symbol("DMARC_BAD_POLICY", f"{bad.from_domain}: {bad.reason}"))
    else:
        symbols.append(ctx.symbol("DMARC_NA", f"{decisive.from_domain}: {decisive.reason}"))
    for result in results:
        if result.record is not None and result.record.p_defaulted and \
                "DMARC_BAD_POLICY" not in {s.name for s in symbols}:
            symbols.append(ctx.symbol("DMARC_BAD_POLICY", f"{result.policy_domain}: "
                                      f"{'; '.join(result.record.warnings)[:160]}"))
            break

    single = len(results) == 1 and not authors.malformed
    if authors.malformed and status is AuthStatus.PERMERROR:
        # One clause for the message, as authentication_milter writes it: no domain to name.
        authres = [DMARCAuthenticationResult(result="permerror",
                                             result_comment="malformed From header")]
    elif authors.malformed:
        authres = [_ar_piece(decisive, downgrade_pass=True, overridden=overridden)]
    else:
        authres = [_ar_piece(r, downgrade_pass=not single and status is not AuthStatus.PASS,
                             overridden=overridden and r is decisive) for r in results]
    reason = decisive.reason
    if not single:
        reason = f"From domains {', '.join(authors.domains[:5])}: {decisive.from_domain}: {reason}"
    outcome = DMARCOutcome(
        status=status, from_domain=decisive.from_domain, policy_domain=decisive.policy_domain,
        policy=decisive.policy.value if decisive.policy else None,
        applied_policy=decisive.applied.value if decisive.applied else None,
        spf_aligned=decisive.spf_aligned, dkim_aligned=decisive.dkim_aligned, reason=reason)
    return CheckResult(symbols=symbols, authres=authres, outcome=outcome, forced=forced)


def _arc(ctx: CheckContext) -> ARCOutcome | None:
    result = ctx.results.get("arc")
    outcome = result.outcome if result is not None else None
    return outcome if isinstance(outcome, ARCOutcome) else None


def _policy_forced(domain: str, applied: Policy, settings: Settings) -> ForcedAction | None:
    action = settings.reject_action if applied is Policy.REJECT else settings.quarantine_action
    if action is None:
        return None
    reason = f"DMARC policy of {domain} is {applied.value}: not aligned/authenticated"
    if action is Action.REJECT:
        return ForcedAction(action, reason, "550", "5.7.1")
    return ForcedAction(action, reason)


def _arc_forced(result: DomainResult, applied: Policy, settings: Settings,
                arc: ARCOutcome) -> ForcedAction | None:
    """A trusted sealer softens, never hardens: the milder of the override and the policy's own
    configured action."""
    configured = settings.reject_action if applied is Policy.REJECT else settings.quarantine_action
    choices = [a for a in (settings.arc_override_action, configured)]
    if any(a is None for a in choices):
        return None
    action = min((a for a in choices if a is not None), key=lambda a: a.rank)
    return ForcedAction(action, f"DMARC policy of {result.from_domain} is {applied.value}, "
                                f"but trusted ARC sealer {arc.sealer} vouches for the message")


_COMMENT_UNSAFE = re.compile(r"[()\\\r\n]")


def _ar_piece(result: DomainResult, *, downgrade_pass: bool,
              overridden: bool) -> DMARCAuthenticationResult:
    status = result.status
    comment_parts = []
    if result.policy is not None and status in (AuthStatus.PASS, AuthStatus.FAIL):
        comment_parts.append(f"p={result.policy.value}")
        # The disposition is what happens to this message: nothing, when DMARC passed.
        disposition = "none" if status is AuthStatus.PASS else (result.applied or
                                                                 result.policy).value
        comment_parts.append(f"dis={disposition}")
    if overridden:
        comment_parts.append("arc=pass override")
    if downgrade_pass and status is AuthStatus.PASS:
        status = AuthStatus.PERMERROR
        comment_parts.append("aligned, but the From header is not usable")
    elif status in (AuthStatus.TEMPERROR, AuthStatus.PERMERROR) and result.reason:
        comment_parts.append(result.reason[:80])
    comment = _COMMENT_UNSAFE.sub(" ", " ".join(comment_parts)) or None
    policy = None
    if result.applied is not None and status is AuthStatus.FAIL:
        policy = result.applied.value
    elif result.applied is not None and status is AuthStatus.PASS:
        policy = "none"
    return DMARCAuthenticationResult(result=status.value, result_comment=comment,
                                     header_from=result.from_domain, policy=policy)


__all__ = ["Alignment", "AuthorDomains", "DMARCRecord", "DMARCRecordError", "DuplicateTagError",
           "InvalidPolicyError", "NotDMARCRecord", "Policy", "TagSyntaxError", "TagValueError",
           "author_domains", "is_dmarc_record", "parse_record", "run", "setup", "field"]
