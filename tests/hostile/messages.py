"""Generators of hostile messages (issue 6, item 3). Each returns the raw bytes of one message;
``CASES`` names the ones the scan and Postfix tests both feed (the 50 MB one is built apart, as
it is too big to keep around for every test). Nothing here is random: the same bytes every run.
"""
from __future__ import annotations

import base64
import encodings.aliases
from typing import Callable

RCPT = "user@dest.test"


def head(subject: str = "hostile", extra: bytes = b"", from_addr: str = "alice@good.test",
         msgid: str = "<hostile@test>") -> bytes:
    return extra + (f"From: Alice <{from_addr}>\r\nTo: <{RCPT}>\r\nSubject: {subject}\r\n"
                    f"Date: Tue, 24 Nov 2026 06:00:00 +0000\r\nMessage-ID: {msgid}\r\n"
                    "MIME-Version: 1.0\r\n").encode()


def truncated_mime() -> bytes:
    """A multipart cut in the middle of a base64 part: no closing boundary, half a line."""
    return head("truncated") + (
        b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n--XX\r\n'
        b"Content-Type: text/plain\r\n\r\nhello\r\n--XX\r\n"
        b"Content-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFIvRmlsdGVyIC9GbGF0ZURlY29kZT4+Cn")


def malformed_mime() -> bytes:
    """Contradictory and broken MIME: multipart without boundary, boundary in a header value,
    parameters without values, a part header block that never ends."""
    return head("malformed") + (
        b"Content-Type: multipart/alternative; boundary=; charset\r\n"
        b"Content-Type: text/html; ;;; =; boundary=\"\r\n"
        b"Content-Transfer-Encoding: x-unknown-encoding\r\n\r\n"
        b"--\r\n--\r\nContent-Type: multipart/mixed; boundary=\"--\"\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''%ff%fe%00.exe; filename*0*=x\r\n"
        b"<html><body><a href='http://[::1'>x</a><a href=\"http://%zz%00/\">y</a>\r\n"
        b"----\r\n------\r\n")


def nested_multipart(depth: int = 1000) -> bytes:
    """``depth`` multiparts, each inside the previous one."""
    parts = [head(f"nested {depth}")]
    parts.append(b'Content-Type: multipart/mixed; boundary="b0"\r\n\r\n')
    for level in range(1, depth):
        parts.append(f'--b{level - 1}\r\nContent-Type: multipart/mixed; boundary="b{level}"\r\n\r\n'
                     .encode())
    parts.append(f"--b{depth - 1}\r\nContent-Type: text/plain\r\n\r\ndeep inside\r\n".encode())
    for level in range(depth - 1, -1, -1):
        parts.append(f"--b{level}--\r\n".encode())
    return b"".join(parts)


def many_headers(count: int = 10_000) -> bytes:
    lines = b"".join(b"X-Filler-%d: value %d\r\n" % (i, i) for i in range(count))
    return head("many headers", extra=lines) + b"Content-Type: text/plain\r\n\r\nbody\r\n"


def long_header_line(size: int = 1_000_000) -> bytes:
    """One header line of ``size`` bytes without a fold (SMTP says 998: Postfix folds or cuts)."""
    return (head("long line", extra=b"X-Long: " + b"A" * size + b"\r\n")
            + b"Content-Type: text/plain\r\n\r\nbody\r\n")


