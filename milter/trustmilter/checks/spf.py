"""SPF (RFC 7208): is the client IP authorised to send for the MAIL FROM domain, and for the HELO
name? pyspf evaluates ``check_host()``; every lookup it makes goes through the message's
``DNSSession`` (our one resolver, its cache and its deadline), never the system resolver.

Results are RFC 7208's seven: none, neutral, pass, fail, softfail, temperror, permerror. A DNS
timeout or SERVFAIL is a temperror, never a fail or a none. For the null sender the HELO result is
the SPF result (RFC 7208 2.4). The typed ``SPFOutcome`` is what DMARC reads.

pyspf looks names up through the module-global ``spf.DNSLookup``. Checks run concurrently in
threads, so our replacement reads the session bound to the *current thread* (``_bound``): each
evaluation binds its session for exactly as long as pyspf runs, and a thread with no session
bound gets a temperror rather than a lookup through anything else.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import spf
from authres import SPFAuthenticationResult

from trustmilter.checks.base import CheckContext, CheckResult
from trustmilter.checks.outcomes import SPFOutcome
from trustmilter.dns import DNSSession
from trustmilter.received import parse_ip
from trustmilter.errors import DNSPermError, DNSTempError
from trustmilter.types import AuthStatus, Symbol

NAME = "spf"
DEPENDS: tuple[str, ...] = ()

log = logging.getLogger("trustmilter.checks.spf")

# pyspf's result words -> ours. "unknown"/"error" are RFC 4408 draft names pyspf may still use.
_STATUS = {
    "pass": AuthStatus.PASS, "fail": AuthStatus.FAIL, "softfail": AuthStatus.SOFTFAIL,
    "neutral": AuthStatus.NEUTRAL, "none": AuthStatus.NONE, "temperror": AuthStatus.TEMPERROR,
    "permerror": AuthStatus.PERMERROR, "unknown": AuthStatus.PERMERROR,
    "error": AuthStatus.TEMPERROR,
}

# RFC 5322 dot-atom: a local part that can stand unquoted in smtp.mailfrom (RFC 8601 2.7.2).
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_DOMAIN_TEXT = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_REASON_MAX = 200


# ----- pyspf's DNS, routed through the current thread's DNSSession ------------------------------

_bound = threading.local()


def _spf_dns_lookup(name: str, qtype: str, strict: object = True,
                    timeout: float | None = None) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's ``DNSLookup`` contract: ``[((name, type), value), ...]`` where a TXT/SPF value is
    a list of byte strings, MX is ``(preference, exchange)``, A/AAAA/PTR are text. An empty list
    is NXDOMAIN or NODATA; ``spf.TempError`` is a lookup that could not be completed.

    ``timeout`` (pyspf's per-lookup budget) is already enforced by the bound session's deadline,
    which is the smaller of the SPF budget and the message deadline."""
    session: DNSSession | None = getattr(_bound, "session", None)
    if session is None:
        # Never fall back to another resolver: a lookup with no session is a temperror.
        raise spf.TempError("DNS: no DNS session bound to this thread")
    try:
        answer = session.query(name, qtype)
    except DNSTempError as exc:
        raise spf.TempError(f"DNS {exc}") from None
    except DNSPermError:
        return []   # an unusable name has no records (RFC 7208 4.3: malformed -> no match)
    key = (name, qtype)
    out: list[tuple[tuple[str, str], Any]] = []
    for record in answer.records:
        if qtype in ("TXT", "SPF"):
            data = record if isinstance(record, bytes) else str(record).encode("utf-8")
            out.append((key, [data]))   # our resolver joins the character-strings already
        elif qtype == "MX":
            preference, _, exchange = str(record).partition(" ")
            out.append((key, (int(preference), exchange)))
        else:
            out.append((key, str(record)))
    return out


def _install() -> None:
    # Module-global by pyspf's design; idempotent, and re-asserted before each evaluation in
    # case something replaced it (a library must never get the system resolver back).
    if spf.DNSLookup is not _spf_dns_lookup:
        spf.DNSLookup = _spf_dns_lookup


_install()


