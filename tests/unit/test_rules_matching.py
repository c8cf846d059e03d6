"""The rules engine's shortcuts give what the plain way gives: byte search for literal
``contains``, RE2's own Match call instead of the wrapper, one RE2 set per body part instead of
one search per pattern, per-name header views and facts computed on demand, parent domains
found by slicing. Each test compares the shortcut with the plain computation on the same
input."""
from __future__ import annotations

import random
from typing import Any

import pytest
import re2

from trustmilter.content.features import extract
from trustmilter.message import ParsedMessage
from trustmilter.rules import engine
from trustmilter.rules.engine import (_FACT_GETTERS, MESSAGE_FACTS_BOOL, MESSAGE_FACTS_NUM, Body,
                                      Evaluation, Matcher, PatternSet, walk)
from trustmilter.rules.loader import Limits, _matcher, _Where, load_rule_set, rule_set_from_sources
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


# --- one RE2 set per body part --------------------------------------------------------------
SHIPPED = load_rule_set(None, local=None)


def shipped_text_bodies() -> list[Body]:
    seen: dict[int, Body] = {}
    for rule in SHIPPED.rules:
        for cond in walk(rule.condition):
            if isinstance(cond, Body) and cond.part == "text":
                seen[id(cond)] = cond
    return list(seen.values())


SAMPLES = [
    b"Please verify your account and confirm your password now",
    b"URGENT: buy 3 gift cards right away and send photos of the back",
    b"You have won the lottery winner prize! Claim your prize!!! now!!! ok!!!",
    b"I recorded you with your webcam. Pay 1000 USD to bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq",
    b"The late client left US$ 12.5 million; you are the next of kin",
    b"Our bank details have changed: please send the invoice payment to the new IBAN",
    b"Cheap V1AGRA and cialis, viagra!",
    b"Just a normal note about lunch.",
    "VERIFY YOUR ACCOUNT — Ünïcode text".encode(),
    b"",
]


def test_shipped_body_patterns_share_a_set() -> None:
    bodies = shipped_text_bodies()
    assert len(bodies) >= engine.SET_MIN_PATTERNS
    assert all(b.slot is not None for b in bodies)
    assert len({id(b.slot[0]) for b in bodies}) == 1          # type: ignore[index]


@pytest.mark.parametrize("data", SAMPLES + texts("aceginorstuvwy !", seed=11, count=50))
def test_set_says_exactly_which_patterns_occur(data: bytes) -> None:
    bodies = shipped_text_bodies()
    pattern_set = bodies[0].slot[0]                            # type: ignore[index]
    found = pattern_set.match(data)
    assert found is not None and 0 in found
    for body in bodies:
        occurs = body.matcher.pattern.search(data) is not None
        assert (body.slot[1] in found) == occurs, (body.matcher.source, data)  # type: ignore[index]


def test_patterns_with_options_a_set_cannot_reproduce_stay_out() -> None:
    options = re2.Options()
    options.longest_match = True
    odd = Matcher(re2.compile(b"a|ab", options), 1, "regex 'a|ab'")
    plain_ones = [matcher({"regex": f"x{i}+"}) for i in range(3)]
    bodies = [Body("text", m) for m in [odd, *plain_ones]]
    (pattern_set,) = engine.build_pattern_sets(bodies, 1 << 20)
    assert bodies[0].slot is None
    assert [b.slot[1] for b in bodies[1:]] == [1, 2, 3]        # type: ignore[index]


def test_set_keeps_each_patterns_case_rule() -> None:
    ms = [matcher({"regex": "abc"}), matcher({"regex": "abc", "nocase": True}),
          matcher({"contains": "X.Y", "nocase": True})]
    pattern_set = PatternSet("text", ms, 1 << 22)
    assert pattern_set.match(b"ABC x.y") == frozenset({0, 2, 3})
    assert pattern_set.match(b"abc") == frozenset({0, 1, 2})
    assert pattern_set.match(b"xay") == frozenset({0})        # the dot is a literal dot


RULES = "".join(
    f"B{i}:\n  description: body {i}\n  score: 1\n  match:\n"
    f"    all:\n      - body: {{regex: '{pattern}', nocase: true}}\n"
    f"      - body: {{contains: '{word}'}}\n"
    for i, (pattern, word) in enumerate([("wire (?:transfer|money)", "now"),
                                         (r"\bprize\b", "claim"),
                                         ("gift ?cards?", "urgent"),
                                         ("[0-9]{3,}", "!")]))


def hits(raw: bytes) -> list[tuple[str, str]]:
    rule_set = rule_set_from_sources({"t.yaml": RULES}, {})
    parsed = ParsedMessage.parse(raw)
    ev = Evaluation(rule_set, parsed, Envelope(), {}, lambda: extract(parsed))
    return [(h.rule.name, h.reason) for h in rule_set.evaluate(ev)]


