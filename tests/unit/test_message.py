from trustmilter.message import ParsedMessage

RAW = (b"From: Alice <alice@Example.ORG>\r\n"
       b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
       b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\t d=example.org; s=sel\r\n"
       b"To: bob@test.example\r\n"
       b"\r\n"
       b"body line\r\n")


def test_headers_keep_exact_bytes_and_unfold() -> None:
    msg = ParsedMessage.parse(RAW)
    sig = [h for h in msg.headers if h.lname == "dkim-signature"][0]
    assert sig.raw_value == b" v=1; a=rsa-sha256;\r\n\t d=example.org; s=sel"
    assert sig.value == "v=1; a=rsa-sha256;\t d=example.org; s=sel"
    assert msg.body == b"body line\r\n"
    assert msg.subject == "café"
    assert msg.from_domains == ["example.org"]


def test_lf_only_and_missing_body() -> None:
    msg = ParsedMessage.parse(b"From: a@b.example\nSubject: x\n")
    assert msg.get("subject") == "x" and msg.body == b""


def test_several_from_addresses_all_seen() -> None:
    msg = ParsedMessage.parse(b"From: a@one.example, b@two.example\nFrom: c@three.example\n\nx")
    assert msg.from_domains == ["one.example", "two.example", "three.example"]


def test_encoded_display_name_cannot_hide_an_address() -> None:
    msg = ParsedMessage.parse(b"From: =?utf-8?q?Bank=2C_Inc?= <phish@evil.example>\n\nx")
    assert msg.from_addresses == ["phish@evil.example"]


def test_garbage_never_raises() -> None:
    for raw in (b"", b"\x00\xff\xfe", b"no colon here\n\nbody", b":\n", b" folded first\nA: b\n\n",
                b"From: =?bogus-charset?q?x?= <a@b>\n\n", b"From " + b"x" * 10000):
        msg = ParsedMessage.parse(raw)
        assert isinstance(msg.from_addresses, list)
        assert isinstance(msg.subject, str)


def test_malformed_line_is_a_defect_not_a_header() -> None:
    msg = ParsedMessage.parse(b"Good: yes\nthis is not a header\nAlso: fine\n\nbody")
    assert [h.name for h in msg.headers] == ["Good", "Also"]
    assert msg.defects
