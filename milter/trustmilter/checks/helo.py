"""HELO sanity: the name a client gives in HELO/EHLO, checked without DNS (SPF checks the HELO
identity through DNS). Spam engines send bare IPs, single labels, or our own name."""
from __future__ import annotations

import ipaddress

from trustmilter.checks.base import CheckContext, CheckResult

NAME = "helo"
DEPENDS: tuple[str, ...] = ()
INLINE = True   # no DNS: the pipeline runs it in the evaluating thread


def run(ctx: CheckContext) -> CheckResult:
    helo = (ctx.envelope.helo or "").strip()
    out = CheckResult()
    if not helo:
        if ctx.envelope.client_ip:
            out.symbols.append(ctx.symbol("HELO_NONE", "no HELO/EHLO name"))
        return out
    if helo.startswith("[") and helo.endswith("]"):
        literal = helo[1:-1]
        if literal.lower().startswith("ipv6:"):
            literal = literal[5:]
        try:
            lit = ipaddress.ip_address(literal)
        except ValueError:
            out.symbols.append(ctx.symbol("HELO_NOT_FQDN", f"bad address literal {helo}"))
            return out
        ip = ctx.envelope.client_ip
        if ip and ipaddress.ip_address(ip) != lit:
            out.symbols.append(ctx.symbol("HELO_IP_MISMATCH", f"HELO {helo} from {ip}"))
        return out
    try:
        ipaddress.ip_address(helo)
        out.symbols.append(ctx.symbol("HELO_BARE_IP", f"HELO {helo} is an IP without brackets"))
        return out
    except ValueError:
        pass
    name = helo.rstrip(".").lower()
    if "." not in name:
        out.symbols.append(ctx.symbol("HELO_NOT_FQDN", f"HELO {helo} has no dot"))
    ours = {ctx.config.authserv_id.lower()}
    if ctx.envelope.mta_hostname:
        ours.add(ctx.envelope.mta_hostname.lower())
    if name in ours and not _trusted(ctx):
        out.symbols.append(ctx.symbol("HELO_IS_OUR_NAME", f"client claims to be {helo}"))
    return out


def _trusted(ctx: CheckContext) -> bool:
    from trustmilter.received import in_networks
    ip = ctx.envelope.client_ip
    return bool(ip) and in_networks(ip, ctx.engine.trusted_networks)  # type: ignore[arg-type]
