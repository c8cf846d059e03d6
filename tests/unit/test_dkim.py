"""The DKIM check with real keys (RSA from openssl, ed25519 from PyNaCl), real dkimpy signatures
and the real test DNS server: every result RFC 6376/8301/8463/8601 defines, and the traps of
PITFALLS.md (only the first signature checked, DNS errors turned into fail, global resolver)."""
from __future__ import annotations

import re
from typing import Any, Callable

import dkim
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.keys import MESSAGE, Key, ed25519_key, publish, rsa_key, run_check, sign
from trustmilter import authresults
from trustmilter.checks import dkim as dkim_check
from trustmilter.message import ParsedMessage
from trustmilter.pipeline import Engine, evaluate
from trustmilter.types import AuthStatus, Envelope

DOMAIN = "example.org"


def statuses(result: Any) -> list[AuthStatus]:
    return [s.status for s in result.outcome.signatures]


def symbol_names(result: Any) -> list[str]:
    return [s.name for s in result.symbols]


def ar_text(result: Any) -> str:
    return authresults.build("mx.test.example", result.authres)


def b_value(signed: bytes, nth: int = 0) -> str:
    """The b= of the nth DKIM-Signature, whitespace removed."""
    headers, _ = dkim_check.dkimpy_message(signed)
    values = [v for n, v in headers if n.lower() == b"dkim-signature"]
    return re.sub(r"\s+", "", dkim.util.parse_tag_value(values[nth])[b"b"].decode())


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine()


@pytest.fixture
def rsa() -> Key:
    return rsa_key(2048)


# ----- passing signatures -----------------------------------------------------------------------

def test_rsa_2048_signature_passes_and_is_reported(dns_server: Any, engine: Engine,
                                                   rsa: Key) -> None:
    publish(dns_server, rsa, "sel1", DOMAIN)
    signed = sign(MESSAGE, rsa, "sel1", DOMAIN)
    result = run_check(dkim_check, engine, signed)

    assert statuses(result) == [AuthStatus.PASS]
    sig = result.outcome.signatures[0]
    assert (sig.domain, sig.selector, sig.algorithm) == (DOMAIN, "sel1", "rsa-sha256")
    assert len(sig.b) >= 8 and b_value(signed).startswith(sig.b)
    assert symbol_names(result) == ["DKIM_VALID"]
    assert "d=example.org s=sel1" in result.symbols[0].reason
    assert result.outcome.passing_domains() == [DOMAIN]
    # The key was fetched through our resolver from the test server (not the global resolver).
    assert ("sel1._domainkey.example.org", "TXT", "udp") in dns_server.queries

    header = authresults.parse(ar_text(result))
    (piece,) = header.results
    assert piece.method == "dkim" and piece.result == "pass"
    props = {f"{p.type}.{p.name}": str(p.value) for p in piece.properties}
    assert props["header.d"] == DOMAIN
    assert props["header.s"] == "sel1"
    assert props["header.a"] == "rsa-sha256"
    assert b_value(signed).startswith(props["header.b"]) and len(props["header.b"]) >= 8
    assert "(2048-bit key)" in ar_text(result)


def test_ed25519_signature_passes(dns_server: Any, engine: Engine) -> None:
    key = ed25519_key()
    publish(dns_server, key, "ed", DOMAIN)
    result = run_check(dkim_check, engine, sign(MESSAGE, key, "ed", DOMAIN))
    assert statuses(result) == [AuthStatus.PASS]
    assert result.outcome.signatures[0].algorithm == "ed25519-sha256"
    assert "header.a=ed25519-sha256" in ar_text(result)


def test_simple_canonicalization_passes(dns_server: Any, engine: Engine, rsa: Key) -> None:
    publish(dns_server, rsa, "sel1", DOMAIN)
    signed = sign(MESSAGE, rsa, "sel1", DOMAIN, canonicalize=(b"simple", b"simple"))
    assert statuses(run_check(dkim_check, engine, signed)) == [AuthStatus.PASS]