MESSAGES = [b"Subject: x\n\nPlease WIRE MONEY now, claim the PRIZE, urgent: giftcards 12345!\n",
            b"Subject: y\n\nNothing to see.\n",
            b"Subject: z\n\nwire transfer later; prize claimed\n"]


@pytest.mark.parametrize("raw", MESSAGES)
def test_rules_fire_the_same_with_and_without_sets(raw: bytes,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with_sets = hits(raw)
    monkeypatch.setattr(engine, "SET_MIN_PATTERNS", 10**9)
    assert hits(raw) == with_sets


@pytest.mark.parametrize("raw", MESSAGES)
def test_a_set_that_cannot_answer_leaves_the_searches(raw: bytes,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """RE2::Set reports no match at all when its DFA runs out of memory: the witness pattern is
    then missing too, and every condition searches on its own."""
    expected = hits(raw)

    class Failing:
        def Match(self, data: bytes) -> list[int]:
            return []

    real_init = PatternSet.__init__

    def init(self: PatternSet, *args: Any) -> None:
        real_init(self, *args)
        self._set = Failing()

    monkeypatch.setattr(PatternSet, "__init__", init)
    assert PatternSet("text", [matcher({"regex": "a"})], 1 << 20).match(b"a") is None
    assert hits(raw) == expected


def test_a_set_re2_refuses_leaves_the_searches(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = hits(MESSAGES[0])

    def refuse(*args: Any) -> None:
        raise re2.error("failed to compile Set")

    monkeypatch.setattr(PatternSet, "__init__", refuse)
    rule_set = rule_set_from_sources({"t.yaml": RULES}, {})
    assert rule_set.pattern_sets == []
    assert hits(MESSAGES[0]) == expected


# --- per-message views ----------------------------------------------------------------------
def test_every_message_fact_has_a_getter() -> None:
    assert set(_FACT_GETTERS) == MESSAGE_FACTS_BOOL | MESSAGE_FACTS_NUM


def test_header_views_by_name_in_message_order() -> None:
    raw = (b"Received: from a\n by b; Mon, 1 Jan 2024 00:00:00 +0000\nX-T: =?utf-8?q?caf=C3=A9?=\n"
           b"x-t: two\nSubject: s\n\nbody\n")
    parsed = ParsedMessage.parse(raw)
    rule_set = rule_set_from_sources({"t.yaml": RULES}, {})
    ev = Evaluation(rule_set, parsed, Envelope(), {}, lambda: extract(parsed))
    assert ev.header_values("x-t", raw=False) == ["café", "two"]
    assert ev.header_values("x-t", raw=True) == ["=?utf-8?q?caf=C3=A9?=", "two"]
    assert ev.header_data("x-t", raw=False) == ["café".encode(), b"two"]
    assert ev.header_values("received", raw=True) == ["from a by b; Mon, 1 Jan 2024 00:00:00 +0000"]
    assert ev.has_header("subject") and not ev.has_header("date")
    assert ev.header_values("date", raw=True) == [] and ev.header_data("date", raw=False) == []


def test_domain_in_is_the_split_and_join_test() -> None:
    from trustmilter.rules.engine import _domain_in

    def reference(host: str, registered: str, domains: frozenset[str]) -> bool:
        if registered in domains or host in domains:
            return True
        parts = host.split(".")
        return any(".".join(parts[i:]) in domains for i in range(1, len(parts) - 1))

    rng = random.Random(1035)
    labels = ["a", "b", "com", "co", "uk", "", "x-y"]
    domains = frozenset({"b.com", "com", "co.uk", ".b.com", "com.", "a.b", "b", ""})
    for _ in range(5000):
        host = ".".join(rng.choice(labels) for _ in range(rng.randrange(1, 6)))
        registered = rng.choice(["", host, "b.com", "zz"])
        assert _domain_in(host, registered, domains) == reference(host, registered, domains), host


def test_symbol_note_names_the_first_present_symbol_in_name_order() -> None:
    from trustmilter.checks.base import CheckResult
    from trustmilter.types import Symbol
    rules = ("R:\n  description: r\n  score: 1\n  match:\n"
             "    symbol: [ZZ_LISTED, BB_LISTED, AA_ABSENT, CC_LISTED]\n")
    rule_set = rule_set_from_sources({"t.yaml": rules}, {})
    parsed = ParsedMessage.parse(b"Subject: s\n\nbody\n")
    results = {"dnsbl": CheckResult(symbols=[Symbol(n, 1.0) for n in
                                             ("ZZ_LISTED", "CC_LISTED", "BB_LISTED")])}
    ev = Evaluation(rule_set, parsed, Envelope(), results, lambda: extract(parsed))
    (hit,) = rule_set.evaluate(ev)
    assert hit.notes == ["symbol BB_LISTED"]
