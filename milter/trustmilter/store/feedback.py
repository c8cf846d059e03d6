"""Corrections from ``trustmilter learn``: when a person says a message was ham or spam, the
reputation of the identities it was authenticated as is corrected too.

Which identities: first the history (by Message-ID: the exact identities and the action we took,
so that verdict is taken back); else our own Authentication-Results header in the delivered copy
(only a header naming our authserv-id, which the milter guarantees is ours: it removes forged
ones); else nothing — a message we never authenticated says nothing about any sender.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trustmilter.message import ParsedMessage
from trustmilter.store.db import StateError
from trustmilter.store.history import HistoryStore
from trustmilter.store.reputation import (ReputationStore, identities_from_authres,
                                          key_builder_for_config, normalise_identities)
from trustmilter.types import Action

if TYPE_CHECKING:
    from trustmilter.config import Config


@dataclass
class Correction:
    source: str                      # "history" | "authentication-results" | "none"
    keys: list[str] = field(default_factory=list)
    changed: int = 0
    previous: str = ""               # the action we had taken, when history knew it
    note: str = ""


class ReputationFeedback:
    """Open once per ``learn`` run; ``correct(raw, label)`` per message; ``close()`` at the end."""

    def __init__(self, config: "Config") -> None:
        self.config = config
        self.store = ReputationStore.from_config(config)
        try:
            self.history: HistoryStore | None = HistoryStore.from_config(config, readonly=True)
            if not self.history.db.exists():
                self.history = None
        except StateError:
            self.history = None
        self._keys = key_builder_for_config(config)

    def correct(self, raw: bytes, label: str) -> Correction:
        if label not in ("ham", "spam"):
            raise ValueError("label must be ham or spam")
        msg = ParsedMessage.parse(raw)
        message_id = (msg.get("Message-ID") or "").strip()
        message_key = message_id or "sha256:" + hashlib.sha256(raw).hexdigest()
        entry = None
        if message_id and self.history is not None:
            try:
                entry = self.history.find_message(message_id)
            except Exception:  # noqa: BLE001 - history only sharpens the correction
                entry = None
        if entry is not None and entry.identities:
            keys = self._keys(entry.identities)
            previous = _action(entry.intended or entry.action)
            changed = self.store.correct(keys, label, previous=previous, previous_time=entry.time,
                                         message_key=message_key)
            return Correction("history", keys, changed, previous.value if previous else "")
        identities: dict[str, Any] = {}
        for value in msg.get_all("Authentication-Results"):
            found = identities_from_authres(value, self.config.authserv_id)
            if found:
                identities = found
                break      # ours is the topmost: the milter adds it above the rest
        identities = normalise_identities(identities)
        if not identities:
            return Correction("none", note="no history entry and none of our "
                                           "Authentication-Results headers")
        keys = self._keys(identities)
        changed = self.store.correct(keys, label, message_key=message_key)
        return Correction("authentication-results", keys, changed)

    def close(self) -> None:
        self.store.close()
        if self.history is not None:
            self.history.close()


def _action(value: str) -> Action | None:
    try:
        return Action(value)
    except ValueError:
        return None
