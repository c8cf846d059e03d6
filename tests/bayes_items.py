"""Learnable items (digest, tokens, label) from the small fixture corpus, for the Bayes tests."""
from __future__ import annotations

from pathlib import Path

from trustmilter.content import analyze
from trustmilter.content.bayes import message_digest
from trustmilter.content.features import Limits
from trustmilter.message import ParsedMessage

SMALL = Path(__file__).resolve().parent / "fixtures" / "corpus-small"


def items(label: str, split: str = "train") -> list[tuple[str, list[str], str]]:
    out = []
    for path in sorted((SMALL / split / label).glob("*.eml")):
        message = ParsedMessage.parse(path.read_bytes())
        out.append((message_digest(message), analyze(message, Limits())[1], label))
    return out
