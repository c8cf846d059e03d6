"""ARC (RFC 8617): validate the Authenticated Received Chain a forwarder or mailing list added.

dkimpy's ``ARC`` class does the chain walk (RFC 8617 5.2) and the cryptography, with key lookups
through our DNS session. Two things are fixed around it:

- dkimpy finds an instance's raw ARC-Message-Signature by searching its text for " i=N;". Real
  sealers write ``ARC-Message-Signature:i=2; ...`` (no space: subspace.kernel.org), fold with a
  tab before ``i=``, put ``i=`` last or write ``i = 2``; dkimpy then raises IndexError and a
  valid chain is lost. ``_ARCValidator.verify_instance`` is dkimpy 1.1.8's method (zlib licence,
  (c) 2017 Valimail Inc., Scott Kitterman) with that lookup replaced by a tag parse; the headers
  are not modified, so every signature is checked over the bytes the sealers signed.
- dkimpy reports a key that could not be fetched (DNS timeout/SERVFAIL) as an invalid signature.
  The failed key names are recorded, and a chain that fails only because of them is a
  ``temperror``, never a ``fail``.

Outcome: pass, fail (the newest seal says cv=fail, a broken structure, a signature that does not
verify), none (no ARC headers) or temperror. ``trusted`` = pass and the newest sealer (d= of the
highest ARC-Seal) is in ``arc.trusted_sealers``: an entry matches that domain exactly
(case-insensitive); an entry "*.example.org" matches the subdomains of example.org (list
"example.org" too for the apex). Exact by default because a subdomain can be run by someone
else (hosted tenants), and trusting a sealer means trusting its account of SPF/DKIM/DMARC.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import dkim
import dkim.util
from authres.arc import ARCAuthenticationResult

from trustmilter.checks.base import CheckContext, CheckResult
from trustmilter.checks.dkim import (DKIMPY_LOGGER, choose_key_record, dkimpy_message_of,
                                     huge_body_turn, may_hold_field)
from trustmilter.checks.outcomes import ARCOutcome
from trustmilter.errors import ConfigError, DNSPermError, DNSTempError
from trustmilter.types import AuthStatus

NAME = "arc"
DEPENDS: tuple[str, ...] = ()

MAX_INSTANCES = 50   # RFC 8617 4.2.1 / 5.2 step 1: more ARC sets than this is a fail


# ----- dkimpy, with a robust raw-AMS lookup -----------------------------------------------------

class _ARCValidator(dkim.ARC):  # type: ignore[misc]
    """dkimpy's ARC validator; ``verify`` is dkimpy's, ``verify_instance`` is dkimpy 1.1.8's
    with the raw ARC-Message-Signature found by its parsed i= tag (see the module docstring)."""

    def _raw_ams_header(self, instance: bytes) -> tuple[bytes, bytes]:
        want = _instance_number(instance)
        for name, value in self.headers:
            if name.lower() != b"arc-message-signature":
                continue
            try:
                tags = dkim.util.parse_tag_value(value)
            except dkim.util.InvalidTagValueList:
                continue
            if want is not None and _instance_number(tags.get(b"i", b"")) == want:
                return name, value
        raise dkim.MessageFormatError(
            f"no ARC-Message-Signature with i={instance.decode('ascii', 'replace')}")

    def verify_instance(self, arc_headers_w_instance: list[Any], instance: int,
                        dnsfunc: Callable[..., Any] | None = None) -> dict[str, Any]:
        if dnsfunc is None:  # never dnspython's global resolver
            raise dkim.ParameterError("verify_instance needs our dnsfunc")
        if instance == 0 or not arc_headers_w_instance:
            raise dkim.ParameterError(f"request to verify instance {instance} not present")
        aar_value = ams_value = as_value = None
        arc_headers = []
        output: dict[str, Any] = {"instance": instance}
        for i, arc_header in arc_headers_w_instance:
            if i > instance:
                continue
            arc_headers.append(arc_header)
            if i != instance:
                continue
            kind = arc_header[0].lower()
            if kind == b"arc-authentication-results":
                if aar_value is not None:
                    raise dkim.MessageFormatError(
                        f"Duplicate ARC-Authentication-Results for instance {instance}")
                aar_value = arc_header[1]
            elif kind == b"arc-message-signature":
                if ams_value is not None:
                    raise dkim.MessageFormatError(
                        f"Duplicate ARC-Message-Signature for instance {instance}")
                ams_value = arc_header[1]
            elif kind == b"arc-seal":
                if as_value is not None:
                    raise dkim.MessageFormatError(f"Duplicate ARC-Seal for instance {instance}")
                as_value = arc_header[1]
        if aar_value is None or ams_value is None or as_value is None:
            raise dkim.MessageFormatError(f"Incomplete ARC set for instance {instance}")
        output["aar-value"] = aar_value

        # ARC-Message-Signature
        try:
            sig = dkim.util.parse_tag_value(ams_value)
        except dkim.util.InvalidTagValueList as exc:
            raise dkim.MessageFormatError(exc) from None
        dkim.validate_signature_fields(sig, [b"i", b"a", b"b", b"bh", b"d", b"h", b"s"], True)
        output["ams-domain"] = sig[b"d"]
        output["ams-selector"] = sig[b"s"]
        include_headers = [x.lower() for x in re.split(rb"\s*:\s*", sig[b"h"])]
        if b"arc-seal" in include_headers:
            raise dkim.ParameterError("The Arc-Message-Signature MUST NOT sign ARC-Seal")
        # The AMS covers itself in the canonicalization its c= names, so the raw header is used.
        raw_ams_header = self._raw_ams_header(sig[b"i"])
        if b"c" not in sig:
            sig[b"c"] = b"relaxed/relaxed"
        output["ams-valid"] = self._checked(sig, include_headers, raw_ams_header, dnsfunc)

        # ARC-Seal
        try:
            sig = dkim.util.parse_tag_value(as_value)
        except dkim.util.InvalidTagValueList as exc:
            raise dkim.MessageFormatError(exc) from None
        dkim.validate_signature_fields(sig, [b"i", b"a", b"b", b"cv", b"d", b"s"], True)
        if b"h" in sig:
            raise dkim.ValidationError("h= tag not permitted in ARC-Seal header field")
        output["as-domain"] = sig[b"d"]
        output["as-selector"] = sig[b"s"]
        output["cv"] = sig[b"cv"]
        as_include_headers = [x[0].lower() for x in arc_headers]
        as_include_headers.reverse()
        as_header = (b"ARC-Seal", b" " + as_value)
        if b"c" not in sig:
            sig[b"c"] = b"relaxed/relaxed"
        output["as-valid"] = self._checked(sig, as_include_headers[:-1], as_header, dnsfunc)
        return output

    def _checked(self, sig: dict[bytes, bytes], include: list[bytes],
                 header: tuple[bytes, bytes], dnsfunc: Callable[..., Any]) -> bool:
        try:
            return bool(self.verify_sig(sig, include, header, dnsfunc))
        except dkim.DKIMException as exc:
            self.logger.debug("%s", exc)
            return False
        except Exception as exc:  # noqa: BLE001 - malformed b=/bh= raise ValueError and others
            self.logger.debug("signature not checkable: %r", exc)
            return False


def _instance_number(value: bytes) -> int | None:
    value = value.strip()
    return int(value) if value.isdigit() else None


# ----- DNS ---------------------------------------------------------------------------------------

class KeyFetcher:
    """dkimpy's ``dnsfunc`` over the message's DNS session. Returns the key record (bytes) or
    None (no record); a DNS failure is remembered by name and raised as dkimpy's
    DnsTimeoutError, which dkimpy turns into an invalid signature: ``failed`` says which
    verdicts were not really verdicts."""

    def __init__(self, ctx: CheckContext) -> None:
        self.ctx = ctx
        self.failed: set[bytes] = set()   # dkimpy's names: b"sel._domainkey.example.org."

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        try:
            text = name.decode("ascii").rstrip(".")
        except UnicodeDecodeError:
            try:
                text = name.decode("utf-8").encode("idna").decode("ascii").rstrip(".")
            except UnicodeError:
                return None
        try:
            records = self.ctx.dns.txt(text)
        except DNSTempError as exc:
            self.failed.add(name)
            raise dkim.DnsTimeoutError(str(exc)) from None
        except DNSPermError:
            return None
        record = choose_key_record(records)
        return None if record is None else _without_email_service_list(record)


def _without_email_service_list(record: bytes) -> bytes:
    """dkimpy's key evaluation drops a key whose s= is a list ("s=email:web", legal per RFC 6376
    3.6.1). A list that includes email (or *) means the same as no s= tag, so it is removed;
    anything else is left for dkimpy to judge."""
    try:
        tags = dkim.util.parse_tag_value(record)
    except dkim.util.InvalidTagValueList:
        return record
    services = {s.strip().lower() for s in tags.get(b"s", b"").split(b":")}
    if b"s" not in tags or not services & {b"email", b"*"}:
        return record
    return b"; ".join(k + b"=" + v for k, v in tags.items() if k != b"s")


def _key_name(selector: bytes, domain: bytes) -> bytes:
    return selector + b"._domainkey." + domain + b"."   # as dkimpy's verify_sig builds it


# ----- the chain ---------------------------------------------------------------------------------

def _decide(results: list[dict[str, Any]], instances: int, assume_valid: set[bytes]) -> bool:
    """dkimpy's chain decision (ARC.verify), with signatures whose key name is in
    ``assume_valid`` counted as valid: True = the chain would pass."""
    if not results or len(results) < instances:
        return False  # a structural error stopped the walk

    def ams_ok(r: dict[str, Any]) -> bool:
        return bool(r["ams-valid"]) or _key_name(r["ams-selector"], r["ams-domain"]) in assume_valid

    def as_ok(r: dict[str, Any]) -> bool:
        return bool(r["as-valid"]) or _key_name(r["as-selector"], r["as-domain"]) in assume_valid

    if not ams_ok(results[0]):
        return False
    for r in results:
        if r["cv"] == dkim.CV_Fail or not as_ok(r):
            return False
        if (r["instance"] == 1) != (r["cv"] == dkim.CV_None):
            return False
    return True


def _oldest_pass(results: list[dict[str, Any]]) -> int:
    """RFC 8617 5.2 step 5: walking down from N-1, the instance above the first AMS that does not
    validate; 0 when every AMS validates."""
    for r in results[1:]:
        if not r.get("ams-valid"):
            return int(r["instance"]) + 1
    return 0


@dataclass(frozen=True)
class ARCSetResult:
    """One ARC set as the validator saw it (for logs and the conformance tests)."""

    instance: int
    ams_valid: bool
    as_valid: bool
    ams_domain: str
    as_domain: str
    cv: str


@dataclass(frozen=True)
class ChainValidation:
    outcome: ARCOutcome
    oldest_pass: int = 0
    sets: tuple[ARCSetResult, ...] = ()   # newest first, as far as the walk got


def _set_results(results: list[dict[str, Any]]) -> tuple[ARCSetResult, ...]:
    def text(value: Any) -> str:
        return value.decode("utf-8", "replace").lower() if isinstance(value, bytes) else ""
    return tuple(ARCSetResult(int(r["instance"]), bool(r.get("ams-valid")),
                              bool(r.get("as-valid")), text(r.get("ams-domain")),
                              text(r.get("as-domain")), text(r.get("cv"))) for r in results)


def validate(ctx: CheckContext) -> ChainValidation:
    """Validate the ARC chain of ``ctx.message`` (RFC 8617 5.2). Never raises."""
    min_bits = int(ctx.config.get("dkim.min_rsa_bits", 1024))
    validator = _ARCValidator(None, logger=DKIMPY_LOGGER, minkey=min_bits)
    validator.headers, validator.body = dkimpy_message_of(ctx.message)
    try:
        instances, sorted_headers = validator.sorted_arc_headers()
    except Exception as exc:  # noqa: BLE001 - hostile headers
        return ChainValidation(ARCOutcome(AuthStatus.FAIL,
                                          reason=f"unreadable ARC headers ({exc!r})"[:200]))
    if instances == 0:
        return ChainValidation(ARCOutcome(AuthStatus.NONE, reason="no ARC sets"))
    sealer = _newest_sealer(sorted_headers, instances)
    if instances > MAX_INSTANCES:
        why = f"{instances} ARC sets, more than {MAX_INSTANCES}"
        return ChainValidation(ARCOutcome(AuthStatus.FAIL, sealer, instances, reason=why))
    fetcher = KeyFetcher(ctx)
    try:
        cv, results, why = validator.verify(dnsfunc=fetcher)
    except Exception as exc:  # noqa: BLE001 - dkimpy on a structure we did not foresee
        return ChainValidation(ARCOutcome(
            AuthStatus.FAIL, sealer, instances,
            reason=f"chain not verifiable ({type(exc).__name__}: {exc})"[:200]))
    reason = str(why)
    if cv == dkim.CV_Pass:
        status = AuthStatus.PASS
    elif cv is None:
        status = AuthStatus.FAIL  # 5.2 step 2: the newest seal already says cv=fail
    elif fetcher.failed and _decide(results, instances, fetcher.failed):
        status = AuthStatus.TEMPERROR
        reason = "key lookup failed: " + ", ".join(sorted(n.decode("ascii", "replace").rstrip(".")
                                                          for n in fetcher.failed))
    else:
        status = AuthStatus.FAIL
    oldest = _oldest_pass(results) if status is AuthStatus.PASS else 0
    return ChainValidation(ARCOutcome(status, sealer, instances, reason=reason), oldest,
                           _set_results(results))


def _newest_sealer(sorted_headers: list[Any], instances: int) -> str | None:
    for i, (name, value) in sorted_headers:
        if i == instances and name.lower() == b"arc-seal":
            try:
                d = dkim.util.parse_tag_value(value).get(b"d")
            except dkim.util.InvalidTagValueList:
                return None
            return d.decode("utf-8", "replace").strip().rstrip(".").lower() if d else None
    return None


def sealer_trusted(sealer: str | None, trusted: list[str]) -> bool:
    if not sealer:
        return False
    sealer = sealer.lower().rstrip(".")
    for entry in trusted:
        entry = entry.strip().lower().rstrip(".")
        if entry.startswith("*."):
            if sealer.endswith(entry[1:]):
                return True
        elif sealer == entry:
            return True
    return False


_SEALER_ENTRY = re.compile(r"(\*\.)?[A-Za-z0-9._-]+\.?")


def setup(engine: Any) -> None:
    """Reject unusable trusted_sealers entries at start (this disables the check, loudly)."""
    for entry in engine.config.section(NAME).get("trusted_sealers") or []:
        if not isinstance(entry, str) or not _SEALER_ENTRY.fullmatch(entry.strip()):
            raise ConfigError(f"not a domain: {entry!r}", key="arc.trusted_sealers")


# The ARC fields, as dkimpy's sorted_arc_headers names them (relaxed: lower case, trailing WSP
# gone).
_ARC_FIELD = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")


def runs_inline(ctx: CheckContext) -> bool:
    """No ARC header at all: the chain is none (ARC_NA) without a lookup, no thread needed. The
    same test ``run`` makes before it validates."""
    return not may_hold_field(ctx.message, _ARC_FIELD)


def run(ctx: CheckContext) -> CheckResult:
    if not may_hold_field(ctx.message, _ARC_FIELD):
        validation = ChainValidation(ARCOutcome(AuthStatus.NONE, reason="no ARC sets"))
    else:
        with huge_body_turn(dkimpy_message_of(ctx.message)[1]):
            validation = validate(ctx)
    outcome, oldest = validation.outcome, validation.oldest_pass
    trusted_list = list(ctx.section(NAME).get("trusted_sealers") or [])
    if outcome.status is AuthStatus.PASS and sealer_trusted(outcome.sealer, trusted_list):
        outcome = ARCOutcome(outcome.status, outcome.sealer, outcome.instance, True, outcome.reason)
    where = f"i={outcome.instance} sealer {outcome.sealer or '?'}"
    if outcome.status is AuthStatus.NONE:
        symbol = ctx.symbol("ARC_NA", "no ARC headers")
    elif outcome.status is AuthStatus.PASS:
        symbol = (ctx.symbol("ARC_ALLOW", f"chain passed, {where} is trusted") if outcome.trusted
                  else ctx.symbol("ARC_PASS", f"chain passed, {where}"))
    elif outcome.status is AuthStatus.TEMPERROR:
        symbol = ctx.symbol("ARC_TEMPFAIL", f"{where}: {outcome.reason}")
    else:
        symbol = ctx.symbol("ARC_REJECT", f"{where}: {outcome.reason}")
    ar = ARCAuthenticationResult(result=outcome.status.value)
    if outcome.status is AuthStatus.PASS:
        ar.header_oldest_pass = str(oldest)
    if outcome.status is not AuthStatus.NONE and ctx.envelope.client_ip:
        # RFC 8617 4.1.3: what a later sealer records for the hop that handed us the message.
        ar.smtp_remote_ip = ctx.envelope.client_ip
    return CheckResult(symbols=[symbol], authres=[ar], outcome=outcome)
