"""DNS lists (DNSBL, RHSBL/DBL, URIBL/SURBL): list definitions from config, query names,
concurrent lookups through the message's ``DNSSession``, and the reading of answers.

Why not pydnsbl's checker itself: it binds an asyncio loop at construction (one checker cannot
serve several milter threads), resolves through aiodns/c-ares reading /etc/resolv.conf (a second
DNS client beside ours, with its own cache and no per-message deadline) and counts every A answer
as a listing, including the 127.255.255.x codes with which Spamhaus says "refused: you query
through a public resolver". So the lookups go through our one resolver (``ctx.dns``: its server,
TTL cache and deadline), fanned out over a small thread pool, and pydnsbl supplies what it is good
at: the query names (reversed IPv4, RFC 5782 nibble-reversed IPv6, IDNA-checked domains) and its
providers' return-code categories (spam, exploits, phish, malware...) for the symbol reasons.

An answer counts as a listing only when every A record is inside 127.0.0.0/8, none is a refusal
code (127.255.255.0/24 for every list, plus each list's own ``blocked`` codes such as URIBL's
127.0.0.1), and a code rule maps it to a symbol. Anything else is an error symbol and a log line,
never a hit.
"""
from __future__ import annotations

import concurrent.futures as cf
import ipaddress
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from pydnsbl.checker import DNSBLDomainChecker, DNSBLIpChecker
from pydnsbl.providers import DblSpamhaus, Provider, ZenSpamhaus

from trustmilter.errors import ConfigError, DNSPermError, DNSTempError

if TYPE_CHECKING:
    from trustmilter.checks.base import CheckContext
    from trustmilter.dns import DNSSession
    from trustmilter.pipeline import Engine

log = logging.getLogger("trustmilter.dnslists")

LOOPBACK_NET = ipaddress.IPv4Network("127.0.0.0/8")
# Spamhaus (and others following it) answer 127.255.255.252 (typo in the zone name),
# .254 (query via a public/open resolver) and .255 (excessive queries): refusals, never listings.
REFUSAL_NET = ipaddress.IPv4Network("127.255.255.0/24")
_SYMBOL = re.compile(r"^[A-Z][A-Z0-9_]{1,63}$")
_ZONE = re.compile(r"^(?=.{1,200}$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)+"
                   r"[A-Za-z][A-Za-z0-9-]{0,62}$")


# ---- query names (pydnsbl) ---------------------------------------------------------------------
class _IPQueryNames(DNSBLIpChecker):
    """pydnsbl's IP query-name building without its asyncio loop and c-ares resolver."""

    def __init__(self) -> None:  # noqa: D107 - deliberately skips the loop-binding constructor
        pass


class _DomainQueryNames(DNSBLDomainChecker):
    """pydnsbl's domain query-name building (IDNA + syntax check) without loop or resolver."""

    def __init__(self) -> None:  # noqa: D107
        pass


_ip_names = _IPQueryNames()
_domain_names = _DomainQueryNames()


def ip_query_label(ip: str) -> str:
    """"81.2.69.160" -> "160.69.2.81"; IPv6 -> 32 reversed nibbles (RFC 5782 2.4)."""
    addr = ipaddress.ip_address(ip)
    return str(_ip_names.prepare_query(str(addr) if addr.version == 4 else addr.exploded))


def domain_query_label(domain: str) -> str:
    """The A-label form of ``domain`` for a domain list; ValueError when it is not a host name
    a list could hold (IDNA failure, bad syntax)."""
    return str(_domain_names.prepare_query(domain.strip().rstrip(".")))


# ---- list definitions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CodePattern:
    """A pattern over IPv4 answers: per octet an inclusive range (``*`` = 0-255)."""

    text: str
    octets: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, text: str, key: str) -> "CodePattern":
        text = text.strip()
        if "/" in text:
            try:
                net = ipaddress.IPv4Network(text, strict=False)
            except ValueError as exc:
                raise ConfigError(f"bad code network {text!r}: {exc}", key=key) from None
            lo, hi = int(net.network_address), int(net.broadcast_address)
            octets = tuple(((lo >> s) & 255, (hi >> s) & 255) for s in (24, 16, 8, 0))
            return cls(text, octets)
        parts = text.split(".")
        if len(parts) != 4:
            raise ConfigError(f"bad code {text!r}: expected A.B.C.D, ranges like 4-7, * or a "
                              "network like 127.255.255.0/24", key=key)
        out = []
        for part in parts:
            if part == "*":
                out.append((0, 255))
                continue
            lo_s, _, hi_s = part.partition("-")
            try:
                lo, hi = int(lo_s), int(hi_s or lo_s)
            except ValueError:
                raise ConfigError(f"bad code {text!r}: octet {part!r}", key=key) from None
            if not (0 <= lo <= hi <= 255):
                raise ConfigError(f"bad code {text!r}: octet {part!r} out of range", key=key)
            out.append((lo, hi))
        return cls(text, tuple(out))

    def matches(self, addr: ipaddress.IPv4Address) -> bool:
        value = int(addr)
        return all(lo <= (value >> s) & 255 <= hi
                   for (lo, hi), s in zip(self.octets, (24, 16, 8, 0)))