def long_folded_header(size: int = 1_000_000) -> bytes:
    """A 1 MB header value folded into legal 78-byte lines."""
    line = b"\r\n\t" + b"B" * 75
    return (head("long folded", extra=b"X-Folded: start" + line * (size // len(line)) + b"\r\n")
            + b"Content-Type: text/plain\r\n\r\nbody\r\n")


def nul_and_bare_crlf() -> bytes:
    """NUL bytes in headers and body, bare CR and bare LF line ends mixed with CRLF."""
    return (b"From: Alice \x00<alice@good.test>\r\nTo: <user@dest.test>\rSubject: nul\x00bytes\n"
            b"Message-ID: <nul@test>\r\nX-Bare: a\rb\rc\r\n"
            b"Content-Type: text/plain\r\n\r\nline\x00one\rline two\nline three\r\n\x00\x00\r\n")


def charset_message(charsets: list[str]) -> bytes:
    """One text part per charset (each label Python knows and some it does not), with words in
    the Subject encoded in them too."""
    encoded = base64.b64encode(b"caf\xe9 \x80\xff").decode()
    words = " ".join(f"=?{c}?B?{encoded}?=" for c in charsets[:40])
    parts = [head("=?utf-8?q?charsets?= " + words),
             b'Content-Type: multipart/mixed; boundary="cs"\r\n\r\n']
    for charset in charsets:
        parts.append(f'--cs\r\nContent-Type: text/plain; charset="{charset}"\r\n'
                     "Content-Transfer-Encoding: 8bit\r\n\r\n".encode()
                     + b"caf\xe9 \x80\x81\xfe\xff \x1b$B\x1b(B +AGEAYgBj- end\r\n")
    parts.append(b"--cs--\r\n")
    return b"".join(parts)


def all_charsets() -> list[str]:
    known = sorted(set(encodings.aliases.aliases) | set(encodings.aliases.aliases.values()))
    unknown = ["x-no-such-charset", "utf-99", "\u00e9\u00e9", "a" * 300, "", "us-ascii\x00",
               "utf-8'; DROP", "rot13", "base64", "hex", "zlib", "bz2", "uu", "idna",
               "punycode", "unicode_escape", "raw_unicode_escape", "utf-7", "utf-32"]
    return known + unknown


def bad_transfer_encodings() -> bytes:
    return head("bad cte") + (
        b'Content-Type: multipart/mixed; boundary="q"\r\n\r\n'
        b"--q\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        b"!!!!not base64 at all====\r\nYW=Jj\r\n=\r\nQQ\r\n"
        b"--q\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"=ZZ=\r\n=0=\r\n=\r\n=3D=3=F=\r\n<a href=3D\"http://ex=\r\nample.com\">x</a>=\r\n"
        b"--q\r\nContent-Type: application/octet-stream; name=x.exe\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + b"A" * 10001 + b"\r\n"
        b"--q\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
        b"begin 644 x\r\nM86)C\r\nend\r\n--q--\r\n")


def dkim_absurd(signatures: int = 500) -> bytes:
    """DKIM-Signature headers no verifier should spend much on: huge l=, negative x=, h= of
    10,000 characters, absurd algorithms, and 500 of them."""
    absurd = [
        "v=1; a=rsa-sha256; d=good.test; s=sel; c=relaxed/relaxed; h=from:to:subject; "
        f"l={'9' * 400}; bh=AAAA; b=AAAA",
        "v=1; a=rsa-sha256; d=good.test; s=sel; h=from; x=-5; t=-99999999999999; bh=AAAA; b=AAAA",
        "v=1; a=rsa-sha256; d=good.test; s=sel; h=" + ":".join(["from"] * 2000) + "; bh=AAAA; b=AAAA",
        "v=1; a=rsa-sha256; d=good.test; s=sel; h=" + "x" * 10_000 + "; bh=AAAA; b=AAAA",
        "v=1; a=rsa-sha999; d=" + "a." * 200 + "test; s=" + "s" * 300 + "; h=from; bh=; b=",
        "v=1; a=ed25519-sha256; d=good.test; s=sel; h=from; l=-1; bh=AAAA; b=AAAA; i=@@@",
        "v=1;;;;;===; d=; s=; h=; bh; b",
        "v=1; a=rsa-sha256; d=good.test; s=../../etc/passwd; h=from; bh=AAAA; b=AAAA",
    ]
    lines = []
    for i in range(signatures):
        value = absurd[i % len(absurd)]
        # Fold the long ones so the header lines stay within SMTP's limits.
        folded = "\r\n\t".join(value[j:j + 900] for j in range(0, len(value), 900))
        lines.append(f"DKIM-Signature: {folded}\r\n".encode())
    return head("absurd dkim", extra=b"".join(lines)) + b"Content-Type: text/plain\r\n\r\nbody\r\n"


def forged_authres() -> bytes:
    """Authentication-Results claiming our authserv-id (must be removed) and garbage ones."""
    extra = (b"Authentication-Results: mx.test.example; dkim=pass header.d=bank.test; "
             b"spf=pass smtp.mailfrom=bank.test; dmarc=pass header.from=bank.test\r\n"
             b"Authentication-Results: MX.TEST.EXAMPLE (comment); dmarc=pass\r\n"
             b"Authentication-Results: mx.test.example\r\n"
             b"Authentication-Results: ;;;;(((\r\n"
             b"Authentication-Results: other.example; dkim=pass header.d=bank.test\r\n")
    return head("forged", extra=extra, from_addr="ceo@bank.test") + \
        b"Content-Type: text/plain\r\n\r\nwire the money\r\n"


def crlf_subject() -> bytes:
    """A Subject whose value tries to smuggle a header through our subject tag (bare CR and LF
    and an encoded word that decodes to CRLF)."""
    return (b"From: Alice <alice@good.test>\r\nTo: <user@dest.test>\r\n"
            b"Subject: hi\rX-Injected-CR: yes\r\n"
            b"Subject2: =?utf-8?q?a=0D=0AX-Injected-Word:_yes?=\r\n"
            b"Message-ID: <crlf@test>\r\nContent-Type: text/plain\r\n\r\nbody\r\n")


CASES: dict[str, Callable[[], bytes]] = {
    "truncated_mime": truncated_mime,
    "malformed_mime": malformed_mime,
    "nested_1000": lambda: nested_multipart(1000),
    "headers_10000": many_headers,
    "header_line_1mb": long_header_line,
    "header_folded_1mb": long_folded_header,
    "nul_bare_cr_lf": nul_and_bare_crlf,
    "charsets_all": lambda: charset_message(all_charsets()),
    "bad_base64_qp": bad_transfer_encodings,
    "dkim_absurd_500": dkim_absurd,
    "forged_authres": forged_authres,
    "crlf_subject": crlf_subject,
}


def big_message(size: int = 50 * 1024 * 1024) -> bytes:
    """A ``size``-byte message: a text part, then one base64 attachment filling the rest."""
    start = head("fifty megabytes") + (
        b'Content-Type: multipart/mixed; boundary="big"\r\n\r\n--big\r\n'
        b"Content-Type: text/plain\r\n\r\nsee attachment\r\n--big\r\n"
        b"Content-Type: application/octet-stream; name=big.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n")
    end = b"\r\n--big--\r\n"
    line = b"QUJD" * 19 + b"\r\n"           # 78 bytes per line, valid base64
    fill = size - len(start) - len(end)
    body = line * (fill // len(line))
    return start + body + b" " * (fill - len(body)) + end
