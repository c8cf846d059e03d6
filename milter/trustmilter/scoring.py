"""Symbols -> total score -> action: thresholds from config, forced actions from checks
(strongest wins), shadow mode last."""
from __future__ import annotations

from dataclasses import dataclass

from trustmilter.checks.base import ForcedAction
from trustmilter.config import Config
from trustmilter.types import Action, Symbol


@dataclass(frozen=True)
class Decision:
    action: Action
    score: float
    reason: str
    smtp_code: str | None
    smtp_xcode: str | None
    intended: Action          # what would have been done without shadow mode


def threshold_action(score: float, config: Config) -> Action:
    actions = config.section("actions")
    if score >= float(actions["reject"]):
        return Action.REJECT
    if score >= float(actions["quarantine"]):
        return Action.QUARANTINE
    if score >= float(actions["junk"]):
        return Action.JUNK
    return Action.INBOX


def decide(symbols: list[Symbol], forced: list[ForcedAction], config: Config) -> Decision:
    score = round(sum(s.score for s in symbols), 3)
    action = threshold_action(score, config)
    top = sorted((s for s in symbols if s.score > 0), key=lambda s: -s.score)[:3]
    reason = ""
    if action is not Action.INBOX:
        reason = (f"message scored {score:g} (threshold for {action.value} "
                  f"{float(config.section('actions')[action.value]):g}): "
                  + ", ".join(s.name for s in top))
    code = xcode = None
    # A forced action at least as strong as the score's wins: its reason is the more specific.
    strongest = max(forced, key=lambda f: f.action.rank, default=None)
    if strongest is not None and strongest.action.rank >= action.rank:
        action, reason = strongest.action, strongest.reason
        code, xcode = strongest.smtp_code, strongest.smtp_xcode
    if action is Action.REJECT and code is None:
        code, xcode = "550", "5.7.1"
    if action is Action.TEMPFAIL and code is None:
        code, xcode = "451", "4.7.1"
    intended = action
    if config.section("actions")["shadow"] and action is not Action.INBOX:
        reason = f"shadow mode: would {intended.value}: {reason}"
        action, code, xcode = Action.INBOX, None, None
    return Decision(action, score, reason, code, xcode, intended)
