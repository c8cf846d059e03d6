"""Property-based tests (hypothesis, derandomized, bounded) on what parses hostile input: the
message parser and content features, the DMARC record parser, the rules engine with the shipped
rule set, and the milter's header/reply sanitizers. Together they stay within a few seconds."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hostile import messages  # noqa: E402

from trustmilter.checks import dmarc  # noqa: E402
from trustmilter.content.features import Limits, extract  # noqa: E402
from trustmilter.message import ParsedMessage  # noqa: E402
from trustmilter.types import Envelope  # noqa: E402

# One fixed profile: the same examples every run (no flakiness), no per-example deadline (CI is
# a shared 2-core machine), bounded counts.
FIXED = settings(derandomize=True, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])


def fixed(max_examples: int) -> settings:
    return settings(FIXED, max_examples=max_examples)


# Bytes that look like mail: header-ish lines, MIME boundaries, encodings, with raw noise mixed in.
_TOKENS = [b"From: ", b"To: ", b"Subject: ", b"Content-Type: ", b"multipart/mixed; boundary=",
           b'"b"', b"--b", b"--b--", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b" ", b"\t", b":",
           b"text/html", b"charset=", b"utf-8", b"x-unknown", b"=?utf-8?b?", b"=?x?q?=ff", b"?=",
           b"Content-Transfer-Encoding: ", b"base64", b"quoted-printable", b"=3D", b"=\r\n",
           b"<a href=\"http://", b"example.com", b"\">", b"</a>", b"\x00", b"\xff\xfe",
           b"@", b"<", b">", b",", b";", b"filename=\"a.exe\"", b"Content-Disposition: attachment",
           b"DKIM-Signature: v=1; d=", b"Received: from x ([1.2.3.4])", b"AAAA"]
MAILISH = st.one_of(st.binary(max_size=2000),
                    st.lists(st.one_of(st.sampled_from(_TOKENS), st.binary(max_size=8)),
                             max_size=120).map(b"".join))
SMALL_LIMITS = Limits(max_bytes=4096, max_text_chars=2000, max_parts=16)


# ---- the message parser ------------------------------------------------------------------------
@fixed(300)
@given(MAILISH)
def test_parser_and_features_never_raise(raw: bytes) -> None:
    msg = ParsedMessage.parse(raw)
    assert msg.raw == raw and 0 <= msg.body_offset <= len(raw)
    assert msg.body == raw[msg.body_offset:]
    for header in msg.headers:
        assert header.name and ":" not in header.name
        assert isinstance(header.value, str)
    _ = msg.from_addresses, msg.from_domains, msg.subject
    features = extract(msg, SMALL_LIMITS)
    # The budget bounds the decoded text; parts are joined with one newline each.
    assert len(features.text_plain) <= SMALL_LIMITS.max_text_chars + SMALL_LIMITS.max_parts
    assert len(features.part_types) <= SMALL_LIMITS.max_parts


_NAME = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                       blacklist_characters=":"), min_size=1, max_size=20)
# Field bodies: printable bytes (and 8-bit), optionally folded with CRLF + WSP.
_LINE = st.binary(max_size=60).map(lambda b: bytes(c for c in b if c not in (10, 13)))
_VALUE = st.lists(_LINE, min_size=1, max_size=4).map(lambda ls: b"\r\n ".join(ls))


@fixed(300)
@given(st.lists(st.tuples(_NAME, _VALUE), min_size=1, max_size=12), st.binary(max_size=200))
def test_header_round_trip(fields: list[tuple[str, bytes]], body: bytes) -> None:
    """Headers written as name ":" value CRLF come back with the same names and the exact value
    bytes (folding kept), in order; the body starts after the first empty line."""
    if fields[0][0].startswith("From ") or fields[0][0] == "From":
        fields = [("X-" + fields[0][0].replace(" ", ""), fields[0][1])] + fields[1:]
    # A value made only of folds/blanks whose last line is empty would end the header block.
    fields = [(n, v) for n, v in fields if not v.endswith(b"\r\n ") or v.strip()]
    fields = [(n, v if not v.endswith(b"\r\n ") else v + b"x") for n, v in fields]
    head = b"".join(n.encode() + b":" + v + b"\r\n" for n, v in fields)
    raw = head + b"\r\n" + body
    msg = ParsedMessage.parse(raw)
    assert [(h.name, h.raw_value) for h in msg.headers] == [(n, v) for n, v in fields]
    assert msg.body == body
    for name, value in fields:
        unfolded = value.decode("utf-8", "surrogateescape").replace("\r\n", "").strip()
        assert unfolded in msg.get_all(name)


# ---- the DMARC record parser -------------------------------------------------------------------
# tests/unit/test_dmarc.py throws free text and tag soup at it; these are well-formed tag lists
# whose values are hostile (huge numbers, NULs, non-ASCII, size suffixes that overflow).
_HOSTILE_VALUE = st.one_of(
    st.sampled_from(["", " ", "none", "reject", "quarantine", "r", "s", "0", "-1", "100", "101",
                     "9" * 400, "1:d:s:0", "afrf:iodef", "mailto:a@b.test",
                     "mailto:a@b.test!99999999999999999999999t", "mailto:a@b.test!10m,x",
                     "mailto:" + "a" * 5000 + "@b.test", "\x00", "r\u00e9ject", "1e9", "0x10",
                     "mailto:a@b.test,,", "http://x:y", "\u0660"]),
    st.text(max_size=30))
_TAG = st.sampled_from(["p", "sp", "pct", "adkim", "aspf", "fo", "rf", "ri", "rua", "ruf",
                        "np", "psd", "t", "X", "P", "PCT"])


@fixed(400)
@given(st.lists(st.tuples(_TAG, _HOSTILE_VALUE), max_size=8),
       st.sampled_from(["; ", ";", " ; ", ";\t"]))
def test_dmarc_structured_hostile_values(tags: list[tuple[str, str]], sep: str) -> None:
    text = "v=DMARC1" + "".join(f"{sep}{t}={v}" for t, v in tags)
    strict_rec = None
    try:
        strict_rec = dmarc.parse_record(text, strict=True)
    except dmarc.DMARCRecordError:
        pass
    try:
        lenient = dmarc.parse_record(text, strict=False)
    except dmarc.DMARCRecordError as exc:
        # Lenient parsing refuses only a record with no usable policy.
        assert isinstance(exc, dmarc.InvalidPolicyError), exc
        assert strict_rec is None
        return
    assert 0 <= lenient.pct <= 100 and lenient.ri >= 0
    # Deterministic, and whatever strict parsing accepts lenient parsing reads the same way.
    assert dmarc.parse_record(text, strict=False) == lenient
    if strict_rec is not None:
        assert strict_rec.p == lenient.p and strict_rec.pct == lenient.pct
        assert strict_rec.rua == lenient.rua and not lenient.warnings


# ---- the rules engine (shipped rule set) ---------------------------------------------------------
@pytest.fixture(scope="module")
def rule_set():  # type: ignore[no-untyped-def]
    from trustmilter.rules.loader import load_rule_set
    rules = load_rule_set(None, local=None)
    assert len(rules) > 10   # the shipped set, not an empty one
    return rules


def _evaluate(rule_set, raw: bytes) -> list[tuple[str, tuple[str, ...]]]:  # type: ignore[no-untyped-def]
    from trustmilter.rules.engine import Evaluation
    msg = ParsedMessage.parse(raw)
    env = Envelope(client_ip="192.0.2.10", helo="mail.good.test", mail_from="a@good.test",
                   rcpt_to=("user@dest.test",))
    ev = Evaluation(rule_set, msg, env, {}, lambda: extract(msg, SMALL_LIMITS),
                    now=1_790_000_000.0)
    return [(h.rule.name, tuple(h.notes)) for h in rule_set.evaluate(ev)]


@fixed(150)
@given(raw=st.one_of(MAILISH, st.sampled_from([messages.truncated_mime(),
                                               messages.malformed_mime(),
                                               messages.nul_and_bare_crlf(),
                                               messages.bad_transfer_encodings(),
                                               messages.crlf_subject()])))
def test_rules_never_raise_and_are_deterministic(rule_set, raw: bytes) -> None:  # type: ignore[no-untyped-def]
    first = _evaluate(rule_set, raw)
    assert _evaluate(rule_set, raw) == first
    for _name, notes in first:
        for note in notes:
            assert "\r" not in note and "\n" not in note


# ---- what the milter writes into headers and replies ---------------------------------------------
@fixed(300)
@given(st.text(max_size=3000), st.sampled_from(["Authentication-Results", "X-Spam-Status"]))
def test_folded_header_values_cannot_inject(value: str, name: str) -> None:
    from trustmilter.server import MAX_LINE, clean_text, fold, smtp_text
    folded = fold(name, value)
    assert "\r" not in folded and "\x00" not in folded
    lines = folded.split("\n")
    for continuation in lines[1:]:
        assert continuation.startswith("\t")       # never a new header line
    assert all(len(line.encode("utf-8")) <= 4 * MAX_LINE for line in lines)
    assert all(len(line) <= MAX_LINE for line in lines)
    reply = smtp_text(value)
    assert reply.isascii() and "\n" not in reply and "\r" not in reply and len(reply) <= 400 * 2
    assert "\n" not in clean_text(value) and "\r" not in clean_text(value)
