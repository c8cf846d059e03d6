"""Find the SMTP client behind our own relays from Received headers (for ``scan`` and for mail
handed to us by a trusted relay). Received headers are prepended, so the first one is ours."""
from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

from trustmilter.message import ParsedMessage

# "from HELO (rdns [1.2.3.4])" / "from HELO ([IPv6:2001:db8::1])" / "from HELO (1.2.3.4)"
_FROM = re.compile(r"^\s*from\s+(\S+)", re.IGNORECASE)
_BY = re.compile(r"\sby\s", re.IGNORECASE)
_BRACKET_IP = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")
_PAREN_IP = re.compile(r"\(\s*(?:[^()\s]*\s+)?\[?((?:\d{1,3}\.){3}\d{1,3})\]?")

# The same few addresses are parsed many times per message (Received hops, then SPF, DNSBL,
# rules and reputation each read the client IP): parsing is pure, so it is done once per text.
_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _canonical(text: str) -> str | None:
    addr = _address(text)
    return None if addr is None else str(addr)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _unwrapped(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    addr = _address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class Hop:
    helo: str | None
    ip: str | None
    header: str


def parse_received(value: str) -> Hop:
    helo_match = _FROM.match(value)
    helo = helo_match.group(1) if helo_match else None
    ip = None
    # Only the "from" clause describes the sending host; stop at " by ".
    by = _BY.search(value)
    from_clause = value[:by.start()] if by else value
    for pattern in (_BRACKET_IP, _PAREN_IP):
        for candidate in pattern.findall(from_clause):
            ip = _canonical(candidate)
            if ip:
                break
        if ip:
            break
    return Hop(helo=helo, ip=ip, header=value)


def parse_ip(ip: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address, with IPv4-mapped IPv6 (::ffff:192.0.2.1, as dual-stack sockets report IPv4
    clients) unwrapped to IPv4; None when ``ip`` is empty or not an address."""
    if not ip:
        return None
    return _unwrapped(str(ip))


def in_networks(ip: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    addr = parse_ip(ip)
    if addr is None:
        return False
    return any(addr.version == net.version and addr in net for net in networks)


def parse_networks(items: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(item, strict=False) for item in items]


def first_untrusted_hop(msg: ParsedMessage,
                        trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> Hop | None:
    """The first Received hop (newest first) whose sending IP is outside ``trusted``."""
    for value in msg.get_all("Received"):
        hop = parse_received(value)
        if hop.ip is None:
            continue  # local submission or an unparseable hop: look further down
        if in_networks(hop.ip, trusted):
            continue
        return hop
    return None
