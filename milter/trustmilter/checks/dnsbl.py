"""DNSBL: the SMTP client's address (IPv4 reversed, IPv6 as nibbles, RFC 5782) against the IP
lists in ``dnsbl.lists``. Each list's return codes map to named symbols (Spamhaus ZEN's SBL, XBL
and PBL differ); refusal codes, answers outside 127.0.0.0/8, timeouts and SERVFAIL become
``DNSBL_BLOCKED`` / ``DNSBL_BAD_ANSWER`` / ``DNSBL_TEMPFAIL`` and a log line, never a listing.

Not looked up: private, reserved and other non-global addresses, our trusted networks and relays,
``dnsbl.skip_networks``, and authenticated submissions (a roaming user's dynamic address would be
on every policy list)."""
from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from trustmilter import dnslists
from trustmilter.checks.base import CheckContext, CheckResult
from trustmilter.received import in_networks, parse_ip, parse_networks

if TYPE_CHECKING:
    from trustmilter.pipeline import Engine

NAME = "dnsbl"
DEPENDS: tuple[str, ...] = ()


def setup(engine: "Engine") -> None:
    # Parse once so a bad list definition disables the check loudly at start, not per message.
    dnslists.cached_lists(engine, NAME)
    skip = engine.config.section(NAME).get("skip_networks") or []
    engine.cached(f"{NAME}.skip", lambda: parse_networks([str(s) for s in skip]))


def client_address(ctx: CheckContext) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address worth looking up, or None (with the reason left to the caller)."""
    return parse_ip(ctx.envelope.client_ip)


def run(ctx: CheckContext) -> CheckResult:
    out = CheckResult(outcome=dnslists.ListOutcome())
    addr = client_address(ctx)
    if addr is None or ctx.envelope.auth_user:
        return out
    engine = ctx.engine
    skip = engine.cached(f"{NAME}.skip", lambda: [])
    if (not addr.is_global
            or in_networks(str(addr), engine.trusted_networks + engine.trusted_relays + skip)):
        return out
    section = ctx.section(NAME)
    label = dnslists.ip_query_label(str(addr))
    lookups = [dnslists.Lookup(lst, str(addr), "client IP", f"{label}.{lst.zone}")
               for lst in dnslists.cached_lists(engine, NAME)
               if (lst.ipv4 if addr.version == 4 else lst.ipv6)]
    limit = int(section["max_queries"])
    if len(lookups) > limit:
        out.outcome.skipped = len(lookups) - limit
        out.symbols.append(ctx.symbol("DNSBL_LIMIT", f"{len(lookups) - limit} list(s) not asked: "
                                                     f"dnsbl.max_queries is {limit}"))
        lookups = lookups[:limit]
    if lookups:
        out.symbols.extend(dnslists.run_lookups(ctx, "DNSBL", lookups, int(section["threads"]),
                                                out.outcome))
    return out
