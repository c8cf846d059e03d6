from trustmilter.checks.base import ForcedAction
from trustmilter.config import load_config
from trustmilter.scoring import decide
from trustmilter.types import Action, Symbol


def test_thresholds() -> None:
    config = load_config(None, {"actions": {"junk": 5, "quarantine": 10, "reject": 15}})
    assert decide([Symbol("A", 4.9)], [], config).action is Action.INBOX
    assert decide([Symbol("A", 3), Symbol("B", 2)], [], config).action is Action.JUNK
    d = decide([Symbol("A", 10.5)], [], config)
    assert d.action is Action.QUARANTINE and "A" in d.reason
    d = decide([Symbol("A", 20)], [], config)
    assert (d.action, d.smtp_code, d.smtp_xcode) == (Action.REJECT, "550", "5.7.1")


def test_forced_action_wins_when_stronger_and_keeps_its_reason() -> None:
    config = load_config(None)
    forced = ForcedAction(Action.REJECT, "DMARC policy of example.com is reject", "550", "5.7.1")
    d = decide([Symbol("A", 1)], [forced], config)
    assert d.action is Action.REJECT and d.reason.startswith("DMARC policy")
    weak = ForcedAction(Action.JUNK, "p=quarantine")
    d = decide([Symbol("A", 30)], [weak], config)
    assert d.action is Action.REJECT and "scored" in d.reason


def test_tempfail_default_code() -> None:
    d = decide([], [ForcedAction(Action.TEMPFAIL, "DNS failed")], load_config(None))
    assert (d.action, d.smtp_code, d.smtp_xcode) == (Action.TEMPFAIL, "451", "4.7.1")


def test_shadow_mode_never_rejects() -> None:
    config = load_config(None, {"actions": {"shadow": True}})
    d = decide([Symbol("A", 100)], [], config)
    assert d.action is Action.INBOX and d.intended is Action.REJECT and d.smtp_code is None
    assert d.reason.startswith("shadow mode: would reject")
