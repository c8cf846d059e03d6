"""iprev (RFC 8601 3): the client IP's PTR names, each confirmed by a forward lookup that leads
back to the IP. pass = some name confirms; fail = names exist but none confirms (or no PTR);
temperror = DNS failed before we could tell."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from authres import IPRevAuthenticationResult

from trustmilter.checks.base import CheckContext, CheckResult
from trustmilter.errors import DNSPermError, DNSTempError
from trustmilter.types import AuthStatus

NAME = "iprev"
DEPENDS: tuple[str, ...] = ()
MAX_PTR = 10   # RFC 8601 leaves it to us; bound the work on hostile PTR sets


@dataclass(frozen=True)
class IPRevOutcome:
    status: AuthStatus
    name: str | None          # the confirmed name (policy.iprev)
    ptr_names: tuple[str, ...]


def lookup(ctx: CheckContext, ip: str) -> IPRevOutcome:
    try:
        names = ctx.dns.ptr(ip)
    except DNSTempError:
        return IPRevOutcome(AuthStatus.TEMPERROR, None, ())
    except DNSPermError:
        return IPRevOutcome(AuthStatus.PERMERROR, None, ())
    if not names:
        return IPRevOutcome(AuthStatus.FAIL, None, ())
    want = ipaddress.ip_address(ip)
    rdtype = "A" if want.version == 4 else "AAAA"
    temp = False
    for name in names[:MAX_PTR]:
        try:
            answers = ctx.dns.query(name, rdtype).records
        except DNSTempError:
            temp = True
            continue
        except DNSPermError:
            continue
        if any(ipaddress.ip_address(str(a)) == want for a in answers):
            return IPRevOutcome(AuthStatus.PASS, name.lower(), tuple(names))
    return IPRevOutcome(AuthStatus.TEMPERROR if temp else AuthStatus.FAIL, None, tuple(names))


def run(ctx: CheckContext) -> CheckResult:
    ip = ctx.envelope.client_ip
    if not ip:
        return CheckResult(symbols=[ctx.symbol("IPREV_NA", "client IP unknown")])
    outcome = lookup(ctx, ip)
    if outcome.status is AuthStatus.PASS:
        symbol = ctx.symbol("IPREV_PASS", f"{ip} <-> {outcome.name}")
    elif outcome.status is AuthStatus.TEMPERROR:
        symbol = ctx.symbol("IPREV_TEMPERROR", f"DNS failed for {ip}")
    elif not outcome.ptr_names:
        symbol = ctx.symbol("IPREV_NONE", f"no PTR for {ip}")
    else:
        symbol = ctx.symbol("IPREV_FAIL", f"PTR {', '.join(outcome.ptr_names[:3])} does not "
                                          f"resolve back to {ip}")
    ar = IPRevAuthenticationResult(result=outcome.status.value, policy_iprev=ip,
                                   policy_iprev_comment=outcome.name)
    return CheckResult(symbols=[symbol], authres=[ar], outcome=outcome)