@contextlib.contextmanager
def _bind(session: DNSSession) -> Iterator[None]:
    previous = getattr(_bound, "session", None)
    _bound.session = session
    try:
        yield
    finally:
        _bound.session = previous


# ----- evaluation --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SPFEvaluation:
    """One ``check_host()`` run: its result and why."""

    status: AuthStatus
    domain: str | None              # the <domain> check_host started at (lowercase)
    sender: str                     # the <sender> it was given
    identity: str                   # "mailfrom" or "helo"
    mechanism: str | None = None    # the top-level term that matched, e.g. "-all", "include:x"
    explanation: str | None = None  # the domain's exp= text (fail), None when the default applied
    problem: str | None = None      # why none/temperror/permerror, in words

    def describe(self) -> str:
        """A short, printable reason for symbols and logs."""
        where = self.domain or "?"
        if self.problem:
            text = f"{where}: {self.problem}"
        elif self.status is AuthStatus.NONE:
            text = f"{where} publishes no SPF record"
        elif self.mechanism:
            text = f"{where}: matched {self.mechanism}"
        else:
            text = f"{where}: no mechanism matched (default neutral)"
        if self.explanation:
            text += f' (explanation: "{self.explanation}")'
        return _printable(text)


@dataclass(frozen=True)
class SPFReport:
    """Both identities. ``mailfrom`` is *the* SPF result: for the null sender it is the HELO
    evaluation itself (RFC 7208 2.4). ``helo`` is set when the HELO identity was evaluated."""

    mailfrom: SPFEvaluation
    helo: SPFEvaluation | None
    null_sender: bool
    client_ip: str | None


def _printable(text: str) -> str:
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= _REASON_MAX else text[:_REASON_MAX - 3] + "..."


def normalize_ip(client_ip: str | None) -> str | None:
    """The client address as check_host's <ip>: IPv4-mapped IPv6 becomes IPv4 (the client is an
    IPv4 host reaching a dual-stack socket). None when unknown or unparseable."""
    if not client_ip:
        return None
    text = client_ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    addr = parse_ip(text.split("%", 1)[0])
    return str(addr) if addr is not None else None


def _malformed(domain: str) -> str | None:
    """RFC 7208 4.3: a malformed or single-label <domain> yields "none" without any lookup."""
    if not domain:
        return "empty domain"
    if domain.startswith("["):
        return "address literal, not a domain"
    if "@" in domain or _UNPRINTABLE.search(domain) or " " in domain:
        return "not a domain name"
    labels = domain.split(".")
    if len(labels) < 2:
        return "not a multi-label domain name"
    if any(not label for label in labels) or any(len(label) > 63 for label in labels):
        return "malformed domain name (empty or over-long label)"
    if len(domain) > 253:
        return "domain name longer than 253 characters"
    try:
        ipaddress.ip_address(domain)
        return "an IP address, not a domain"
    except ValueError:
        return None


def _split_sender(sender: str) -> tuple[str, str]:
    """(local, domain) as RFC 7208 4.3 wants: an empty local part is "postmaster". The domain is
    after the *last* "@" (a quoted local part may contain "@"); one trailing dot is dropped."""
    if "@" in sender:
        local, _, domain = sender.rpartition("@")
    else:
        local, domain = "", sender
    if domain.endswith("."):
        domain = domain[:-1]
    return local or "postmaster", domain


class _Query(spf.query):  # type: ignore[misc]
    """pyspf's query with RFC 7208 5.5 for "ptr" (and the %{p} macro, 7.3): a DNS error on the
    PTR lookup means the mechanism does not match, and a DNS error on one name's address lookup
    skips that name; pyspf instead makes both a temperror. The rule exists so a client, who
    controls its own reverse zone, cannot turn a "fail" into a "temperror" with a broken PTR
    zone. Running out of *our* time budget is never swallowed: that stays a temperror."""

    deadline: float = 0.0

    def _out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline

    def validated_ptrs(self) -> list[str]:
        try:
            names = self.dns_ptr(self.i)
        except spf.TempError:
            if self._out_of_time():
                raise
            return []
        validated: list[str] = []
        for name in names[:spf.MAX_PTR]:   # RFC 7208 4.6.4: at most 10 names are looked up
            try:
                if self.cidrmatch(self.dns_a(name, self.A), self.cidrmax):
                    validated.append(name)
            except spf.TempError:
                if self._out_of_time():
                    raise
        return validated


