"""Reputation: what earlier verdicts said about this message's authenticated identities (DKIM d=
that passed, the SPF-passed domain, the DMARC-aligned From domain) and its client address
(/32, /24 or /64). Symbols:

  REPUTATION_DOMAIN_BAD    an authenticated domain's history is mostly junk/quarantine/reject
  REPUTATION_DOMAIN_GOOD   its history is ham, long enough, and none of its domains is bad
  REPUTATION_NEW_DOMAIN    none of its authenticated domains (nor their registered domains) was
                           seen before the last ``new_domain_hours`` (only once the database is
                           ``learning_days`` old)
  REPUTATION_IP_BAD/_GOOD  the same for the client address (its /32, else its /24 or /64)
  REPUTATION_UNAVAILABLE   the database could not be read in time (locked, broken): logged

This check only reads (the pipeline is pure). The milter records each verdict after acting on it
(``trustmilter.store.recorder``), and ``learn`` corrects (``trustmilter.store.feedback``).
An unauthenticated From never counts: no DMARC pass, no From key.
"""
from __future__ import annotations

import functools
import logging
import sqlite3
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from trustmilter.checks.base import CheckContext, CheckResult
from trustmilter.checks.outcomes import DKIMOutcome, DMARCOutcome, SPFOutcome
from trustmilter.dnslists import ThrottledLog
from trustmilter.store.db import StateError
from trustmilter.store.reputation import (DOMAIN_KINDS, Policy, ReputationStore, Stats,
                                          identity_keys, normalise_identities, open_reader,
                                          skip_ip_for)
from trustmilter.types import AuthStatus, Envelope

if TYPE_CHECKING:
    from trustmilter.pipeline import Engine

NAME = "reputation"
DEPENDS: tuple[str, ...] = ("spf", "dkim", "dmarc")
INLINE = True   # no DNS: the pipeline runs it in the evaluating thread
log = logging.getLogger("trustmilter.checks.reputation")
_throttled = ThrottledLog(log)
_HOUR = 3600.0
_DAY = 86400.0


def identities_from_results(results: Mapping[str, Any], envelope: Envelope) -> dict[str, Any]:
    """The message's authenticated identities from the check outcomes:
    {"dkim": [d= that passed], "spf": [SPF-passed domain], "dmarc": [DMARC-passed From domain],
    "ip": client address}. Meant for ``Verdict.identities`` (history, reputation, learn)."""
    found: dict[str, Any] = {"dkim": [], "spf": [], "dmarc": []}
    dkim = getattr(results.get("dkim"), "outcome", None)
    if isinstance(dkim, DKIMOutcome):
        found["dkim"] = dkim.passing_domains()
    spf = getattr(results.get("spf"), "outcome", None)
    if isinstance(spf, SPFOutcome) and spf.mailfrom is AuthStatus.PASS and spf.domain:
        found["spf"] = [spf.domain]
    dmarc = getattr(results.get("dmarc"), "outcome", None)
    if isinstance(dmarc, DMARCOutcome) and dmarc.status is AuthStatus.PASS and dmarc.from_domain:
        found["dmarc"] = [dmarc.from_domain]
    if envelope.client_ip:
        found["ip"] = envelope.client_ip
    return normalise_identities(found)


_KEY_PARTS = "reputation.key_parts"


def keys_for(engine: "Engine", ids: dict[str, Any]) -> list[str]:
    """The reputation keys of identities, as the recorder computes them."""
    org_domain, skip = engine.cached(_KEY_PARTS, lambda: _key_parts(engine))
    return identity_keys(ids, org_domain, skip)


def _key_parts(engine: "Engine") -> tuple[Callable[[str], str | None], Callable[[str], bool]]:
    from trustmilter import psl
    orgs = psl.for_engine(engine)
    # The PSL lookup is pure and the same sender domains come back: memoised.
    return (functools.lru_cache(maxsize=4096)(orgs.registrable_domain),
            skip_ip_for(engine.trusted_networks + engine.trusted_relays))