@dataclass(frozen=True)
class CodeRule:
    pattern: CodePattern
    symbol: str


@dataclass(frozen=True)
class DNSList:
    """One configured list."""

    name: str                        # config key ("spamhaus_zen")
    zone: str
    ipv4: bool = True
    ipv6: bool = False
    bitmask: bool = False            # SURBL/URIBL style: last octet is a set of bits
    codes: tuple[CodeRule, ...] = ()
    unknown: str = ""                # symbol for a listing no rule maps ("" = log and ignore)
    blocked: tuple[CodePattern, ...] = ()
    sources: tuple[str, ...] = ()    # domain lists: which domains it is asked about (() = all)
    provider: Provider | None = field(default=None, compare=False)

    def serves(self, source: str) -> bool:
        return not self.sources or source in self.sources

    def symbols(self) -> list[str]:
        out = [r.symbol for r in self.codes]
        if self.unknown:
            out.append(self.unknown)
        return out


def _provider_for(zone: str) -> Provider | None:
    """pydnsbl's provider when it knows this list's codes (also for Spamhaus DQS zones)."""
    zone = zone.lower()
    if zone == "zen.spamhaus.org" or zone.endswith(".zen.dq.spamhaus.net"):
        return ZenSpamhaus(host=zone)
    if zone == "dbl.spamhaus.org" or zone.endswith(".dbl.dq.spamhaus.net"):
        return DblSpamhaus(host=zone)
    return None


def parse_lists(config_section: dict[str, Any], section_name: str,
                valid_sources: frozenset[str] = frozenset()) -> list[DNSList]:
    """The enabled lists of a ``dnsbl:``/``uribl:`` section; ConfigError names the bad key.
    ``valid_sources``: the sources a list may be restricted to (domain lists only)."""
    lists = config_section.get("lists") or {}
    if not isinstance(lists, dict):
        raise ConfigError("expected a mapping of list name -> definition", key=f"{section_name}.lists")
    scores = config_section.get("scores") or {}
    out: list[DNSList] = []
    allowed = {"enabled", "zone", "ipv4", "ipv6", "bitmask", "codes", "unknown", "blocked"}
    if valid_sources:
        allowed.add("sources")
    for name, spec in lists.items():
        key = f"{section_name}.lists.{name}"
        if not isinstance(spec, dict):
            raise ConfigError("expected a mapping", key=key)
        extra = set(spec) - allowed
        if extra:
            raise ConfigError(f"unknown setting(s) {', '.join(sorted(extra))}", key=key)
        if not spec.get("enabled", False):
            continue
        zone = str(spec.get("zone") or "").strip().rstrip(".").lower()
        if not _ZONE.match(zone):
            raise ConfigError(f"bad zone {zone!r}", key=f"{key}.zone")
        codes: list[CodeRule] = []
        for i, item in enumerate(spec.get("codes") or []):
            ckey = f"{key}.codes[{i}]"
            if not isinstance(item, str) or len(item.split()) != 2:
                raise ConfigError(f"expected \"CODE SYMBOL\", got {item!r}", key=ckey)
            code, symbol = item.split()
            if not _SYMBOL.match(symbol):
                raise ConfigError(f"bad symbol name {symbol!r}", key=ckey)
            codes.append(CodeRule(CodePattern.parse(code, ckey), symbol))
        bitmask = bool(spec.get("bitmask", False))
        if bitmask:
            for i, rule in enumerate(codes):
                lo, hi = rule.pattern.octets[3]
                if lo != hi or lo == 0 or any(a != b for a, b in rule.pattern.octets[:3]):
                    raise ConfigError(f"a bitmask list's code is one address whose last octet is "
                                      f"the bit(s), got {rule.pattern.text!r}",
                                      key=f"{key}.codes[{i}]")
        unknown = str(spec.get("unknown") or "")
        if unknown and not _SYMBOL.match(unknown):
            raise ConfigError(f"bad symbol name {unknown!r}", key=f"{key}.unknown")
        blocked = tuple(CodePattern.parse(str(b), f"{key}.blocked[{i}]")
                        for i, b in enumerate(spec.get("blocked") or []))
        sources = tuple(str(x) for x in spec.get("sources") or [])
        bad = [x for x in sources if x not in valid_sources]
        if bad:
            raise ConfigError(f"unknown source(s) {', '.join(bad)}; known: "
                              f"{', '.join(sorted(valid_sources))}", key=f"{key}.sources")
        if not codes and not unknown:
            raise ConfigError("a list needs codes or an unknown symbol", key=key)
        lst = DNSList(name=str(name), zone=zone, ipv4=bool(spec.get("ipv4", True)),
                      ipv6=bool(spec.get("ipv6", False)), bitmask=bitmask, codes=tuple(codes),
                      unknown=unknown, blocked=blocked, sources=sources,
                      provider=_provider_for(zone))
        for symbol in lst.symbols():
            if symbol not in scores:
                raise ConfigError(f"symbol {symbol} has no score: add it under "
                                  f"{section_name}.scores", key=key)
        out.append(lst)
    return out