def test_message_stored_with_lf_line_endings_still_verifies(dns_server: Any, engine: Engine,
                                                             rsa: Key) -> None:
    # Signed on the wire (CRLF), scanned from a Maildir file (LF): the canonical form is CRLF.
    publish(dns_server, rsa, "sel1", DOMAIN)
    signed = sign(MESSAGE, rsa, "sel1", DOMAIN, canonicalize=(b"simple", b"simple"))
    result = run_check(dkim_check, engine, signed.replace(b"\r\n", b"\n"))
    assert statuses(result) == [AuthStatus.PASS]


def test_stray_header_lines_do_not_lose_the_signature(dns_server: Any, engine: Engine,
                                                      rsa: Key) -> None:
    # dkimpy's parser raises on these; no signature can cover them, so they must not matter.
    publish(dns_server, rsa, "sel1", DOMAIN)
    signed = sign(MESSAGE, rsa, "sel1", DOMAIN)
    odd = signed.replace(b"Subject:", b"X-Obsolete : spaced name\r\nnot a header line\r\nSubject:")
    with pytest.raises(dkim.MessageFormatError):
        dkim.rfc822_parse(odd)
    assert statuses(run_check(dkim_check, engine, odd)) == [AuthStatus.PASS]


# ----- several signatures -----------------------------------------------------------------------

def test_every_signature_is_verified_and_reported(dns_server: Any, engine: Engine,
                                                  rsa: Key) -> None:
    good, wrong = rsa, rsa_key(2048, "other")
    publish(dns_server, good, "good", DOMAIN)
    publish(dns_server, wrong, "bad", "lists.example.net")   # published key != signing key
    signed = sign(MESSAGE, good, "good", DOMAIN)
    signed = sign(signed, rsa, "bad", "lists.example.net")   # topmost: the failing one
    result = run_check(dkim_check, engine, signed)

    assert statuses(result) == [AuthStatus.FAIL, AuthStatus.PASS]
    assert [s.domain for s in result.outcome.signatures] == ["lists.example.net", DOMAIN]
    assert symbol_names(result) == ["DKIM_VALID"]
    header = authresults.parse(ar_text(result))
    assert [(r.method, r.result) for r in header.results] == [("dkim", "fail"), ("dkim", "pass")]
    assert result.outcome.passing_domains() == [DOMAIN]


def test_max_signatures_bounds_the_work(dns_server: Any, make_engine: Callable[..., Engine],
                                        rsa: Key) -> None:
    publish(dns_server, rsa, "sel1", DOMAIN)
    signed = MESSAGE
    for selector in ("x1", "x2", "sel1"):   # sel1 ends on top
        signed = sign(signed, rsa, selector, DOMAIN)
    result = run_check(dkim_check, make_engine({"dkim": {"max_signatures": 2}}), signed)
    assert len(result.outcome.signatures) == 2
    assert statuses(result) == [AuthStatus.PASS, AuthStatus.PERMERROR]
    assert "1 more signatures not verified" in result.symbols[-1].reason
    assert not any(q[0].startswith("x1.") for q in dns_server.queries)


def test_header_b_is_long_enough_to_tell_signatures_apart(dns_server: Any, engine: Engine,
                                                          rsa: Key) -> None:
    # RFC 6008 2: a second signature whose b= shares the first 12 characters.
    publish(dns_server, rsa, "sel1", DOMAIN)
    signed = sign(MESSAGE, rsa, "sel1", DOMAIN)
    real_b = b_value(signed)
    twin = real_b[:12] + ("A" if real_b[12] != "A" else "B") + real_b[13:]
    forged = (f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={DOMAIN}; s=sel1; "
              f"h=from:to:subject; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b={twin}\r\n")
    result = run_check(dkim_check, engine, forged.encode() + signed)
    prefixes = [s.b for s in result.outcome.signatures]
    assert statuses(result) == [AuthStatus.FAIL, AuthStatus.PASS]
    assert len(prefixes[0]) == len(prefixes[1]) == 13
    assert prefixes[0] != prefixes[1]
    assert real_b.startswith(prefixes[1]) and twin.startswith(prefixes[0])


# ----- failures ---------------------------------------------------------------------------------