def _check_host(ip: str, sender: str, helo: str, identity: str, deadline: float,
                cache: dict[Any, Any]) -> SPFEvaluation:
    if identity == "helo":
        # The HELO identity is the whole name: never split it at an "@" it should not contain.
        local, domain = "postmaster", helo[:-1] if helo.endswith(".") else helo
    else:
        local, domain = _split_sender(sender)
    if not domain.isascii():
        # RFC 7208 4.3: internationalized names are looked up as A-labels (SMTPUTF8 senders).
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            pass   # left as is: _malformed() calls it not a domain name
    domain_lc = domain.lower()
    problem = _malformed(domain)
    if problem:
        return SPFEvaluation(AuthStatus.NONE, domain_lc or None, sender, identity, problem=problem)
    left = deadline - time.monotonic()
    if left <= 0:
        return SPFEvaluation(AuthStatus.TEMPERROR, domain_lc, sender, identity,
                             problem="SPF time budget exhausted before evaluation")
    # querytime bounds pyspf's own accounting of all lookups; strict=True is RFC 7208 as written
    # (10 DNS-mechanism lookups, 2 void lookups, 10 MX/PTR names: exceeding is permerror).
    query = _Query(i=ip, s=sender, h=helo or "unknown", strict=True, timeout=left,
                   querytime=left)
    query.deadline = deadline
    query.l, query.o, query.d = local, domain, domain   # our split: last "@", no trailing dot
    query.cache = cache   # DNS answers do not depend on the identity: share them within a message
    try:
        word, _code, text = query.check()
    except Exception as exc:  # noqa: BLE001 - pyspf bug on a hostile record: not the sender's pass
        log.error("pyspf raised on %s (%s)", domain_lc, sender, exc_info=True)
        return SPFEvaluation(AuthStatus.PERMERROR, domain_lc, sender, identity,
                             problem=f"evaluation error: {type(exc).__name__}: {exc}")
    status = _STATUS.get(word)
    if status is None:
        log.warning("pyspf returned unexpected result %r for %s", word, domain_lc)
        return SPFEvaluation(AuthStatus.PERMERROR, domain_lc, sender, identity,
                             problem=f"unexpected SPF result {word!r}")
    problem = None
    if status in (AuthStatus.TEMPERROR, AuthStatus.PERMERROR):
        # pyspf's text is "SPF Permanent Error: <message>[: <term>]"; keep what follows.
        problem = text.split("Error: ", 1)[1] if "Error: " in text else text
        if status is AuthStatus.TEMPERROR and not problem.startswith("DNS"):
            problem = f"DNS: {problem}"
    explanation = None
    if status in (AuthStatus.FAIL, AuthStatus.SOFTFAIL) and \
            query.exps.get(word) != query.defexps.get(word):
        explanation = text   # the domain's exp= text, macro-expanded by pyspf
    return SPFEvaluation(status, domain_lc, sender, identity,
                         mechanism=query.mechanism if status is not AuthStatus.NONE else None,
                         explanation=explanation, problem=problem)