# ---- reading answers ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Reading:
    """What one answer means: listing symbols, or an error (then no symbols at all)."""

    symbols: tuple[tuple[str, str], ...] = ()    # (symbol, code)
    error: str = ""                              # "" | "blocked" | "bad_answer"
    detail: str = ""
    unmapped: tuple[str, ...] = ()               # listed codes no rule maps (logged)


def read_answer(lst: DNSList, records: list[str | bytes]) -> Reading:
    addrs: list[ipaddress.IPv4Address] = []
    for rec in records:
        try:
            addr = ipaddress.ip_address(rec if isinstance(rec, str) else rec.decode())
        except (ValueError, UnicodeDecodeError):
            return Reading(error="bad_answer", detail=f"unparsable answer {rec!r}")
        if not isinstance(addr, ipaddress.IPv4Address) or addr not in LOOPBACK_NET:
            # A hijacking resolver's "search page" address, or a list that was shut down and now
            # answers everything (the ORDB/njabl wildcard failure mode): never a listing.
            return Reading(error="bad_answer", detail=f"answer {addr} is outside 127.0.0.0/8")
        addrs.append(addr)
    for addr in addrs:
        if addr in REFUSAL_NET or any(p.matches(addr) for p in lst.blocked):
            return Reading(error="blocked", detail=f"refusal code {addr}")
    found: dict[str, str] = {}
    unmapped: list[str] = []
    for addr in addrs:
        matched = False
        for rule in lst.codes:
            if lst.bitmask:
                base = rule.pattern.octets
                hit = (all(lo == (int(addr) >> s) & 255 for (lo, _), s in zip(base[:3], (24, 16, 8)))
                       and (int(addr) & 255) & base[3][0])
            else:
                hit = rule.pattern.matches(addr)
            if hit:
                found.setdefault(rule.symbol, str(addr))
                matched = True
        if not matched:
            if lst.unknown:
                found.setdefault(lst.unknown, str(addr))
            else:
                unmapped.append(str(addr))
    return Reading(symbols=tuple(found.items()), unmapped=tuple(unmapped))


def categories(lst: DNSList, code: str) -> list[str]:
    """pydnsbl's category names for a code of a list it knows (for reasons), else []."""
    if lst.provider is None:
        return []
    cats = lst.provider.process_response([SimpleNamespace(host=code)])
    return sorted(c for c in cats if c != "unknown")


# ---- lookups --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lookup:
    lst: DNSList
    subject: str      # the IP or domain looked up (for reasons)
    source: str       # where it came from: "client IP", "body URL", "envelope sender"...
    qname: str


@dataclass(frozen=True)
class Hit:
    list: str
    zone: str
    subject: str
    source: str
    code: str
    symbol: str


@dataclass
class ListOutcome:
    """What a DNS-list check found, for later checks and rules."""

    hits: list[Hit] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    queried: int = 0
    skipped: int = 0          # lookups not made: per-message limit

    def listed(self, symbol: str) -> bool:
        return any(h.symbol == symbol for h in self.hits)


