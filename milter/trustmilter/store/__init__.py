"""State stores. The Bayes token store is an interface (``TokenStore``) with an embedded SQLite
implementation; a Redis backend for sites with several MX hosts implements the same protocol."""
from __future__ import annotations

from typing import Iterable, Protocol, Sequence

Label = str   # "spam" or "ham"


class TokenStore(Protocol):
    """Token counts for Bayes. Every method is safe to call from several threads; ``learn*``
    are for one writer at a time (the ``learn`` command), reads go on while it writes."""

    def totals(self) -> tuple[int, int]:
        """(spam messages learned, ham messages learned)."""

    def counts(self, tokens: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(spam count, ham count) of each known token; unknown tokens are left out. One round
        trip however many tokens."""

    def learned_label(self, digest: str) -> Label | None:
        """The label a message (by digest) was learned as, or None."""

    def learn(self, items: Iterable[tuple[str, Sequence[str], Label]]) -> tuple[int, int]:
        """Learn (digest, tokens, label) items in one transaction. A digest already learned with
        the same label is skipped; with the other label it is moved over (its counts are
        unlearned first). Returns (learned, skipped)."""

    def unlearn(self, items: Iterable[tuple[str, Sequence[str]]]) -> int:
        """Forget (digest, tokens) items that were learned; returns how many were."""

    def close(self) -> None: ...
