"""The scikit-learn content model: ML_SPAM or ML_HAM, each with a strength between 0 and 1 that
scales its configured score. Strength grows with the log-odds of the calibrated probability and
is 1 at ``model.full_strength_probability`` (or its ham mirror image), so the symbol says both
which side the model is on and how sure it is."""
from __future__ import annotations

import math

from trustmilter.checks.base import CheckContext, CheckResult
from trustmilter.content import analyze, features
from trustmilter.content.features import Limits
from trustmilter.types import Symbol

NAME = "model"
DEPENDS: tuple[str, ...] = ()
INLINE = True   # no DNS: the pipeline runs it in the evaluating thread


def setup(engine) -> None:  # type: ignore[no-untyped-def]
    from trustmilter.content.registry import resolve_model_path, shared_model
    section = engine.config.section("model")
    engine.cached("content.model", lambda: shared_model(resolve_model_path(section)))
    engine.cached("content.limits", lambda: Limits.from_config(engine.config.data.get("content")))


def warm_up(engine) -> None:  # type: ignore[no-untyped-def]
    """What content analysis builds on first use, built before a worker's first message."""
    features.warm_up()


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


def strength(probability: float, spam_probability: float, full: float) -> tuple[bool, float]:
    """(is spam side, strength in [0, 1])."""
    pivot = _logit(spam_probability)
    span = max(_logit(full) - pivot, 1e-6)
    z = _logit(probability) - pivot
    if z >= 0:
        return True, min(1.0, z / span)
    return False, min(1.0, -z / span)


def run(ctx: CheckContext) -> CheckResult:
    engine = ctx.engine
    model = engine.cached("content.model", lambda: _missing())
    limits: Limits = engine.cached("content.limits", lambda: Limits.from_config(ctx.config.data.get("content")))
    features, tokens = analyze(ctx.message, limits)
    p = model.probability(features, tokens)
    section = ctx.section("model")
    is_spam, s = strength(p, float(section["spam_probability"]), float(section["full_strength_probability"]))
    name = "ML_SPAM" if is_spam else "ML_HAM"
    base = ctx.symbol(name)
    reason = f"p={p:.4f} strength {s:.2f} (model {model.name})"
    return CheckResult(symbols=[Symbol(name, round(base.score * s, 3), reason)], outcome=p)


def _missing() -> object:
    raise RuntimeError("content model not set up")