_pools: dict[tuple[int, str], cf.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(name: str, threads: int) -> cf.ThreadPoolExecutor:
    # One pool per process and check, made on first use: worker processes each get their own
    # (threads do not survive a fork), and a milter has blocked its signals by then.
    key = (os.getpid(), name)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = cf.ThreadPoolExecutor(max_workers=max(1, threads),
                                         thread_name_prefix=f"{name}-lookup")
            _pools[key] = pool
        return pool


class ThrottledLog:
    """A list that refuses us refuses every message: say so once a minute, not per message."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            loud = last is None or now - last >= self.interval
            if loud:
                self._last[key] = now
        self.logger.log(logging.WARNING if loud else logging.DEBUG, msg, *args)


throttled = ThrottledLog(log)


def _query(session: "DNSSession", qname: str) -> Any:
    return session.query(qname, "A")


def _result_of(fut: cf.Future[Any]) -> Any:
    """A finished lookup's answer, or the DNS error it raised (as ``query_many`` gives them)."""
    try:
        return fut.result()
    except (DNSTempError, DNSPermError) as exc:
        return exc


def run_lookups(ctx: "CheckContext", prefix: str, lookups: list[Lookup], threads: int,
                outcome: ListOutcome) -> list[Any]:
    """Run ``lookups`` concurrently within the message's DNS deadline; returns symbols (listings
    and ``<PREFIX>_BLOCKED`` / ``_TEMPFAIL`` / ``_BAD_ANSWER``), merged one per name."""
    session = ctx.dns
    # The same query name once per message (a domain both in From and in a URL).
    unique: dict[str, Lookup] = {}
    for lk in lookups:
        unique.setdefault(lk.qname, lk)
    outcome.queried += len(unique)
    answers: list[Any]
    if getattr(session.resolver, "batches", False):
        # All at once on one socket, no thread per lookup (Resolver.query_many).
        answers = list(session.query_many(list(unique), "A"))
    else:
        pool = _pool(prefix.lower(), threads)
        futures = [pool.submit(_query, session, qname) for qname in unique]
        done, _late = cf.wait(futures, timeout=max(0.0, session.remaining()) + 0.25)
        answers = [_result_of(fut) if fut in done else None for fut in futures]
        for fut in _late:
            fut.cancel()
    merged: dict[str, list[str]] = {}

    def add(symbol: str, reason: str) -> None:
        merged.setdefault(symbol, []).append(reason)

    for lk, answer in zip(unique.values(), answers):
        zone = lk.lst.zone
        if answer is None:
            outcome.errors.append(f"{zone}: {lk.subject}: not answered within the deadline")
            add(f"{prefix}_TEMPFAIL", f"{zone}: no answer within the message deadline")
            throttled.warning(f"{zone}:tempfail", "%s: %s lookup of %s not answered within the "
                              "message deadline", prefix, zone, lk.subject)
            continue
        if isinstance(answer, DNSTempError):
            outcome.errors.append(f"{zone}: {answer}")
            add(f"{prefix}_TEMPFAIL", f"{zone}: {_short(answer)}")
            throttled.warning(f"{zone}:tempfail", "%s: %s lookup failed: %s (not counted as a "
                              "listing)", prefix, zone, answer)
            continue
        if isinstance(answer, DNSPermError):
            outcome.errors.append(f"{zone}: {answer}")
            log.debug("%s: %s: %s", prefix, zone, answer)
            continue
        records = answer.records
        if not records:
            continue
        reading = read_answer(lk.lst, records)
        if reading.error == "blocked":
            outcome.errors.append(f"{zone}: {reading.detail}")
            add(f"{prefix}_BLOCKED", f"{zone} refused the query ({reading.detail})")
            throttled.warning(f"{zone}:blocked", "%s: %s refused our query with %s: it does not "
                              "serve queries from public resolvers or above its free volume; "
                              "use a local resolver (unbound) or the operator's paid/keyed "
                              "service. Not counted as a listing.", prefix, zone, reading.detail)
            continue
        if reading.error:
            outcome.errors.append(f"{zone}: {reading.detail}")
            add(f"{prefix}_BAD_ANSWER", f"{zone}: {reading.detail}")
            throttled.warning(f"{zone}:bad", "%s: %s gave an answer that is no listing: %s "
                              "(wildcarding zone or a resolver rewriting NXDOMAIN?)", prefix,
                              zone, reading.detail)
            continue
        if reading.unmapped:
            log.info("%s: %s answered %s for %s, a code no rule maps (ignored)", prefix, zone,
                     ",".join(reading.unmapped), lk.subject)
        for symbol, code in reading.symbols:
            outcome.hits.append(Hit(lk.lst.name, zone, lk.subject, lk.source, code, symbol))
            cats = categories(lk.lst, code)
            what = f"{code}: {', '.join(cats)}" if cats else code
            add(symbol, f"{lk.subject} ({lk.source}) listed in {zone} ({what})")
    symbols = []
    for name, reasons in merged.items():
        reason = reasons[0] if len(reasons) == 1 else f"{reasons[0]} (+{len(reasons) - 1} more)"
        symbols.append(ctx.symbol(name, reason))
    return symbols


def _short(exc: Exception) -> str:
    text = str(exc)
    return text.rsplit(": ", 1)[-1] if ": " in text else text


def cached_lists(engine: "Engine", section_name: str,
                 valid_sources: frozenset[str] = frozenset()) -> list[DNSList]:
    section = engine.config.section(section_name)
    return engine.cached(f"{section_name}.lists",  # type: ignore[no-any-return]
                         lambda: parse_lists(section, section_name, valid_sources))
