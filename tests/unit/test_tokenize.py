"""The mail tokenizer on real-world charsets, transfer encodings and broken MIME."""
from __future__ import annotations

import base64
import quopri

from hypothesis import given, settings
from hypothesis import strategies as st

from trustmilter.content.features import extract
from trustmilter.content.tokenize import tokenize, words


def _msg(headers: str, body: bytes) -> bytes:
    return headers.replace("\n", "\r\n").encode("ascii") + b"\r\n\r\n" + body


def _tokens(raw: bytes) -> list[str]:
    return tokenize(extract(raw))


def test_words_are_cut_like_spambayes() -> None:
    out = words("Hello, WORLD!! a an the supercalifragilisticexpialidocious 12345 (viagra)")
    assert "hello" in out and "world" in out and "the" in out and "viagra" in out
    assert "a" not in out and "an" not in out
    assert "skip:s 30" in out          # 34 characters: first letter + length class
    assert "num:5" in out


def test_cjk_text_becomes_character_pairs() -> None:
    out = words("これは日本語のテキストです")
    assert "日本" in out and "本語" in out


def test_header_tokens_are_prefixed() -> None:
    raw = _msg("From: \"Pay Pal\" <service@paypa1-secure.example>\nReply-To: x@gmail.com\n"
               "To: a@example.org\nSubject: Verify your account NOW\nX-Mailer: PHPMailer 6.1.4",
               b"Please verify your account.")
    tokens = set(_tokens(raw))
    assert {"subject:verify", "subject:account", "subject:now", "from:name:pay", "from:rd:paypa1-secure.example",
            "reply-to:differs", "reply-to:freemail", "mailer:phpmailer"} <= tokens
    assert "verify" in tokens and "account" in tokens   # body words carry no prefix


def test_iso_8859_1_and_windows_1252_bodies() -> None:
    body = "Grüße aus Köln – Preis: 10 €".encode("cp1252")
    raw = _msg("From: a@example.org\nSubject: x\nContent-Type: text/plain; charset=iso-8859-1", body)
    tokens = _tokens(raw)
    # Declared latin-1 but sent as windows-1252 (the dash and euro sign): decoded as 1252.
    assert "grüße" in tokens and "köln" in tokens


def test_cyrillic_koi8r_base64() -> None:
    text = "Привет, это тестовое сообщение о скидках"
    body = base64.encodebytes(text.encode("koi8-r"))
    raw = _msg("From: a@example.org\nSubject: =?koi8-r?B?" + base64.b64encode("Скидки".encode("koi8-r")).decode()
               + "?=\nContent-Type: text/plain; charset=koi8-r\nContent-Transfer-Encoding: base64", body)
    tokens = _tokens(raw)
    assert "привет" in tokens and "тестовое" in tokens
    assert "subject:скидки" in tokens


def test_shift_jis_and_gb2312_mislabelled_gbk() -> None:
    sj = _msg("From: a@example.org\nSubject: x\nContent-Type: text/plain; charset=shift_jis",
              "お知らせ 本日限定".encode("shift_jis"))
    assert "お知" in _tokens(sj)
    # gb2312 label, but a GBK-only character inside: decoded with the superset, not dropped.
    gbk = _msg("From: a@example.org\nSubject: x\nContent-Type: text/plain; charset=gb2312",
               "优惠活动 镕".encode("gbk"))
    assert "优惠" in _tokens(gbk)


def test_quoted_printable_html() -> None:
    html = b'<html><body><p>Caf\xc3\xa9 special offer</p><a href="http://deals.example.com/x">here</a></body></html>'
    raw = _msg("From: a@example.org\nSubject: x\nContent-Type: text/html; charset=utf-8\n"
               "Content-Transfer-Encoding: quoted-printable", quopri.encodestring(html))
    tokens = set(_tokens(raw))
    assert {"café", "special", "offer", "url:rd:example.com", "url:host:deals.example.com", "html:only"} <= tokens


def test_unknown_charset_and_invalid_utf8_degrade() -> None:
    raw = _msg("From: a@example.org\nSubject: x\nContent-Type: text/plain; charset=x-no-such-charset",
               b"plain words \xff\xfe\xfa broken bytes")
    tokens = _tokens(raw)
    assert "plain" in tokens and "broken" in tokens
    raw = _msg("From: a@example.org\nSubject: caf\xe9".replace("\xe9", "e"), b"ok")
    assert "subject:cafe" in _tokens(raw)


def test_raw_8bit_header_bytes() -> None:
    raw = b"From: J\xc3\xbcrgen <j@example.org>\r\nSubject: Gr\xfc\xdfe\r\n\r\nbody text"
    tokens = _tokens(raw)
    assert "from:name:jürgen" in tokens          # UTF-8 bytes
    assert "subject:grüße" in tokens            # latin-1 bytes
    for token in tokens:
        token.encode("utf-8")                    # no lone surrogates reach the store


def test_broken_mime_still_yields_tokens() -> None:
    # No closing boundary, a part with bad base64, a part with no headers.
    body = (b"--XYZ\r\nContent-Type: text/plain\r\n\r\nfirst part words\r\n--XYZ\r\n"
            b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64@@@\r\n--XYZ\r\n"
            b"\r\nheaderless part text\r\n")
    raw = _msg("From: a@example.org\nSubject: x\nContent-Type: multipart/mixed; boundary=XYZ", body)
    tokens = _tokens(raw)
    assert "first" in tokens and "part" in tokens


def test_missing_boundary_parameter() -> None:
    raw = _msg("From: a@example.org\nSubject: x\nContent-Type: multipart/mixed", b"just some text here")
    f = extract(raw)
    assert "text" in tokenize(f)


def test_attachment_tokens() -> None:
    body = (b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\n"
            b"Content-Type: application/octet-stream; name=\"invoice.pdf.exe\"\r\n"
            b"Content-Disposition: attachment; filename=\"invoice.pdf.exe\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(b"MZ" + bytes(100)) + b"\r\n--b--\r\n")
    raw = _msg("From: a@example.org\nSubject: x\nContent-Type: multipart/mixed; boundary=b", body)
    tokens = set(_tokens(raw))
    assert {"attach:ext:exe", "attach:dangerous", "attach:double-extension", "attach:name:invoice"} <= tokens


def test_empty_and_headerless_input() -> None:
    assert _tokens(b"") and _tokens(b"\r\n\r\n") and _tokens(b"no headers at all, just text")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=3000))
def test_any_bytes_tokenize_without_error(data: bytes) -> None:
    for raw in (data, b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n" + data,
                b"Content-Type: text/html; charset=utf-7\r\nContent-Transfer-Encoding: base64\r\n\r\n" + data):
        tokens = tokenize(extract(raw))
        assert all(isinstance(t, str) for t in tokens)
