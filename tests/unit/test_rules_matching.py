"""The rules engine's shortcuts give what the plain way gives: byte search for literal
``contains``, RE2's own Match call instead of the wrapper, per-name header views and facts
computed on demand. Each test compares the shortcut with the plain computation on the same
input."""
from __future__ import annotations

import random
from typing import Any

import pytest

from trustmilter.content.features import extract
from trustmilter.message import ParsedMessage
from trustmilter.rules.engine import (_FACT_GETTERS, MESSAGE_FACTS_BOOL, MESSAGE_FACTS_NUM,
                                      Evaluation, Matcher)
from trustmilter.rules.loader import Limits, _matcher, _Where, rule_set_from_sources
from trustmilter.types import Envelope


def matcher(spec: dict[str, Any]) -> Matcher:
    result = _matcher(spec, _Where("t.yaml", Limits()), 1, "R.match.body")
    assert result is not None
    return result


def plain(m: Matcher) -> Matcher:
    """The same pattern without shortcuts: no literals, the re2 wrapper's search/finditer."""
    out = Matcher(m.pattern, m.min_count, m.source)
    out._match = None
    return out


def texts(alphabet: str, seed: int, count: int = 400) -> list[bytes]:
    rng = random.Random(seed)
    return [("".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))).encode()
            for _ in range(count)]


# --- literal contains -----------------------------------------------------------------------
@pytest.mark.parametrize("contains", [["ab"], ["ab", "abc"], ["abc", "ab"], ["b", "ab"],
                                      ["aa"], ["é", "xé"], ["ca", "a", "bc"]])
def test_literal_contains_finds_what_re2_finds(contains: list[str]) -> None:
    m = matcher({"contains": contains})
    assert m.literals == tuple(c.encode() for c in contains)
    reference = plain(m)
    for data in texts("abcxé ", seed=len(contains)):
        assert m.find(data) == reference.find(data), data


@pytest.mark.parametrize("min_count", [2, 3])
def test_literal_min_count_counts_non_overlapping(min_count: int) -> None:
    m = matcher({"contains": "aa", "min_count": min_count})
    reference = plain(m)
    for data in texts("ab", seed=min_count) + [b"aaa", b"aaaa", b"aaaaa", b"aabaa"]:
        assert m.find(data) == reference.find(data), data


def test_literal_shortcut_only_for_case_sensitive_contains_alone() -> None:
    assert matcher({"contains": "ab", "nocase": True}).literals is None
    assert matcher({"contains": "ab", "regex": "x+"}).literals is None
    assert matcher({"equals": "ab"}).literals is None
    assert matcher({"regex": "ab"}).literals is None
    # Several literals with min_count: RE2 counts them (the shortcut answers min_count 1).
    m = matcher({"contains": ["ab", "b"], "min_count": 2})
    for data in texts("ab", seed=7):
        assert m.find(data) == plain(m).find(data)


# --- RE2's Match called directly ------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    {"regex": r"\bverify (?:your|the) account\b", "nocase": True},
    {"regex": "a*"},                       # empty matches
    {"regex": r"\A\s*\z"},
    {"equals": ""},
    {"regex": "é+", "min_count": 2},
    {"contains": ["b", "ab"], "nocase": True},
])
def test_direct_match_quotes_what_the_wrapper_quotes(spec: dict[str, Any]) -> None:
    m = matcher(spec)
    assert m._match is not None        # this google-re2 has the binding's Match
    reference = plain(m)
    for data in texts("aAbé ", seed=3) + [b"Verify YOUR account now", b"", b"   "]:
        assert m.find(data) == reference.find(data), data


# --- per-message views ----------------------------------------------------------------------
def test_every_message_fact_has_a_getter() -> None:
    assert set(_FACT_GETTERS) == MESSAGE_FACTS_BOOL | MESSAGE_FACTS_NUM


def test_header_views_by_name_in_message_order() -> None:
    raw = (b"Received: from a\n by b; Mon, 1 Jan 2024 00:00:00 +0000\nX-T: =?utf-8?q?caf=C3=A9?=\n"
           b"x-t: two\nSubject: s\n\nbody\n")
    parsed = ParsedMessage.parse(raw)
    rule_set = rule_set_from_sources({}, {})
    ev = Evaluation(rule_set, parsed, Envelope(), {}, lambda: extract(parsed))
    assert ev.header_values("x-t", raw=False) == ["café", "two"]
    assert ev.header_values("x-t", raw=True) == ["=?utf-8?q?caf=C3=A9?=", "two"]
    assert ev.header_data("x-t", raw=False) == ["café".encode(), b"two"]
    assert ev.header_values("received", raw=True) == ["from a by b; Mon, 1 Jan 2024 00:00:00 +0000"]
    assert ev.has_header("subject") and not ev.has_header("date")
    assert ev.header_values("date", raw=True) == [] and ev.header_data("date", raw=False) == []
