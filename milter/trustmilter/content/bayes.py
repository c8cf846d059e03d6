"""Bayes, our own: SpamBayes' classifier (Gary Robinson's token probabilities and Fisher's
chi-square combining) over the mail tokenizer, with counts in a ``TokenStore``.

For each token, p = (spam ratio) / (spam ratio + ham ratio), where a ratio is the token's count
over the number of messages learned in that class; it is pulled toward 0.5 by Robinson's
adjustment f = (s*x + n*p) / (s + n) for tokens seen n times. The ``max_discriminators`` tokens
farthest from 0.5 (and at least ``minimum_prob_strength`` from it) are combined twice with
Fisher's method: H tests "all clues are hammy", S "all clues are spammy"; the message's spam
probability is (S - H + 1) / 2. Near 0 or 1 when the clues agree, near 0.5 when they conflict.
"""
from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import is_
from typing import Any, Sequence

import numpy as np

from trustmilter.content.features import MessageFeatures
from trustmilter.content.tokenize import tokenize
from trustmilter.message import ParsedMessage
from trustmilter.store import TokenStore

TOKENIZER_VERSION = "2"
# Distinct (spam, ham) pairs memoized before starting over, ~250 bytes each: a database of 400k
# tokens from 5000 messages has 3.5k pairs; this bounds the memo (~16 MB) for far bigger ones.
_MAX_PAIRS = 65_536


@dataclass(frozen=True)
class BayesSettings:
    unknown_word_strength: float = 0.45   # s: how much weight the prior 0.5 has (SpamBayes)
    unknown_word_prob: float = 0.5        # x: the prior of a token never seen
    minimum_prob_strength: float = 0.1    # tokens closer than this to 0.5 are not clues
    max_discriminators: int = 150         # clues used per message
    min_spam: int = 200                   # messages learned per class before Bayes votes
    min_ham: int = 200

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> "BayesSettings":
        return cls(unknown_word_strength=float(section.get("unknown_word_strength", 0.45)),
                   unknown_word_prob=float(section.get("unknown_word_prob", 0.5)),
                   minimum_prob_strength=float(section.get("minimum_prob_strength", 0.1)),
                   max_discriminators=int(section.get("max_discriminators", 150)),
                   min_spam=int(section.get("min_spam", 200)),
                   min_ham=int(section.get("min_ham", 200)))


@dataclass
class BayesResult:
    probability: float | None          # None: not enough learned to vote
    clues: int = 0
    nspam: int = 0
    nham: int = 0
    top: list[tuple[str, float]] = field(default_factory=list)   # strongest clues, for reasons