def test_tampered_body_fails(dns_server: Any, engine: Engine, rsa: Key) -> None:
    publish(dns_server, rsa, "sel1", DOMAIN)
    signed = sign(MESSAGE, rsa, "sel1", DOMAIN)
    result = run_check(dkim_check, engine, signed.replace(b"in spirit", b"in person"))
    assert statuses(result) == [AuthStatus.FAIL]
    assert result.outcome.signatures[0].reason == "body hash mismatch"
    assert symbol_names(result) == ["DKIM_REJECT"]
    assert "d=example.org s=sel1" in result.symbols[0].reason
    assert 'reason="body hash mismatch"' in ar_text(result)
    authresults.parse(ar_text(result))


def test_tampered_signed_header_fails(dns_server: Any, engine: Engine) -> None:
    key = ed25519_key()
    publish(dns_server, key, "ed", DOMAIN)
    signed = sign(MESSAGE, key, "ed", DOMAIN)
    result = run_check(dkim_check, engine, signed.replace(b"Quarterly figures", b"Wire $5000 now"))
    assert statuses(result) == [AuthStatus.FAIL]
    assert result.outcome.signatures[0].reason == "signature did not verify"
    assert symbol_names(result) == ["DKIM_REJECT"]


def test_added_second_from_breaks_an_oversigned_from(dns_server: Any, engine: Engine,
                                                     rsa: Key) -> None:
    publish(dns_server, rsa, "sel1", DOMAIN)
    signed = sign(MESSAGE, rsa, "sel1", DOMAIN)   # dkimpy signs From twice by default
    spoofed = b"From: CEO <ceo@example.org>\r\n" + signed
    assert statuses(run_check(dkim_check, engine, spoofed)) == [AuthStatus.FAIL]


def test_short_rsa_key_fails(dns_server: Any, engine: Engine) -> None:
    short = rsa_key(512)
    publish(dns_server, short, "weak", DOMAIN)
    result = run_check(dkim_check, engine, sign(MESSAGE, short, "weak", DOMAIN))
    assert statuses(result) == [AuthStatus.FAIL]
    assert "512 bits" in result.outcome.signatures[0].reason
    assert symbol_names(result) == ["DKIM_REJECT"]


def test_min_rsa_bits_is_configurable(dns_server: Any, make_engine: Callable[..., Engine]) -> None:
    key = rsa_key(1024)
    publish(dns_server, key, "k1024", DOMAIN)
    signed = sign(MESSAGE, key, "k1024", DOMAIN)
    assert statuses(run_check(dkim_check, make_engine(), signed)) == [AuthStatus.PASS]
    strict = make_engine({"dkim": {"min_rsa_bits": 2048}})
    assert statuses(run_check(dkim_check, strict, signed)) == [AuthStatus.FAIL]


def test_rsa_sha1_never_passes(dns_server: Any, engine: Engine, rsa: Key) -> None:
    publish(dns_server, rsa, "sel1", DOMAIN)
    signed = sign(MESSAGE, rsa, "sel1", DOMAIN, algorithm=b"rsa-sha1")
    result = run_check(dkim_check, engine, signed)
    assert statuses(result) == [AuthStatus.POLICY]   # cryptographically valid, RFC 8301 says no
    assert "rsa-sha1" in result.outcome.signatures[0].reason
    assert symbol_names(result) == ["DKIM_PERMFAIL"]
    forged = run_check(dkim_check, engine, signed.replace(b"in spirit", b"in cash"))
    assert statuses(forged) == [AuthStatus.FAIL]


def test_testing_mode_failure_is_treated_like_unsigned_mail(dns_server: Any, engine: Engine,
                                                            rsa: Key) -> None:
    publish(dns_server, rsa, "sel1", DOMAIN, extra="t=y")
    signed = sign(MESSAGE, rsa, "sel1", DOMAIN)
    good = run_check(dkim_check, engine, signed)
    assert statuses(good) == [AuthStatus.PASS] and "testing" in ar_text(good)
    bad = run_check(dkim_check, engine, signed.replace(b"in spirit", b"in person"))
    assert statuses(bad) == [AuthStatus.FAIL]            # reported as it is...
    assert symbol_names(bad) == ["DKIM_NA"]             # ...but not scored (RFC 6376 3.6.1)


# ----- key problems: permerror ------------------------------------------------------------------

def test_missing_key_is_permerror(dns_server: Any, engine: Engine, rsa: Key) -> None:
    result = run_check(dkim_check, engine, sign(MESSAGE, rsa, "nokey", DOMAIN))
    assert statuses(result) == [AuthStatus.PERMERROR]
    assert "no key at nokey._domainkey.example.org" in result.outcome.signatures[0].reason
    assert symbol_names(result) == ["DKIM_PERMFAIL"]


