"""Message features: HTML to text with links, hidden text and images; attachments; lookalike
domains; the bounded prefix of huge messages; parsed once per message in the pipeline."""
from __future__ import annotations

import base64
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from trustmilter.content import analyze
from trustmilter.content.features import (Limits, brand_in_subdomain, extract, lookalike_brand,
                                          make_link, registered_domain)
from trustmilter.content.html import html_to_text
from trustmilter.message import ParsedMessage

MODERN = Path(__file__).resolve().parents[1] / "fixtures" / "modern" / "holdout"


def _html_msg(html: str) -> bytes:
    return (b"From: a@example.org\r\nSubject: x\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            + html.encode("utf-8"))


def test_html_text_links_and_hidden_text() -> None:
    r = html_to_text('<html><head><style>p{color:red}</style><script>var x="<a href=1>";</script></head>'
                     '<body><p>Visible &amp; clear</p><div style="display:none">secret salad words</div>'
                     '<a href="https://evil.example.net/login">https://www.paypal.com</a>'
                     '<img src="https://t.example/p.gif" width="1" height="1"><img src="banner.png" alt="Big sale">'
                     '<form action="https://collect.example.net/p"><input type="password" name="p"></form></body></html>')
    assert "Visible & clear" in r.text and "secret" not in r.text and "var x" not in r.text
    assert r.hidden_text == "secret salad words"
    assert r.scripts == 1 and r.forms == 1 and r.password_inputs == 1
    assert r.tracking_pixels == 1 and r.images == 1 and "Big sale" in r.image_alt
    assert [(link.href, link.text) for link in r.links][:1] == [("https://evil.example.net/login", "https://www.paypal.com")]


def test_broken_html_never_raises() -> None:
    for html in ("<a href='x", "<<<>>>", "<div style=\"display:none\">" * 1000, "<!-- unterminated",
                 "</a></b></c>", "<a href=\"https://x.example/\"><a href=\"https://y.example/\">two</a>",
                 "<p" + " a=b" * 5000):
        html_to_text(html)


def test_link_text_naming_another_domain_is_a_mismatch() -> None:
    f = extract(_html_msg('<p>Sign in at <a href="https://kbx-hosting.top/owa">https://login.microsoftonline.com</a></p>'
                          '<p><a href="https://www.example.com/a">www.example.com/account</a></p>'))
    mismatched = [link for link in f.links if link.mismatched]
    assert [link.domain for link in mismatched] == ["kbx-hosting.top"]
    assert mismatched[0].text_domain == "microsoftonline.com"


def test_link_normalization() -> None:
    assert make_link("hxxp://bad.example.com/x").host == "bad.example.com"       # defanged
    assert make_link("www.example.org/path").domain == "example.org"
    assert make_link("http://192.0.2.1/login").is_ip
    assert make_link("http://user@evil.example.net/").has_userinfo
    assert make_link("https://xn--pypal-4ve.com/").idn
    assert make_link("https://päypal.com/").idn
    assert make_link("mailto:a@example.org") is None and make_link("#top") is None
    assert make_link("/relative") is None
    assert make_link("/relative", base="https://base.example.com/").host == "base.example.com"
    assert make_link("http://[::1") is None     # malformed IPv6 literal


def test_registered_domains() -> None:
    assert registered_domain("a.b.example.co.uk") == "example.co.uk"
    assert registered_domain("mail.fjordlabs.example") == "fjordlabs.example"   # unknown TLD: * rule
    assert registered_domain("notes.txt", strict=True) == ""                     # not a real TLD
    assert registered_domain("192.0.2.1") == ""


def test_lookalike_brands() -> None:
    assert lookalike_brand("paypa1-resolution.com") == "paypal"
    assert lookalike_brand("micros0ft-support.com") == "microsoft"
    assert lookalike_brand("secure-docusign-mail.net") == "docusign"
    assert lookalike_brand("paypal.com") == "" and lookalike_brand("purchase.com") == ""
    assert lookalike_brand("example.com") == ""
    assert brand_in_subdomain("docusign.net.secure-sign.click", "secure-sign.click") == "docusign"
    assert brand_in_subdomain("www.docusign.com", "docusign.com") == ""


def test_image_only_body() -> None:
    f = extract(_html_msg('<html><body><a href="https://shop.example.net/"><img src="https://cdn.example.net/offer.jpg"></a></body></html>'))
    assert f.image_only and f.images == 1
    f = extract(_html_msg("<p>" + "plenty of real words in this newsletter paragraph " * 3 + "</p><img src='x.png'>"))
    assert not f.image_only


def test_attachments_are_named_typed_and_sized() -> None:
    payload = base64.encodebytes(bytes(3000))
    raw = (b"From: a@example.org\r\nSubject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\n"
           b"Content-Type: application/zip; name*=UTF-8''Rechnung%20M%C3%A4rz.zip\r\n"
           b"Content-Disposition: attachment; filename*=UTF-8''Rechnung%20M%C3%A4rz.zip\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + payload + b"\r\n--b--\r\n")
    f = extract(raw)
    assert len(f.attachments) == 1
    att = f.attachments[0]
    assert (att.filename, att.ext, att.content_type, att.size) == ("Rechnung März.zip", "zip", "application/zip", 3000)
    assert f.text_plain.strip() == "hello"


def test_huge_message_is_read_only_up_to_the_prefix() -> None:
    big = base64.encodebytes(bytes(20 * 1024 * 1024))   # a 20 MB attachment (27 MB encoded)
    raw = (b"From: a@example.org\r\nSubject: big\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nsee the attachment\r\n--b\r\n"
           b"Content-Type: application/octet-stream; name=big.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + big + b"\r\n--b--\r\n")
    started = time.process_time()
    f = extract(raw, Limits(max_bytes=262144))
    assert time.process_time() - started < 0.5
    assert f.truncated and f.size == len(raw)
    assert "see the attachment" in f.text_plain
    assert f.attachments and f.attachments[0].size <= 262144


def test_text_budget_and_part_limit() -> None:
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\n" + b"word " * 100 + b"\r\n" for _ in range(200))
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n"
    f = extract(raw, Limits(max_bytes=10 ** 7, max_text_chars=1000, max_parts=20))
    assert len(f.text_plain) <= 1000 + 20
    assert "too many MIME parts" in f.defects


def test_modern_phishing_facts() -> None:
    f = extract((MODERN / "spam" / "01-m365-password-expiry.eml").read_bytes())
    assert f.hidden_text and any(link.mismatched for link in f.links)
    assert f.from_name == "Microsoft 365 Admin" and f.from_rd == "kbx-hosting.top"
    f = extract((MODERN / "spam" / "03-invoice-html-attachment.eml").read_bytes())
    assert f.attachments[0].ext == "html" and f.attachments[0].double_ext
    f = extract((MODERN / "ham" / "02-substack-newsletter.eml").read_bytes())
    assert "list-unsubscribe" in f.header_names and f.tracking_pixels == 1 and len(f.links) >= 8


def test_features_are_computed_once_per_message() -> None:
    message = ParsedMessage.parse((MODERN / "ham" / "04-lkml-patch.eml").read_bytes())
    first = analyze(message, Limits())
    assert analyze(message, Limits()) is first


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=2000))
def test_any_html_converts(html: str) -> None:
    r = html_to_text(html)
    assert isinstance(r.text, str)
    extract(_html_msg(html))