@dataclass
class ReputationOutcome:
    identities: dict[str, Any]
    keys: list[str]
    stats: dict[str, Stats] = field(default_factory=dict)
    error: str = ""


def setup(engine: "Engine") -> None:
    # Validate the thresholds now; the database itself is opened on first use (it may not
    # exist yet on a fresh install, and worker processes must each open their own).
    Policy.from_config(engine.config.section(NAME))


def _store(engine: "Engine") -> ReputationStore:
    return engine.cached("reputation.reader", lambda: open_reader(engine.config))  # type: ignore[no-any-return]


def run(ctx: CheckContext) -> CheckResult:
    ids = identities_from_results(ctx.results, ctx.envelope)
    out = CheckResult(outcome=ReputationOutcome(ids, []))
    if ctx.envelope.auth_user:
        return out      # our own users' submissions: not a sender's reputation
    engine = ctx.engine
    keys = keys_for(engine, ids)
    out.outcome.keys = keys
    if not keys:
        return out
    store = _store(engine)
    try:
        if not store.db.exists():
            return out      # nothing recorded yet
        stats = store.lookup(keys)
        created = engine.cached("reputation.created", store.created)
    except (StateError, sqlite3.Error) as exc:
        out.outcome.error = str(exc)
        _throttled.warning("reputation:unavailable", "reputation: cannot read %s: %s (the message "
                          "is judged without reputation)", store.path, exc)
        out.symbols.append(ctx.symbol("REPUTATION_UNAVAILABLE", f"{type(exc).__name__}: {exc}"[:200]))
        return out
    out.outcome.stats = stats
    policy = store.policy
    now = store.clock()
    out.symbols.extend(_domain_symbols(ctx, ids, keys, stats, policy, now, created))
    out.symbols.extend(_ip_symbols(ctx, keys, stats, policy, now))
    return out


def _domain_symbols(ctx: CheckContext, ids: dict[str, Any], keys: list[str],
                    stats: dict[str, Stats], policy: Policy, now: float,
                    created: float | None) -> list[Any]:
    out = []
    domain_keys = [k for k in keys if k.split(":", 1)[0] in DOMAIN_KINDS]
    judged = [(k, policy.judge(stats[k], now)) for k in domain_keys if k in stats]
    bad = [(k, j) for k, j in judged if j.bad]
    good = [(k, j) for k, j in judged if j.good]
    if bad:
        out.append(ctx.symbol("REPUTATION_DOMAIN_BAD", bad[0][1].reason))
    elif good:
        out.append(ctx.symbol("REPUTATION_DOMAIN_GOOD", good[0][1].reason))
    org_keys = [k for k in keys if k.startswith("org:")]
    learning = created is None or now - created < policy.learning_days * _DAY
    if org_keys and not learning:
        window = policy.new_domain_hours * _HOUR
        seen = [k for k in domain_keys + org_keys
                if k in stats and now - stats[k].first_seen >= window]
        if not seen:
            names = ", ".join(k.split(":", 1)[1] for k in org_keys)
            out.append(ctx.symbol("REPUTATION_NEW_DOMAIN",
                                  f"{names}: first seen within the last "
                                  f"{policy.new_domain_hours:g} h"))
    return out


def _ip_symbols(ctx: CheckContext, keys: list[str], stats: dict[str, Stats], policy: Policy,
                now: float) -> list[Any]:
    # The most specific key with enough history decides (/32 before /24; /64 for IPv6).
    for key in (k for k in keys if k.startswith(("ip:", "net:"))):
        if key not in stats or stats[key].total < policy.min_messages:
            continue
        judgement = policy.judge(stats[key], now)
        if judgement.bad:
            return [ctx.symbol("REPUTATION_IP_BAD", judgement.reason)]
        if judgement.good:
            return [ctx.symbol("REPUTATION_IP_GOOD", judgement.reason)]
        return []
    return []