@pytest.mark.parametrize("record, why", [
    ("v=DKIM1; k=rsa; p=", "revoked"),
    ("v=DKIM1; k=rsa", "no p="),
    ("v=DKIM2; k=rsa; p=MIIBIjAN", "not DKIM1"),
    ("v=DKIM1; k=dsa; p=AAAA", "unknown key type"),
    ("v=DKIM1; k=ed25519; p=AAAA", "does not match"),
    ("v=DKIM1; h=sha1; p=KEY", "does not allow sha256"),
    ("v=DKIM1; s=tlsrpt; p=KEY", "not for email"),
    ("v=DKIM1; p=not*base64", "not base64"),
    ("v=DKIM1; p=AAAAAAAA", "unparseable RSA key"),
    ("v=DKIM1; p; q", "syntax error"),
])
def test_unusable_key_records_are_permerror(dns_server: Any, engine: Engine, rsa: Key,
                                            record: str, why: str) -> None:
    dns_server.add("sel1._domainkey.example.org", "TXT", record.replace("KEY", rsa.public_b64))
    result = run_check(dkim_check, engine, sign(MESSAGE, rsa, "sel1", DOMAIN))
    assert statuses(result) == [AuthStatus.PERMERROR]
    assert why in result.outcome.signatures[0].reason
    authresults.parse(ar_text(result))


def test_key_with_several_services_and_hashes_is_usable(dns_server: Any, engine: Engine,
                                                        rsa: Key) -> None:
    # dkimpy's own key evaluation drops a key with s=email:web; RFC 6376 3.6.1 allows a list.
    publish(dns_server, rsa, "sel1", DOMAIN, extra="s=email:web; h=sha1:sha256; n=notes")
    assert statuses(run_check(dkim_check, engine, sign(MESSAGE, rsa, "sel1", DOMAIN))) == [
        AuthStatus.PASS]


def test_oversized_rsa_key_is_permerror(dns_server: Any, make_engine: Callable[..., Engine],
                                        rsa: Key) -> None:
    publish(dns_server, rsa, "sel1", DOMAIN)
    engine = make_engine({"dkim": {"max_rsa_bits": 1024}})
    result = run_check(dkim_check, engine, sign(MESSAGE, rsa, "sel1", DOMAIN))
    assert statuses(result) == [AuthStatus.PERMERROR]
    assert "2048 bits is longer than 1024" in result.outcome.signatures[0].reason


# ----- DNS failures: temperror, never fail ------------------------------------------------------

@pytest.mark.parametrize("behaviour", ["servfail", "timeout"])
def test_key_lookup_dns_failure_is_temperror(dns_server: Any, engine: Engine, rsa: Key,
                                             behaviour: str) -> None:
    publish(dns_server, rsa, "sel1", DOMAIN)
    dns_server.on("sel1._domainkey.example.org", behaviour)
    result = run_check(dkim_check, engine, sign(MESSAGE, rsa, "sel1", DOMAIN))
    assert statuses(result) == [AuthStatus.TEMPERROR]
    assert symbol_names(result) == ["DKIM_TEMPFAIL"]
    assert "DKIM_REJECT" not in symbol_names(result)
    assert "dkim=temperror" in ar_text(result)
    authresults.parse(ar_text(result))


def test_temperror_beside_a_pass_is_still_valid(dns_server: Any, engine: Engine, rsa: Key) -> None:
    publish(dns_server, rsa, "sel1", DOMAIN)
    dns_server.on("slow._domainkey.example.net", "servfail")
    signed = sign(sign(MESSAGE, rsa, "sel1", DOMAIN), rsa, "slow", "example.net")
    result = run_check(dkim_check, engine, signed)
    assert statuses(result) == [AuthStatus.TEMPERROR, AuthStatus.PASS]
    assert symbol_names(result) == ["DKIM_VALID"]


# ----- malformed signatures: permerror, never an exception --------------------------------------

