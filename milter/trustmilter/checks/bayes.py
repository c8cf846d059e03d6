"""Bayes: the message's spam probability from learned token counts, as a symbol per
probability band (BAYES_00 .. BAYES_99, plus BAYES_999 on top for p >= 0.999), scored in
config. Silent until enough ham and spam are learned (bayes.min_ham / bayes.min_spam)."""
from __future__ import annotations

import logging
import time

from trustmilter.checks.base import CheckContext, CheckResult
from trustmilter.content import analyze, features
from trustmilter.content.bayes import TOKENIZER_VERSION, BayesClassifier, BayesSettings
from trustmilter.content.features import Limits

NAME = "bayes"
DEPENDS: tuple[str, ...] = ()
INLINE = True   # no DNS: the pipeline runs it in the evaluating thread
log = logging.getLogger("trustmilter.checks.bayes")

# (lower bound of the band, symbol), highest first; the bands of SpamAssassin's BAYES_nn.
BANDS = ((0.99, "BAYES_99"), (0.95, "BAYES_95"), (0.80, "BAYES_80"), (0.60, "BAYES_60"),
         (0.40, "BAYES_50"), (0.20, "BAYES_40"), (0.05, "BAYES_20"), (0.01, "BAYES_05"),
         (0.0, "BAYES_00"))


def band(probability: float) -> str:
    for lower, name in BANDS:
        if probability >= lower:
            return name
    return "BAYES_00"


def setup(engine) -> None:  # type: ignore[no-untyped-def]
    from trustmilter.content.registry import bayes_section_for, open_bayes_store
    section = bayes_section_for(engine.config)
    model_section = engine.config.data.get("model") or {}

    def build() -> BayesClassifier:
        store = open_bayes_store(section, model_section)
        return BayesClassifier(store, BayesSettings.from_config(section))

    classifier = engine.cached("content.bayes", build)
    tokenizer = classifier.store.meta("tokenizer")
    if tokenizer and tokenizer != TOKENIZER_VERSION:
        log.warning("Bayes database %s was built by tokenizer %s, this is %s: retrain it "
                    "(trustmilter train --bayes-db, or models promote --bayes-db)",
                    classifier.store.path, tokenizer, TOKENIZER_VERSION)
    nspam, nham = classifier.store.totals()
    if nspam < classifier.settings.min_spam or nham < classifier.settings.min_ham:
        log.warning("Bayes has learned %d spam and %d ham; it votes from %d and %d", nspam, nham,
                    classifier.settings.min_spam, classifier.settings.min_ham)
    engine.cached("content.limits", lambda: Limits.from_config(engine.config.data.get("content")))


def warm_up(engine) -> None:  # type: ignore[no-untyped-def]
    """A long-lived process (the milter's workers) reads the token snapshot before its first
    message (``bayes.snapshot_at_start``): ~0.5 s of CPU once, instead of scoring its first
    ``snapshot_after`` messages from SQLite at ~3 times the CPU per lookup."""
    features.warm_up()
    if not engine.config.section(NAME).get("snapshot_at_start", True):
        return
    classifier: BayesClassifier = engine.cached("content.bayes", lambda: _missing())
    started = time.process_time()
    if classifier.store.load_snapshot():
        log.info("Bayes snapshot of %s read: %d tokens in %.2f s CPU", classifier.store.path,
                 classifier.store.snapshot_tokens(), time.process_time() - started)


def run(ctx: CheckContext) -> CheckResult:
    engine = ctx.engine
    classifier: BayesClassifier = engine.cached("content.bayes", lambda: _missing())
    limits: Limits = engine.cached("content.limits", lambda: Limits.from_config(ctx.config.data.get("content")))
    _features, tokens = analyze(ctx.message, limits)
    result = classifier.score_tokens(tokens, explain=3)
    out = CheckResult(outcome=result)
    if result.probability is None:
        return out   # not enough learned to vote
    p = result.probability
    clues = ", ".join(f"{t}={v}" for t, v in result.top)
    reason = f"p={p:.4f} from {result.clues} clues ({clues})"
    out.symbols.append(ctx.symbol(band(p), reason))
    if p >= float(ctx.section("bayes")["extra_band_probability"]):
        out.symbols.append(ctx.symbol("BAYES_999", f"p={p:.5f}"))
    return out


def _missing() -> BayesClassifier:
    raise RuntimeError("Bayes store not set up")
