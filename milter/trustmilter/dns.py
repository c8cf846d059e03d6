"""The one DNS client. Every lookup (SPF, DKIM, ARC, DMARC, iprev, DNSBL) goes through a
``Resolver``: one configured server and port, one timeout, one TTL-respecting cache. A message's
checks share a ``DNSSession`` that enforces the per-message deadline and remembers what failed.

Errors are typed: NXDOMAIN and NODATA are answers (empty lists); a timeout, SERVFAIL, REFUSED or
a passed deadline raise ``DNSTempError`` and must become a temperror, never a fail.
"""
from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

from trustmilter.errors import DNSPermError, DNSTempError


def parse_server(server: str) -> tuple[str, int]:
    """"HOST", "HOST:PORT", "[v6]:PORT" or a bare IPv6 address -> (host, port)."""
    server = server.strip()
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 53
    if server.count(":") == 1:
        host, port = server.split(":")
        return host, int(port)
    return server, 53


@dataclass
class Answer:
    """A positive or negative answer. ``nxdomain`` distinguishes a missing name from NODATA."""

    records: list[str | bytes]
    nxdomain: bool = False
    ttl: int = 0


class Resolver:
    """A thread-safe stub resolver bound to one recursive server."""

    def __init__(self, server: str = "", timeout: float = 2.0, cache_size: int = 20000) -> None:
        if server:
            host, port = parse_server(server)
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [host]
            self._resolver.port = port
        else:
            self._resolver = dns.resolver.Resolver(configure=True)
        self.server = server or ",".join(str(n) for n in self._resolver.nameservers)
        self.timeout = timeout
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        self._resolver.retry_servfail = False
        # EDNS0 with a 1232-byte buffer (the DNS flag day size): big TXT records in one answer,
        # and truncated ones are retried over TCP by dnspython.
        self._resolver.use_edns(0, 0, 1232)
        self._resolver.cache = dns.resolver.LRUCache(cache_size) if cache_size > 0 else None
        self.queries = 0  # answered from the network (not the cache); for benchmarks
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, section: dict[str, object]) -> "Resolver":
        return cls(server=str(section.get("server") or ""), timeout=float(section["timeout"]),  # type: ignore[arg-type]
                   cache_size=int(section["cache_size"]))  # type: ignore[call-overload]

    def query(self, name: str, rdtype: str, timeout: float | None = None) -> Answer:
        """Look ``name`` up. Raises DNSTempError on timeout/SERVFAIL, DNSPermError on a bad name."""
        lifetime = self.timeout if timeout is None else max(0.01, min(timeout, self.timeout))
        try:
            qname = dns.name.from_text(name) if isinstance(name, str) else name
        except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
            raise DNSPermError(f"bad name {name!r}: {exc}") from None
        try:
            ans = self._resolver.resolve(qname, rdtype, lifetime=lifetime, search=False,
                                         raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return Answer([], nxdomain=True)
        except dns.resolver.LifetimeTimeout:
            raise DNSTempError(f"{name} {rdtype}: timeout") from None
        except dns.resolver.NoNameservers as exc:
            raise DNSTempError(f"{name} {rdtype}: server failure ({_rcode_of(exc)})") from None
        except dns.resolver.YXDOMAIN:
            raise DNSPermError(f"{name} {rdtype}: YXDOMAIN") from None
        except dns.exception.Timeout:
            raise DNSTempError(f"{name} {rdtype}: timeout") from None
        except (dns.name.NameTooLong, dns.name.EmptyLabel, dns.name.LabelTooLong) as exc:
            raise DNSPermError(f"bad name {name!r}: {exc}") from None
        except dns.exception.DNSException as exc:
            raise DNSTempError(f"{name} {rdtype}: {exc.__class__.__name__}") from None
        with self._lock:
            self.queries += 1
        rrset = ans.rrset
        if rrset is None:
            return Answer([], ttl=0)
        return Answer([_rdata_value(r) for r in rrset], ttl=rrset.ttl)


def _rcode_of(exc: dns.resolver.NoNameservers) -> str:
    errors = exc.kwargs.get("errors") or []
    for err in errors:
        if len(err) >= 5 and err[4] is not None:
            return str(err[4])
    return "no answer"


def _rdata_value(rdata: object) -> str | bytes:
    rdtype = getattr(rdata, "rdtype", None)
    if rdtype in (dns.rdatatype.TXT, dns.rdatatype.SPF):
        return b"".join(rdata.strings)  # type: ignore[attr-defined]
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return str(rdata.address)  # type: ignore[attr-defined]
    if rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME, dns.rdatatype.NS):
        return str(rdata.target).rstrip(".")  # type: ignore[attr-defined]
    if rdtype == dns.rdatatype.MX:
        return f"{rdata.preference} {str(rdata.exchange).rstrip('.')}"  # type: ignore[attr-defined]
    return rdata.to_text()  # type: ignore[attr-defined]


@dataclass
class DNSSession:
    """One message's view of the resolver: a deadline, and a record of what failed."""

    resolver: Resolver
    deadline: float                         # time.monotonic() value
    errors: list[str] = field(default_factory=list)
    lookups: int = 0

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def query(self, name: str, rdtype: str) -> Answer:
        left = self.remaining()
        if left <= 0:
            msg = f"{name} {rdtype}: message DNS deadline passed"
            self.errors.append(msg)
            raise DNSTempError(msg)
        self.lookups += 1
        try:
            return self.resolver.query(name, rdtype, timeout=left)
        except DNSTempError as exc:
            self.errors.append(str(exc))
            raise

    # Convenience lookups used by the checks.
    def txt(self, name: str) -> list[bytes]:
        return [r for r in self.query(name, "TXT").records if isinstance(r, bytes)]

    def addresses(self, name: str) -> list[str]:
        """A and AAAA. A temperror on one family with an answer on the other still answers."""
        found: list[str] = []
        failures = 0
        for rdtype in ("A", "AAAA"):
            try:
                found += [str(r) for r in self.query(name, rdtype).records]
            except DNSTempError:
                failures += 1
        if failures == 2 or (failures and not found):
            raise DNSTempError(f"{name}: address lookup failed")
        return found

    def ptr(self, ip: str) -> list[str]:
        rev = dns.reversename.from_address(str(ipaddress.ip_address(ip))).to_text()
        return [str(r) for r in self.query(rev, "PTR").records]


def session_for(resolver: Resolver, deadline_seconds: float) -> DNSSession:
    return DNSSession(resolver, time.monotonic() + deadline_seconds)