def evaluate(session: DNSSession, client_ip: str | None, mail_from: str, helo: str | None, *,
             check_helo: bool = True, max_seconds: float = 10.0) -> SPFReport:
    """Evaluate SPF for one SMTP transaction. All lookups go through ``session`` and together
    take at most ``max_seconds`` (and never past the session's deadline)."""
    _install()
    mail_from = (mail_from or "").strip()
    if mail_from.startswith("<") and mail_from.endswith(">"):
        mail_from = mail_from[1:-1]
    helo = (helo or "").strip()
    null_sender = not mail_from
    ip = normalize_ip(client_ip)
    if ip is None:
        why = "client IP unknown" if not client_ip else f"client IP {client_ip!r} unparseable"
        if null_sender:
            domain = helo.lower().rstrip(".") or None
            sender = f"postmaster@{helo}" if helo else ""
            mf = SPFEvaluation(AuthStatus.NONE, domain, sender, "helo", problem=why)
        else:
            domain = _split_sender(mail_from)[1].lower() or None
            mf = SPFEvaluation(AuthStatus.NONE, domain, mail_from, "mailfrom", problem=why)
        return SPFReport(mf, None, null_sender, None)

    # One child session for all of SPF: shares the resolver and the error log of the message's
    # session, with the tighter of the two deadlines.
    budget = DNSSession(session.resolver, min(session.deadline, time.monotonic() + max_seconds),
                        errors=session.errors)
    cache: dict[Any, Any] = {}
    helo_eval: SPFEvaluation | None = None
    try:
        with _bind(budget):
            if null_sender:
                if helo:
                    helo_eval = _check_host(ip, f"postmaster@{helo}", helo, "helo",
                                            budget.deadline, cache)
                    mf = helo_eval
                else:
                    mf = SPFEvaluation(AuthStatus.NONE, None, "", "helo",
                                       problem="null sender and no HELO name")
            else:
                # MAIL FROM first: it is the identity DMARC needs if the budget runs out.
                mf = _check_host(ip, mail_from, helo, "mailfrom", budget.deadline, cache)
                if check_helo and helo:
                    helo_eval = _check_host(ip, f"postmaster@{helo}", helo, "helo",
                                            budget.deadline, cache)
    finally:
        session.lookups += budget.lookups
    return SPFReport(mf, helo_eval, null_sender, ip)


# ----- the check ---------------------------------------------------------------------------------

def _mailfrom_pvalue(sender: str, domain: str | None) -> str | None:
    """smtp.mailfrom: the address when it is a plain dot-atom address, else only the domain.
    authres leaves any value containing "@" unquoted, so a hostile local part (";", spaces)
    must never reach it: it could forge further Authentication-Results clauses."""
    local, _, dom = sender.rpartition("@")
    if local and _DOT_ATOM.fullmatch(local) and _DOMAIN_TEXT.fullmatch(dom.rstrip(".")):
        return sender
    return _helo_pvalue(domain) if domain else None


def _helo_pvalue(name: str) -> str:
    """A value authres can emit safely: it quotes values without "@" itself; one with "@" (never
    a valid host name) we quote ourselves."""
    name = _UNPRINTABLE.sub("?", name)
    if "@" in name:
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return name


def run(ctx: CheckContext) -> CheckResult:
    section = ctx.section(NAME)
    env = ctx.envelope
    report = evaluate(ctx.dns, env.client_ip, env.mail_from, env.helo,
                      check_helo=bool(section["check_helo"]),
                      max_seconds=float(section["max_lookup_seconds"]))
    mf = report.mailfrom
    symbols: list[Symbol] = []
    authres_pieces: list[Any] = []

    prefix = "null sender, HELO identity " if report.null_sender else ""
    symbols.append(ctx.symbol(f"SPF_{mf.status.name}", prefix + mf.describe()))
    reason = _printable(mf.problem) if mf.problem else None
    if report.null_sender:
        # The HELO evaluation is the SPF result: one clause, for the identity actually checked.
        if env.helo:
            authres_pieces.append(SPFAuthenticationResult(
                result=mf.status.value, smtp_helo=_helo_pvalue(env.helo.strip()), reason=reason))
        else:
            authres_pieces.append(SPFAuthenticationResult(result=mf.status.value, reason=reason))
    else:
        authres_pieces.append(SPFAuthenticationResult(
            result=mf.status.value, smtp_mailfrom=_mailfrom_pvalue(mf.sender, mf.domain),
            reason=reason))
        if report.helo is not None:
            he = report.helo
            symbols.append(ctx.symbol(f"SPF_HELO_{he.status.name}", "HELO " + he.describe()))
            authres_pieces.append(SPFAuthenticationResult(
                result=he.status.value, smtp_helo=_helo_pvalue((env.helo or "").strip()),
                reason=_printable(he.problem) if he.problem else None))

    helo_result = report.helo
    outcome = SPFOutcome(
        mailfrom=mf.status, domain=mf.domain,
        helo=helo_result.status if helo_result is not None else None,
        helo_domain=helo_result.domain if helo_result is not None else None,
        reason=mf.describe())
    return CheckResult(symbols=symbols, authres=authres_pieces, outcome=outcome)
