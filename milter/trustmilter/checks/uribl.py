"""URIBL / DBL / SURBL: registered domains (Public Suffix List) of the envelope sender, the From
and Reply-To addresses and the links in the body, against the domain lists in ``uribl.lists``.

The header domains come first, then body links in order of appearance, up to
``uribl.max_domains`` distinct domains and ``uribl.max_queries`` lookups per message (a message
with 5,000 links costs no more than one with 20); what is cut off yields ``URIBL_LIMIT``.
Refusal codes (URIBL/SURBL 127.0.0.1, Spamhaus 127.255.255.x, DBL 127.0.1.255), answers outside
127.0.0.0/8, timeouts and SERVFAIL are ``URIBL_BLOCKED`` / ``URIBL_BAD_ANSWER`` /
``URIBL_TEMPFAIL`` and a log line, never a listing.

Body links are read from the content features (parsed once per message and shared with the
Bayes and model scorers): the decoded text and HTML parts, within ``content.max_bytes``."""
from __future__ import annotations

import email.utils
from typing import TYPE_CHECKING

from trustmilter import dnslists
from trustmilter.checks.base import CheckContext, CheckResult
from trustmilter.content import analyze
from trustmilter.content.features import Limits, registered_domain

if TYPE_CHECKING:
    from trustmilter.pipeline import Engine

NAME = "uribl"
DEPENDS: tuple[str, ...] = ()

SOURCES = {"envelope_sender": "envelope sender", "from": "From", "reply_to": "Reply-To",
           "body_urls": "body URL"}
_VALID = frozenset(SOURCES)


def setup(engine: "Engine") -> None:
    section = engine.config.section(NAME)
    bad = [s for s in section.get("sources") or [] if s not in _VALID]
    if bad:
        from trustmilter.errors import ConfigError
        raise ConfigError(f"unknown source(s) {', '.join(map(str, bad))}; known: "
                          f"{', '.join(sorted(_VALID))}", key=f"{NAME}.sources")
    dnslists.cached_lists(engine, NAME, _VALID)


def _address_domain(addr: str) -> str:
    if "@" not in addr:
        return ""
    return addr.rsplit("@", 1)[1].strip().strip(".>").lower()


def candidate_domains(ctx: CheckContext, sources: list[str]) -> list[tuple[str, str]]:
    """(registered domain, source) pairs in priority order, each domain once."""
    seen: dict[str, str] = {}
    skip = {d.strip().lower().rstrip(".") for d in ctx.section(NAME).get("skip_domains") or []}

    def offer(host: str, source: str) -> None:
        domain = registered_domain(host) if host else ""
        if domain and domain not in skip and domain not in seen:
            seen[domain] = source

    msg = ctx.message
    if "envelope_sender" in sources and ctx.envelope.mail_from:
        offer(_address_domain(ctx.envelope.mail_from), "envelope_sender")
    if "from" in sources:
        for domain in msg.from_domains:
            offer(domain, "from")
    if "reply_to" in sources:
        for _name, addr in email.utils.getaddresses(msg.get_all("Reply-To")):
            offer(_address_domain(addr), "reply_to")
    if "body_urls" in sources:
        # The content scorers' parse of this message (computed once, whoever asks first).
        limits: Limits = ctx.engine.cached(
            "content.limits", lambda: Limits.from_config(ctx.config.data.get("content")))
        features, _tokens = analyze(msg, limits)
        for domain in features.link_domains:
            offer(domain, "body_urls")
    return list(seen.items())


def run(ctx: CheckContext) -> CheckResult:
    out = CheckResult(outcome=dnslists.ListOutcome())
    if ctx.envelope.auth_user:
        return out
    section = ctx.section(NAME)
    lists = dnslists.cached_lists(ctx.engine, NAME, _VALID)
    if not lists:
        return out
    candidates = candidate_domains(ctx, [str(s) for s in section.get("sources") or []])
    max_domains, max_queries = int(section["max_domains"]), int(section["max_queries"])
    lookups: list[dnslists.Lookup] = []
    skipped_domains = max(0, len(candidates) - max_domains)
    skipped_queries = 0
    for domain, source in candidates[:max_domains]:
        try:
            label = dnslists.domain_query_label(domain)
        except ValueError:
            continue  # not a name any list could hold (IDNA failure): nothing to ask
        for lst in lists:
            if not lst.serves(source):
                continue
            if len(lookups) >= max_queries:
                skipped_queries += 1
                continue
            lookups.append(dnslists.Lookup(lst, domain, SOURCES[source], f"{label}.{lst.zone}"))
    if skipped_domains or skipped_queries:
        out.outcome.skipped = skipped_queries
        out.symbols.append(ctx.symbol(
            "URIBL_LIMIT", f"{skipped_domains} domain(s) beyond uribl.max_domains={max_domains}, "
                           f"{skipped_queries} lookup(s) beyond uribl.max_queries={max_queries}"))
    if lookups:
        out.symbols.extend(dnslists.run_lookups(ctx, "URIBL", lookups, int(section["threads"]),
                                                out.outcome))
    return out