def message_digest(message: ParsedMessage) -> str:
    """What makes a message "the same message" for learn/unlearn: its Message-ID, From, Date,
    Subject and body, but not the trace headers each delivery adds (Received, Delivered-To)."""
    h = hashlib.sha256()
    for name in ("Message-ID", "From", "Date", "Subject"):
        h.update((message.get(name) or "").encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    h.update(memoryview(message.raw)[message.body_offset:])   # no copy of a huge body
    return h.hexdigest()[:40]


def chi2q(x2: float, v: int) -> float:
    """P(chi-square with v degrees of freedom >= x2), v even (SpamBayes' chi2Q)."""
    m = x2 / 2.0
    term = math.exp(-m)
    total = term
    for i in range(1, v // 2):
        term *= m / i
        total += term
    return min(total, 1.0)


# A clue's (distance from 0.5, probability, ln(clamped p), ln(1 - clamped p)); a token too close
# to 0.5 to be a clue gets NO_CLUE, which is falsy (as a miss, None, is too, but it is no clue).
Clue = tuple[float, float, float, float]
NO_CLUE: tuple[()] = ()


class BayesClassifier:
    def __init__(self, store: TokenStore, settings: BayesSettings | None = None) -> None:
        self.store = store
        self.settings = settings or BayesSettings()
        # A token's clue depends only on its (spam, ham) counts and the totals, and a database
        # holds a few thousand distinct pairs: each is worked out once per totals, not once per
        # token of every message.
        self._clues: dict[tuple[int, int], Clue | tuple[()]] = {}
        self._clues_totals = (-1, -1)
        # The same per count pair of a store's snapshot, as arrays: (snapshot, totals, table).
        self._pair_table: tuple[Any, tuple[int, int], tuple[np.ndarray, ...]] | None = None

    def token_probability(self, spam: int, ham: int, nspam: int, nham: int) -> float:
        s = self.settings
        spam_ratio = spam / nspam if nspam else 0.0
        ham_ratio = ham / nham if nham else 0.0
        denom = spam_ratio + ham_ratio
        prob = spam_ratio / denom if denom else s.unknown_word_prob
        n = spam + ham
        return (s.unknown_word_strength * s.unknown_word_prob + n * prob) / (s.unknown_word_strength + n)

    def _clue(self, spam: int, ham: int, nspam: int, nham: int) -> Clue | tuple[()]:
        prob = self.token_probability(spam, ham, nspam, nham)
        distance = abs(prob - 0.5)
        if distance < self.settings.minimum_prob_strength:
            return NO_CLUE
        clamped = min(max(prob, 1e-12), 1 - 1e-12)
        return (distance, prob, math.log(clamped), math.log(1.0 - clamped))

    def score_tokens(self, tokens: Sequence[str], *, explain: int = 0) -> BayesResult:
        nspam, nham = self.store.totals()
        s = self.settings
        if nspam < s.min_spam or nham < s.min_ham:
            return BayesResult(None, nspam=nspam, nham=nham)
        pair_rows = getattr(self.store, "pair_rows", None)
        if pair_rows is not None:
            distinct = (tokens if isinstance(tokens, list) and len(set(tokens)) == len(tokens)
                        else list(dict.fromkeys(tokens)))
            rows = pair_rows(distinct)
            if rows is not None and rows.snapshot.state[:2] == (nspam, nham):
                return self._score_pairs(distinct, rows, nspam, nham, explain)
        counts = self.store.counts(tokens)
        memo = self._clues
        if self._clues_totals != (nspam, nham) or len(memo) > _MAX_PAIRS:
            memo = self._clues = {}
            self._clues_totals = (nspam, nham)
        # map/filter/compress rather than a Python loop: this runs for every known token of
        # every message, and after the first messages nearly every pair is in the memo.
        pairs = list(counts.values())
        found: list[Clue | tuple[()] | None] = list(map(memo.get, pairs))
        for i in list(compress(range(len(found)), map(is_, found, repeat(None)))):   # new pairs
            spam, ham = pair = pairs[i]
            clue = memo.get(pair)
            found[i] = memo[pair] = self._clue(spam, ham, nspam, nham) if clue is None else clue
        scored: list[Clue] = list(filter(None, found))   # type: ignore[arg-type]
        # The strongest clues by (distance, probability). Tokens with equal (distance,
        # probability) have equal logs, so which of them make the cut and in which order they
        # are summed cannot change the sums; only ``top`` names tokens (below).
        scored.sort(reverse=True)
        clues = scored[:max(s.max_discriminators, 0)]
        if not clues:
            return BayesResult(0.5, 0, nspam, nham)
        # Sum logs rather than multiply: 150 small probabilities underflow a float. A plain
        # loop, not sum(): Python 3.12's sum() of floats rounds differently.
        ln_h = ln_s = 0.0
        for clue in clues:
            ln_h += clue[2]
            ln_s += clue[3]
        n = len(clues)
        spamminess = 1.0 - chi2q(-2.0 * ln_s, 2 * n)
        hamminess = 1.0 - chi2q(-2.0 * ln_h, 2 * n)
        probability = (spamminess - hamminess + 1.0) / 2.0
        top: list[tuple[str, float]] = []
        if explain > 0:
            # The strongest by (distance, probability, token): only tokens at least as strong
            # as the explain-th clue can be among them (NO_CLUE sorts below any floor).
            k = min(explain, len(clues))
            floor = clues[k - 1][:2]
            strong = [(clue[0], clue[1], token) for token, clue in
                      compress(zip(counts, found), map(floor.__le__, found))]   # type: ignore[index]
            top = [(t, round(p, 3)) for _d, p, t in heapq.nlargest(k, strong)]
        return BayesResult(probability, n, nspam, nham, top)

    def _score_pairs(self, tokens: list[str], rows: Any, nspam: int, nham: int,
                     explain: int) -> BayesResult:
        """``score_tokens`` over a snapshot's answer, in a few array operations: the same
        clues (each count pair's, worked out by ``_clue``), the same order, the same sums
        (summed one after the other in that order), so the same result to the last bit."""
        is_clue, distance, probability, ln_ham, ln_spam = self._pair_clues(rows.snapshot, nspam, nham)
        keep = is_clue[rows.pairs]
        pairs = rows.pairs[keep]
        d, p = distance[pairs], probability[pairs]
        # Strongest first by (distance, probability); equal pairs of those have equal logs, so
        # neither the order among them nor which of them make the cut can change the sums.
        order = np.lexsort((p, d))[::-1][:max(self.settings.max_discriminators, 0)]
        n = int(order.size)
        if not n:
            return BayesResult(0.5, 0, nspam, nham)
        chosen = pairs[order]
        ln_h = ln_s = 0.0
        for value in ln_ham[chosen].tolist():
            ln_h += value
        for value in ln_spam[chosen].tolist():
            ln_s += value
        spamminess = 1.0 - chi2q(-2.0 * ln_s, 2 * n)
        hamminess = 1.0 - chi2q(-2.0 * ln_h, 2 * n)
        result = BayesResult((spamminess - hamminess + 1.0) / 2.0, n, nspam, nham)
        if explain > 0:
            k = min(explain, n)
            floor_d, floor_p = d[order[k - 1]], p[order[k - 1]]
            strong = np.flatnonzero((d > floor_d) | ((d == floor_d) & (p >= floor_p)))
            where = rows.where[keep][strong]
            candidates = zip(d[strong].tolist(), p[strong].tolist(),
                             map(tokens.__getitem__, where.tolist()))
            result.top = [(t, round(pv, 3)) for _d, pv, t in heapq.nlargest(k, candidates)]
        return result

    def _pair_clues(self, snapshot: Any, nspam: int, nham: int) -> tuple[np.ndarray, ...]:
        """(is a clue, distance, probability, ln p, ln(1 - p)) of each of the snapshot's count
        pairs, by ``_clue`` itself: once per snapshot (a few ms for the shipped database)."""
        cached = self._pair_table
        if cached is not None and cached[0] is snapshot and cached[1] == (nspam, nham):
            return cached[2]  # type: ignore[no-any-return]
        size = int(snapshot.pair_spam.size)
        is_clue = np.zeros(size, dtype=bool)
        values = np.zeros((4, size), dtype=np.float64)
        clue = self._clue
        for i, (spam, ham) in enumerate(zip(snapshot.pair_spam.tolist(),
                                            snapshot.pair_ham.tolist())):
            found = clue(spam, ham, nspam, nham)
            if found:
                is_clue[i] = True
                values[:, i] = found
        table = (is_clue, values[0], values[1], values[2], values[3])
        self._pair_table = (snapshot, (nspam, nham), table)
        return table

    def score(self, features: MessageFeatures, *, explain: int = 0) -> BayesResult:
        return self.score_tokens(tokenize(features), explain=explain)
