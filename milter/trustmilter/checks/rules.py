"""YAML rules (trustmilter.rules): runs after every other check, so rules can test their
symbols (DNSBL listings, reputation, Bayes) and authentication outcomes. Each rule that matches
adds its symbol with the rule's score; the strongest ``action`` among them is forced.

The compiled ``RuleSet`` lives in ``engine.state[STATE_KEY]``. ``setup`` loads it and raises on
any rule file error, so the pipeline disables this check loudly instead of running half a rule
set. A reloading milter keeps the last good set with ``keep_last_good(new_engine, old_engine)``
(or validates first with ``trustmilter.rules.loader.load_rule_set(config)`` and installs the
result with ``install``).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from trustmilter.checks.base import CheckContext, CheckResult, ForcedAction
from trustmilter.errors import ConfigError
from trustmilter.rules.engine import Evaluation, RuleSet, strongest_action
from trustmilter.rules.loader import describe, load_rule_set
from trustmilter.types import Action, Symbol

if TYPE_CHECKING:
    from trustmilter.pipeline import Engine

NAME = "rules"
# Every other check in checks.ALL: rules see all their symbols. setup() refuses to run when a
# name here is not a check of the engine (the pipeline would otherwise skip rules silently).
DEPENDS: tuple[str, ...] = ("spf", "dkim", "arc", "iprev", "helo", "dmarc", "dnsbl", "uribl",
                          "bayes", "model", "reputation")
INLINE = True   # no DNS: the pipeline runs it in the evaluating thread
STATE_KEY = "rules.rule_set"

log = logging.getLogger("trustmilter.checks.rules")

_SMTP = {Action.REJECT: ("550", "5.7.1"), Action.TEMPFAIL: ("451", "4.7.1")}


def setup(engine: "Engine") -> None:
    present = {module.NAME for module in engine.checks}
    missing = [name for name in DEPENDS if name not in present]
    if missing:
        raise ConfigError(f"rules depends on checks this engine does not have: "
                          f"{', '.join(missing)} (fix checks.rules.DEPENDS)", key="rules")
    if STATE_KEY not in engine.state:
        rule_set = load_rule_set(engine.config)
        engine.state[STATE_KEY] = rule_set
        log.info("rules: %s", describe(rule_set))


def install(engine: "Engine", rule_set: RuleSet) -> None:
    """Use ``rule_set`` in ``engine`` (and re-enable the check if loading had disabled it)."""
    with engine._lock:
        engine.state[STATE_KEY] = rule_set
    if engine.disabled.get(NAME, "") != "disabled in config":
        engine.disabled.pop(NAME, None)


def keep_last_good(new_engine: "Engine", old_engine: "Engine") -> str | None:
    """After building ``new_engine`` on reload: when its rules failed to load, carry the old
    engine's rule set over and return the error (to log); otherwise None."""
    error = new_engine.disabled.get(NAME)
    if error is None or error == "disabled in config":
        return None
    old = old_engine.state.get(STATE_KEY)
    if isinstance(old, RuleSet):
        install(new_engine, old)
        log.error("rules: reload failed, keeping the previous rule set: %s", error)
    return error


def _rule_set(ctx: CheckContext) -> RuleSet:
    rule_set = ctx.engine.state.get(STATE_KEY)
    if rule_set is None:  # an engine built without setup (tests): load once
        rule_set = ctx.engine.cached(STATE_KEY, lambda: load_rule_set(ctx.config))
    return rule_set  # type: ignore[no-any-return]


def run(ctx: CheckContext) -> CheckResult:
    from trustmilter.content import Limits, analyze

    rule_set = _rule_set(ctx)
    limits = ctx.engine.cached("content.limits",
                               lambda: Limits.from_config(ctx.config.data.get("content")))
    # The content checks already parsed the message (analyze caches on it): shared, not redone.
    evaluation = Evaluation(rule_set, ctx.message, ctx.envelope, ctx.results,
                            lambda: analyze(ctx.message, limits)[0])
    hits = rule_set.evaluate(evaluation)
    out = CheckResult(symbols=[Symbol(h.rule.name, h.rule.score, h.reason) for h in hits])
    forcing = strongest_action(hits)
    if forcing is not None:
        rule = forcing.rule
        assert rule.action is not None
        code, xcode = _SMTP.get(rule.action, (None, None))
        out.forced = ForcedAction(rule.action, rule.reason or rule.description, code, xcode)
    out.outcome = tuple(h.rule.name for h in hits)
    return out
