"""Crashes the hostile-input tests found, each pinned by the input that found it."""
from __future__ import annotations

from typing import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from trustmilter.content.features import decode_bytes, extract
from trustmilter.message import ParsedMessage, decode_words
from trustmilter.pipeline import Engine, evaluate
from trustmilter.types import Action, Envelope

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def test_nul_in_encoded_word_charset() -> None:
    """Found by the atheris target: ``=?\\x01\\x00f-8?q?...?=`` made bytes.decode raise
    ValueError (embedded null character), not LookupError."""
    assert decode_words("=?u\x00tf-8?q?hi?= there") == "hi there"
    assert decode_bytes(b"caf\xc3\xa9", "u\x00tf-8") == "caf\u00e9"


def test_nul_charset_subject_cannot_switch_the_rules_off(
        make_engine: Callable[..., Engine]) -> None:
    """The same bug through the pipeline: the rules check crashed (RULES_ERROR), so one header
    turned every rule off, GTUBE's reject included."""
    raw = (b"From: a@good.test\r\nTo: user@dest.test\r\nSubject: =?u\x00tf-8?q?hi?=\r\n"
           b"Content-Type: text/plain; charset=\"u\x00tf-8\"\r\n\r\n" + GTUBE + b"\r\n")
    extract(ParsedMessage.parse(raw))
    verdict = evaluate(Envelope(client_ip="192.0.2.10", helo="mail.good.test",
                                mail_from="a@good.test", rcpt_to=("user@dest.test",)),
                       raw, make_engine())
    names = [s.name for s in verdict.symbols]
    assert not [n for n in names if n.endswith("_ERROR")], names
    assert "GTUBE_REJECT" in names and verdict.action is Action.REJECT


def test_authres_without_authserv_id_is_not_a_crash() -> None:
    """Found through Postfix: ``Authentication-Results: ;;;;(((`` (no authserv-id) raised
    IndexError in forged_indexes, so the milter answered 451 to every such message, and with
    on_error: accept would have let a forged header beside it through."""
    from trustmilter.authresults import claims_authserv_id, forged_indexes
    values = [" mx.test.example; dmarc=pass", " ;;;;(((", " ", " ;", " (c) ; x", "mx.test.example"]
    assert forged_indexes(values, "mx.test.example") == [6, 1]
    assert not claims_authserv_id(";", "mx.test.example")


def test_bayes_store_is_private(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Found through Postfix: the Bayes token store (words of users' mail) was created with the
    umask (0644, and its -wal/-shm files with it) while every other state file was 0600."""
    import os
    import stat

    from trustmilter.store.sqlite import SQLiteTokenStore
    old = os.umask(0o022)
    try:
        store = SQLiteTokenStore(tmp_path / "bayes.sqlite")
        store.totals()
    finally:
        os.umask(old)
    files = sorted(tmp_path.iterdir())
    assert any(p.name == "bayes.sqlite" for p in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (path.name, oct(path.stat().st_mode))
    store.close()


_PIECES = [b"A: b", b"\r\n", b"\n", b"\r", b" x", b"\tfold", b"Subject : y", b"", b"body", b"B:c",
           b"DKIM-Signature: v=1; d=x", b":", b"\x00"]


@settings(derandomize=True, deadline=None, database=None, max_examples=400)
@given(st.lists(st.sampled_from(_PIECES), max_size=16).map(b"".join))
def test_dkimpy_message_fast_split_is_the_same_split(raw: bytes) -> None:
    """Found by the 50 MB scan: DKIM and ARC each split the whole message into lines (~180 MB
    for 50 MB). Now only the header block is; the result must be exactly what it was."""
    from trustmilter.checks.dkim import _split_whole, dkimpy_message
    assert dkimpy_message(raw) == _split_whole(raw)


def test_dkimpy_message_memory_is_bounded() -> None:
    import tracemalloc

    from trustmilter.checks.dkim import dkimpy_message
    body = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\n" * 500_000        # 18 MB, bare LF lines
    raw = b"From: a@b.test\nDKIM-Signature: v=1; d=b.test\n\n" + body
    tracemalloc.start()
    try:
        headers, out = dkimpy_message(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out == body.replace(b"\n", b"\r\n") and len(headers) == 2
    assert peak < 3 * len(body), peak      # the LF -> CRLF copies, not a list of lines
