"""BayesClassifier.score_tokens works each (spam, ham) pair out once and sorts shared clue tuples
instead of one tuple per token: its results must be exactly (==, not approx) those of the plain
SpamBayes loop below, the probability, the clue count and the named top clues, with many tied
clues and the cut at max_discriminators falling among ties, and after the totals move."""
from __future__ import annotations

import heapq
import math
from pathlib import Path

import pytest

from trustmilter.content.bayes import BayesClassifier, BayesResult, BayesSettings, chi2q
from trustmilter.store.sqlite import SQLiteTokenStore

from tests.bayes_items import items as _items




def reference(store: SQLiteTokenStore, s: BayesSettings, tokens: list[str], explain: int) -> BayesResult:
    """The classifier as it was written first: one (distance, prob, token) per token, nlargest."""
    nspam, nham = store.totals()
    if nspam < s.min_spam or nham < s.min_ham:
        return BayesResult(None, nspam=nspam, nham=nham)
    scored = []
    for token, (spam, ham) in store.counts(tokens).items():
        spam_ratio = spam / nspam if nspam else 0.0
        ham_ratio = ham / nham if nham else 0.0
        denom = spam_ratio + ham_ratio
        prob = spam_ratio / denom if denom else s.unknown_word_prob
        n = spam + ham
        prob = (s.unknown_word_strength * s.unknown_word_prob + n * prob) / (s.unknown_word_strength + n)
        distance = abs(prob - 0.5)
        if distance >= s.minimum_prob_strength:
            scored.append((distance, prob, token))
    clues = heapq.nlargest(s.max_discriminators, scored)
    if not clues:
        return BayesResult(0.5, 0, nspam, nham)
    ln_h = ln_s = 0.0
    for _d, prob, _t in clues:
        prob = min(max(prob, 1e-12), 1 - 1e-12)
        ln_h += math.log(prob)
        ln_s += math.log(1.0 - prob)
    n = len(clues)
    probability = ((1.0 - chi2q(-2.0 * ln_s, 2 * n)) - (1.0 - chi2q(-2.0 * ln_h, 2 * n)) + 1.0) / 2.0
    return BayesResult(probability, n, nspam, nham, [(t, round(p, 3)) for _d, p, t in clues[:explain]])


SETTINGS = [BayesSettings(min_spam=5, min_ham=5),
            BayesSettings(min_spam=5, min_ham=5, max_discriminators=7),      # cut among ties
            BayesSettings(min_spam=5, min_ham=5, max_discriminators=1),
            BayesSettings(min_spam=5, min_ham=5, max_discriminators=0),
            BayesSettings(min_spam=5, min_ham=5, minimum_prob_strength=0.0),  # every token a clue
            BayesSettings(min_spam=5, min_ham=5, minimum_prob_strength=0.45),
            BayesSettings(min_spam=5, min_ham=5, unknown_word_strength=1.0, unknown_word_prob=0.4),
            BayesSettings(min_spam=500, min_ham=5)]                          # does not vote


@pytest.mark.parametrize("snapshot", [False, True], ids=["sqlite", "snapshot"])
@pytest.mark.parametrize("settings", SETTINGS, ids=range(len(SETTINGS)))
def test_scores_are_exactly_the_plain_loops(tmp_path: Path, settings: BayesSettings,
                                            snapshot: bool) -> None:
    """With ``snapshot`` the classifier scores through the snapshot's count pairs
    (``_score_pairs``), checked to be the path taken."""
    store = SQLiteTokenStore(tmp_path / "bayes.sqlite")
    train = _items("ham", "train") + _items("spam", "train")
    store.learn(train[::2])
    messages = [t for _d, t, _l in _items("ham", "eval") + _items("spam", "eval") + train]
    duplicated = messages[0] + messages[0][:7]
    classifier = BayesClassifier(store, settings)
    ties = 0
    for round_no in range(2):        # the second round after learning more: the totals moved
        if snapshot:
            assert store.load_snapshot()
        for tokens in messages + [[], ["never-seen"], duplicated]:
            if snapshot:
                assert store.pair_rows(list(dict.fromkeys(tokens))) is not None
            for explain in (0, 3, 1000):
                got = classifier.score_tokens(tokens, explain=explain)
                want = reference(store, settings, tokens, explain)
                assert (got.probability, got.clues, got.nspam, got.nham, got.top) == (
                    want.probability, want.clues, want.nspam, want.nham, want.top)
            counts = list(store.counts(tokens).values())
            ties += len(counts) - len(set(counts))
        if round_no == 0:
            store.learn(train[1::2])
    assert ties > 100     # many tokens share their counts, so the order among ties is exercised