@pytest.mark.parametrize("value", [
    "garbage",
    "v=1; a=rsa-sha256",
    "v=1; a=rsa-sha256; d=example.org; s=sel1; h=from; bh=; b=",
    "v=1; a=rsa-md5; d=example.org; s=sel1; h=from; bh=AAAA; b=AAAA",
    "v=1; a=rsa-sha256; c=odd/ball; d=example.org; s=sel1; h=from; bh=AAAA; b=AAAA",
    "v=1; a=rsa-sha256; d=example.org; s=sel1; h=from; bh=AAAA; b=AAAA; l=",
    "v=1; a=rsa-sha256; d=example.org; s=sel1; h=from; bh=!!!!; b=AAAA",
    "v=1; a=rsa-sha256; d=example.org; s=sel1; h=to:subject; bh=AAAA; b=AAAA",
    "v=1; v=1; a=rsa-sha256",
    "v=1; a=rsa-sha256; d=ex\u00e4mple.org; s=sel1; h=from; bh=AAAA; b=AAAA",
    "v=1; a=rsa-sha256; d=example.org; s=a b; h=from; bh=AAAA; b=AAAA",
    "v=1; a=rsa-sha256; d=example.org; s=sel1; h=from; bh=AAAA; b=AAAA; t=99999999999",
    "v=1; a=rsa-sha256; d=example.org; s=sel1; h=from; bh=AAAA; b=AAAA; x=1",
    "v=1; a=rsa-sha256; d=example.org; s=sel1; h=from; i=a@example.com; bh=AAAA; b=AAAA",
    "",
])
def test_malformed_signatures_are_permerror_or_fail(dns_server: Any, engine: Engine, rsa: Key,
                                                    value: str) -> None:
    publish(dns_server, rsa, "sel1", DOMAIN)
    raw = f"DKIM-Signature: {value}\r\n".encode() + MESSAGE
    result = run_check(dkim_check, engine, raw)
    assert len(result.outcome.signatures) == 1
    assert statuses(result)[0] in (AuthStatus.PERMERROR, AuthStatus.FAIL)
    authresults.parse(ar_text(result))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.binary(max_size=300))
def test_no_signature_value_makes_the_check_raise(dns_server: Any, engine: Engine,
                                                  value: bytes) -> None:
    raw = b"DKIM-Signature: " + value.replace(b"\n", b" ").replace(b"\r", b" ") + b"\r\n" + MESSAGE
    result = run_check(dkim_check, engine, raw)
    assert all(s.status is not AuthStatus.PASS for s in result.outcome.signatures)
    authresults.parse(ar_text(result))


def test_signature_parsing_follows_rfc6376_where_dkimpy_does_not() -> None:
    base = (b"v=1; a=rsa-sha256; d=messiah.edu; s=sel; h=from:to; bh=AAAA; b=AAAA; "
            b"q=foo/bar:dns/txt:exam/ple; i=jlong=40messiah.edu")
    sig, headers = dkim_check.parse_signature(base)   # unknown q= methods ignored, i= decoded
    assert headers == [b"from", b"to"]
    with pytest.raises(dkim_check.SignatureProblem, match="q=http"):
        dkim_check.parse_signature(base.replace(b"foo/bar:dns/txt:exam/ple", b"http"))
    with pytest.raises(dkim_check.SignatureProblem, match="From is not signed"):
        dkim_check.parse_signature(base.replace(b"h=from:to", b"h=to:subject"))
    assert dkim_check.qp_decode(b"jlong@messiah=2Eedu") == b"jlong@messiah.edu"


def test_no_signature_is_none(engine: Engine) -> None:
    result = run_check(dkim_check, engine, MESSAGE)
    assert result.outcome.signatures == ()
    assert symbol_names(result) == ["DKIM_NA"]
    assert ar_text(result) == "mx.test.example; dkim=none"


# ----- through the pipeline ---------------------------------------------------------------------

