"""Content scoring: message features parsed once (``features``), the mail tokenizer
(``tokenize``), Bayes (``bayes``) and the scikit-learn model (``model``), shared by the ``bayes``
and ``model`` checks, ``trustmilter train|learn|evaluate|models`` and the benchmarks."""
from __future__ import annotations

import threading

from trustmilter.content.features import Limits, MessageFeatures, extract
from trustmilter.content.tokenize import tokenize
from trustmilter.message import ParsedMessage

_lock = threading.Lock()
_KEY = "_trustmilter_content"


def analyze(message: ParsedMessage, limits: Limits) -> tuple[MessageFeatures, list[str]]:
    """Features and tokens of a message, computed once however many checks ask (checks run in
    threads: the first asker computes, the others wait and reuse)."""
    cached = message.__dict__.get(_KEY)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    with _lock:
        cached = message.__dict__.get(_KEY)
        if cached is None:
            features = extract(message, limits)
            cached = (features, tokenize(features))
            message.__dict__[_KEY] = cached
    return cached  # type: ignore[no-any-return]


__all__ = ["Limits", "MessageFeatures", "analyze", "extract", "tokenize"]