def test_pipeline_reports_dkim_in_authentication_results(dns_server: Any,
                                                         make_engine: Callable[..., Engine],
                                                         rsa: Key) -> None:
    publish(dns_server, rsa, "sel1", DOMAIN)
    engine = make_engine({"spf": {"enabled": False}, "dmarc": {"enabled": False},
                          "iprev": {"enabled": False}, "helo": {"enabled": False},
                          "arc": {"enabled": False}})
    verdict = evaluate(Envelope(client_ip="192.0.2.1", helo="mail.example.org",
                                mail_from="alice@example.org"),
                       sign(MESSAGE, rsa, "sel1", DOMAIN), engine)
    assert "DKIM_VALID" in verdict.symbol_names()
    assert not any(n.endswith("_ERROR") for n in verdict.symbol_names())
    header = authresults.parse(verdict.authentication_results)
    dkim_results = [r for r in header.results if r.method == "dkim"]
    assert [r.result for r in dkim_results] == ["pass"]


# ----- the shortcut for messages without signatures -----------------------------------------------

_NAMES = ["DKIM-Signature", "dkim-signature", "DKIM-Signature ", "X-DKIM-Signature", "Subject",
          "ARC-Seal", "arc-message-signature", "ARC-Authentication-Results\t", "From", ""]
_SEPARATORS = ["\r\n", "\n", "\r", ""]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from([":", " :", ""]),
                          st.sampled_from(["", " v", " DKIM-Signature: x", "\r\n\tfold"]),
                          st.sampled_from(_SEPARATORS)), max_size=6),
       st.sampled_from(["", "\r\n", "\n", "\r\n\r\n", "\n\n"]),
       st.sampled_from(["", "body\r\n", "DKIM-Signature: v=1\r\nARC-Seal: i=1\r\n"]))
def test_no_field_is_missed_where_the_shortcut_says_none_can_be(
        fields: list[tuple[str, str, str, str]], lead: str, body: str) -> None:
    """``may_hold_field`` False (DKIM and ARC then skip dkimpy) only when dkimpy's split of the
    same bytes really holds no such field: the shortcut never hides a signature."""
    from trustmilter.checks.arc import _ARC_FIELD
    raw = (lead + "".join(n + c + v + s for n, c, v, s in fields) + "\r\n\r\n" + body).encode()
    headers, _body = dkim_check.dkimpy_message(raw)
    names = [bytes(h[0]).lower().rstrip(b" \t") for h in headers]
    message = ParsedMessage.parse(raw)
    if not dkim_check.may_hold_field(message, dkim_check._SIGNATURE_FIELD):
        assert b"dkim-signature" not in [bytes(h[0]).lower() for h in headers]
    if not dkim_check.may_hold_field(message, _ARC_FIELD):
        assert not any(n in dkim.ARC.ARC_HEADERS for n in names)   # dkimpy's own list


@pytest.mark.parametrize("raw, dkim_possible, arc_possible", [
    (b"From: a@b.test\r\n\r\nDKIM-Signature: v=1\r\nARC-Seal: i=1\r\n", False, False),
    (b"From: a@b.test\r\ndkim-SIGNATURE: v=1\r\n\r\nbody", True, False),
    (b"\r\nDKIM-Signature: v=1\r\n", True, False),       # no header block: dkimpy reads it all
    (b"From: a@b.test\r\nArc-Seal: i=1\r\n", False, True),  # no body
])
def test_the_shortcut_reads_only_what_dkimpy_takes_for_headers(
        raw: bytes, dkim_possible: bool, arc_possible: bool) -> None:
    from trustmilter.checks.arc import _ARC_FIELD
    message = ParsedMessage.parse(raw)
    assert dkim_check.may_hold_field(message, dkim_check._SIGNATURE_FIELD) is dkim_possible
    assert dkim_check.may_hold_field(message, _ARC_FIELD) is arc_possible


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"A", b"x", b":", b" "]), max_size=40))
def test_the_header_block_ends_where_dkimpys_split_ends_it(parts: list[bytes]) -> None:
    """The block the shortcut searches ends exactly where the regex ``\\r?\\n\\r?\\n`` of
    dkimpy_message first matches (all of the message when none, or when it starts with an empty
    line), for every mix of CR, LF and text; asked twice, the same answer."""
    raw = b"".join(parts)
    end = dkim_check._HEADER_END.search(raw)
    expected = raw if end is None or raw.startswith((b"\n", b"\r\n")) else raw[:end.start()]
    message = ParsedMessage.parse(raw)
    for names in ((b"a",), (b"x:",), (b"zz",), (b"a",)):
        assert dkim_check.may_hold_field(message, names) is any(
            n in expected.lower() for n in names)
