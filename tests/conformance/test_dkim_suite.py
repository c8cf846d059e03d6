"""DKIM verification vectors from testsuites/dkim (RFC 8463, dkimpy, Mail::DKIM) and the DKIM rows
of testsuites/dmarc/rspamd/cases.tsv: one pytest id per case.

Every case runs ``trustmilter.checks.dkim.run`` (the pipeline's code path: our DNS client, a
message DNS session) with the suite's key records served by the real test DNS server.
Runner rules are those of the suites' READMEs:
- mail-dkim: FAKE_DNS.dat ``NXDOMAIN`` = no record, ``~~Query timed out~~`` / ``~~SERVFAIL~~`` =
  DNS errors (temperror), ``""`` = an empty TXT; ``fail``/``invalid`` rows must not pass;
  DomainKeys-only messages (``signature_kind`` domainkeys) carry no DKIM-Signature: dkim=none.
- rspamd: ``dns-plugins.yaml``; names not listed answer NXDOMAIN; rcode TIMEOUT/SERVFAIL are DNS
  errors; "permerror (or neutral/policy)" accepts any of the three.
Where we differ from a suite's expectation, the case is a strict xfail whose reason says why, and
the test first checks that our result is exactly the documented one (a different deviation is a
plain failure, never hidden by the xfail).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tests.conftest import TESTSUITES
from tests.keys import run_check
from trustmilter.checks import dkim as dkim_check
from trustmilter.pipeline import Engine
from trustmilter.types import AuthStatus, Envelope

pytestmark = pytest.mark.conformance

DKIM_DIR = TESTSUITES / "dkim"
RSPAMD_DIR = TESTSUITES / "dmarc" / "rspamd"
NOT_PASS = "not pass"


@dataclass(frozen=True)
class Deviation:
    """Why we differ from the suite, and what we do instead (checked before the xfail)."""

    why: str
    status: AuthStatus            # our status for the signature(s) concerned
    reason_contains: str          # a piece of our reason


PRE_RFC_NO_V = Deviation(
    "Pre-RFC 6376 draft signature without v=: RFC 6376 3.5 makes v= REQUIRED (and 6.1.1 says "
    "verifiers MUST ignore signatures that lack it), so it is a permerror. Mail::DKIM still "
    "accepts the 2005-2007 draft formats.", AuthStatus.PERMERROR, "missing v=")
PRE_RFC_Q_DNS = Deviation(
    "Draft signature with q=dns, a query method of the pre-RFC drafts; RFC 6376 3.5 defines only "
    "dns/txt and unknown methods are ignored, leaving none: permerror.",
    AuthStatus.PERMERROR, "q=dns")
PRE_RFC_V05 = Deviation(
    "Draft signature with v=0.5: RFC 6376 3.5 says v= MUST be 1: permerror.",
    AuthStatus.PERMERROR, "v= value is not 1")
SHORT_KEY = Deviation(
    "Signed with a 512-bit RSA key: RFC 8301 3.2 says verifiers MUST NOT consider signatures "
    "with RSA keys under 1024 bits valid (dkim.min_rsa_bits): fail. (These 2007 signatures are "
    "also rsa-sha1, which RFC 8301 3.1 rejects too; test_mail_dkim_short_key_rows_... shows they "
    "verify cryptographically once 512 bits are allowed.)",
    AuthStatus.FAIL, "512 bits")
RSA_SHA1 = Deviation(
    "rsa-sha1 signature: RFC 8301 3.1 says verifiers MUST NOT consider rsa-sha1 signatures "
    "valid. It verifies cryptographically, so it is reported as policy, not pass.",
    AuthStatus.POLICY, "rsa-sha1")

MAIL_DKIM_DEVIATIONS: dict[str, Deviation] = {
    **{f"good_ietf00_{i}.txt": PRE_RFC_NO_V for i in range(1, 6)},
    **{f"mine_ietf01_{i}.txt": PRE_RFC_Q_DNS for i in range(1, 5)},
    "good_ietf01_1.txt": PRE_RFC_NO_V,
    "good_ietf01_2.txt": PRE_RFC_NO_V,
    "multiple_1.txt": PRE_RFC_NO_V,
    "mine_ietf05_1.txt": PRE_RFC_V05,
    **{f"no_body_{i}.txt": PRE_RFC_V05 for i in range(1, 4)},
    **{name: SHORT_KEY for name in (
        "good_rfc4871_3.txt", "good_rfc4871_4.txt", "good_1878523.txt", "good_qp_1.txt",
        "good_qp_2.txt", "good_qp_3.txt", "goodkey_1.txt", "goodkey_2.txt", "goodkey_3.txt",
        "goodkey_4.txt")},
    "good_83176.txt": RSA_SHA1,       # its odd q= list is accepted (RFC 6376 3.5); sha1 is not
    "multiple_2.txt": RSA_SHA1,       # the one upstream pass among its 4 signatures is rsa-sha1
}
# Rows whose DNS error makes the key unfetchable: temperror, exactly (README).
MAIL_DKIM_TEMPERROR = {"badkey_14.txt", "badkey_15.txt"}

RSPAMD_DEVIATIONS: dict[str, Deviation] = {}
# rspamd's functional-test config checks at most 5 signatures (dkim_sigs_at_limit passes on its
# 5th, dkim_many_sigs must not pass on its 6th); these rows test that unparseable signatures
# count towards the limit, so they run with dkim.max_signatures = 5. Our default is 8.
RSPAMD_SIGNATURE_LIMIT = 5


# ----- helpers ----------------------------------------------------------------------------------

def _missing(path: Path, what: str) -> list[Any]:
    return [pytest.param(None, id=f"{what}-suite-missing", marks=pytest.mark.skip(
        reason=f"{what} suite not found at {path} (set TRUSTMILTER_SHARED or provide "
               "../shared/testsuites)"))]


def _tsv_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return [row for row in csv.reader(fh, delimiter="\t")
                if row and not row[0].startswith("#")]


def _serve_txt(dns_server: Any, records: dict[str, str]) -> None:
    for name, value in records.items():
        dns_server.add(name, "TXT", value)


def _statuses(result: Any) -> list[AuthStatus]:
    return [s.status for s in result.outcome.signatures]


def _check_deviation(result: Any, deviation: Deviation | None) -> None:
    """Our result for a documented disagreement must be exactly the documented one."""
    if deviation is None:
        return
    concerned = [s for s in result.outcome.signatures if deviation.reason_contains in s.reason]
    if not concerned or any(s.status is not deviation.status for s in concerned):
        pytest.fail(f"documented deviation no longer describes our result: expected "
                    f"{deviation.status.value} with {deviation.reason_contains!r}, got "
                    f"{[(s.status.value, s.reason) for s in result.outcome.signatures]}")


def _xfail(deviation: Deviation | None) -> list[Any]:
    if deviation is None:
        return []
    return [pytest.mark.xfail(reason=deviation.why, strict=True, raises=AssertionError)]


# ----- RFC 8463 ---------------------------------------------------------------------------------

RFC8463 = DKIM_DIR / "rfc8463"


def _rfc8463_cases() -> list[Any]:
    if not RFC8463.is_dir():
        return _missing(RFC8463, "rfc8463")
    cases = []
    for row in _tsv_rows(RFC8463 / "expected.tsv"):
        filename, signature, expected = row[0], row[1], row[2]
        number = int(signature.split(":", 1)[0])
        cases.append(pytest.param((filename, number, signature, expected),
                                  id=f"rfc8463:{filename}#{number}"))
    return cases


def _rfc8463_setup(dns_server: Any) -> bytes:
    _serve_txt(dns_server, yaml.safe_load((RFC8463 / "dns.yaml").read_text())["txt"])
    return (RFC8463 / "rfc8463-A3.signed.eml").read_bytes()


@pytest.mark.parametrize("case", _rfc8463_cases())
def test_rfc8463(case: Any, dns_server: Any, make_engine: Callable[..., Engine]) -> None:
    filename, number, signature, expected = case
    _serve_txt(dns_server, yaml.safe_load((RFC8463 / "dns.yaml").read_text())["txt"])
    result = run_check(dkim_check, make_engine(), (RFC8463 / filename).read_bytes())
    sig = result.outcome.signatures[number - 1]
    tags = dict(part.split("=", 1) for part in signature.split(":", 1)[1].split())
    assert (sig.algorithm, sig.domain, sig.selector) == (tags["a"], tags["d"], tags["s"])
    assert sig.status.value == expected


# Negative variants the README lists ("a runner can derive itself"): (id, edit, expected per
# signature [ed25519, rsa]).
RFC8463_VARIANTS = [
    ("body-changed", lambda m: m.replace(b"hungry", b"thirsty"),
     [AuthStatus.FAIL, AuthStatus.FAIL]),
    ("subject-changed", lambda m: m.replace(b"dinner", b"lunch"),
     [AuthStatus.FAIL, AuthStatus.FAIL]),
    ("second-from-added", lambda m: b"From: Mallory <mallory@football.example.com>\r\n" + m,
     [AuthStatus.FAIL, AuthStatus.FAIL]),
    ("rsa-as-rsa-sha1", lambda m: m.replace(b"a=rsa-sha256", b"a=rsa-sha1"),
     [AuthStatus.PASS, NOT_PASS]),
]


@pytest.mark.parametrize("case", [pytest.param((e, x), id=f"rfc8463:variant-{name}")
                                  for name, e, x in RFC8463_VARIANTS]
                         if RFC8463.is_dir() else _missing(RFC8463, "rfc8463"))
def test_rfc8463_variants(case: Any, dns_server: Any, make_engine: Callable[..., Engine]) -> None:
    edit, expected = case
    raw = edit(_rfc8463_setup(dns_server))
    got = _statuses(run_check(dkim_check, make_engine(), raw))
    assert len(got) == len(expected)
    for status, want in zip(got, expected, strict=True):
        assert status is not AuthStatus.PASS if want == NOT_PASS else status is want


@pytest.mark.parametrize("case", [pytest.param(None, id="rfc8463:variant-rsa-key-removed")]
                         if RFC8463.is_dir() else _missing(RFC8463, "rfc8463"))
def test_rfc8463_key_removed(case: Any, dns_server: Any,
                             make_engine: Callable[..., Engine]) -> None:
    records = yaml.safe_load((RFC8463 / "dns.yaml").read_text())["txt"]
    del records["test._domainkey.football.example.com"]
    _serve_txt(dns_server, records)
    result = run_check(dkim_check, make_engine(), (RFC8463 / "rfc8463-A3.signed.eml").read_bytes())
    assert _statuses(result) == [AuthStatus.PASS, AuthStatus.PERMERROR]


# ----- dkimpy interop messages ------------------------------------------------------------------

DKIMPY = DKIM_DIR / "dkimpy"


def _dkimpy_cases() -> list[Any]:
    if not DKIMPY.is_dir():
        return _missing(DKIMPY, "dkimpy")
    return [pytest.param((row[0], [s.strip() for s in row[2].split(";")]), id=f"dkimpy:{row[0]}")
            for row in _tsv_rows(DKIMPY / "expected.tsv")]


@pytest.mark.parametrize("case", _dkimpy_cases())
def test_dkimpy_messages(case: Any, dns_server: Any, make_engine: Callable[..., Engine]) -> None:
    filename, expected = case
    _serve_txt(dns_server, yaml.safe_load((DKIMPY / "dns.yaml").read_text())["txt"])
    result = run_check(dkim_check, make_engine(), (DKIMPY / filename).read_bytes())
    assert [s.value for s in _statuses(result)] == expected


# ----- Mail::DKIM corpus ------------------------------------------------------------------------

MAIL_DKIM = DKIM_DIR / "mail-dkim"


def _mail_dkim_cases() -> list[Any]:
    if not MAIL_DKIM.is_dir():
        return _missing(MAIL_DKIM, "mail-dkim")
    cases = []
    for row in _tsv_rows(MAIL_DKIM / "expected.tsv"):
        filename, expected, kind = row[0], row[1], row[2]
        deviation = MAIL_DKIM_DEVIATIONS.get(filename)
        cases.append(pytest.param((filename, expected, kind, deviation),
                                  id=f"mail-dkim:{filename}", marks=_xfail(deviation)))
    return cases


def _serve_fake_dns(dns_server: Any) -> None:
    for line in (MAIL_DKIM / "FAKE_DNS.dat").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, value = line.strip().partition(" ")
        value = value.strip()
        if value == "NXDOMAIN":
            continue
        if value == "~~Query timed out~~":
            dns_server.on(name, "timeout")
        elif value == "~~SERVFAIL~~":
            dns_server.on(name, "servfail")
        else:
            dns_server.add(name, "TXT", "" if value == '""' else value)


@pytest.mark.parametrize("case", _mail_dkim_cases())
def test_mail_dkim_corpus(case: Any, dns_server: Any, make_engine: Callable[..., Engine]) -> None:
    filename, expected, kind, deviation = case
    _serve_fake_dns(dns_server)
    result = run_check(dkim_check, make_engine(), (MAIL_DKIM / "corpus" / filename).read_bytes())
    got = _statuses(result)
    if kind == "domainkeys":
        # DomainKeys (RFC 4870, historic) is not DKIM: a DKIM verifier reports none.
        assert got == [] and [s.name for s in result.symbols] == ["DKIM_NA"]
        return
    assert got, "a DKIM-Signature was expected"
    _check_deviation(result, deviation)
    if filename in MAIL_DKIM_TEMPERROR:
        assert got == [AuthStatus.TEMPERROR]
        assert [s.name for s in result.symbols] == ["DKIM_TEMPFAIL"]
    if expected == "pass":
        assert AuthStatus.PASS in got
    else:   # fail / invalid: never a pass
        assert AuthStatus.PASS not in got


@pytest.mark.parametrize("case", [pytest.param(None, id="mail-dkim:multiple_2.txt#each-signature")]
                         if MAIL_DKIM.is_dir() else _missing(MAIL_DKIM, "mail-dkim"))
def test_mail_dkim_every_signature_is_reported(case: Any, dns_server: Any,
                                               make_engine: Callable[..., Engine]) -> None:
    # README: 4 signatures (invalid c=, pass, fail, syntax error); the "pass" is rsa-sha1.
    _serve_fake_dns(dns_server)
    raw = (MAIL_DKIM / "corpus" / "multiple_2.txt").read_bytes()
    result = run_check(dkim_check, make_engine(), raw)
    assert _statuses(result) == [AuthStatus.PERMERROR, AuthStatus.POLICY, AuthStatus.FAIL,
                                 AuthStatus.PERMERROR]
    assert len(result.authres) == 4


# ----- rspamd DKIM rows -------------------------------------------------------------------------

def _rspamd_cases() -> list[Any]:
    if not (RSPAMD_DIR / "cases.tsv").is_file():
        return _missing(RSPAMD_DIR, "rspamd")
    cases = []
    for row in _tsv_rows(RSPAMD_DIR / "cases.tsv"):
        if row[0] != "dkim":
            continue
        case = dict(zip(("suite", "case", "message", "client_ip", "envelope_from", "helo",
                         "expect_symbols", "must_not_symbols", "expected", "must_not",
                         "dns_file", "note", "upstream"), row, strict=False))
        deviation = RSPAMD_DEVIATIONS.get(case["case"])
        cases.append(pytest.param(case, id=f"rspamd:{case['case']}", marks=_xfail(deviation)))
    return cases


def _serve_rspamd(dns_server: Any, dns_file: str) -> None:
    for record in yaml.safe_load((RSPAMD_DIR / dns_file).read_text())["records"]:
        rcode = record.get("rcode")
        if rcode in ("TIMEOUT", "SERVFAIL"):
            dns_server.on(record["name"], rcode.lower())
        elif rcode is None and record["type"] == "TXT":
            for value in record["data"]:
                dns_server.add(record["name"], "TXT", value)
        # NXDOMAIN / NODATA: no TXT record (the only type a DKIM verifier asks for)


@pytest.mark.parametrize("case", _rspamd_cases())
def test_rspamd_dkim(case: dict[str, str], dns_server: Any,
                     make_engine: Callable[..., Engine]) -> None:
    _serve_rspamd(dns_server, case["dns_file"])
    overrides: dict[str, Any] = {}
    if "number of signatures" in case["note"]:
        overrides = {"dkim": {"max_signatures": RSPAMD_SIGNATURE_LIMIT}}
    raw = b"" if case["message"] == "(empty message)" else (
        RSPAMD_DIR / "messages" / case["message"]).read_bytes()
    ip = None if case["client_ip"] == "-" else case["client_ip"]
    result = run_check(dkim_check, make_engine(overrides), raw, Envelope(client_ip=ip))
    _check_deviation(result, RSPAMD_DEVIATIONS.get(case["case"]))
    got = _statuses(result)
    expected = case["expected"]
    if expected == "dkim=pass":
        assert AuthStatus.PASS in got
    elif expected == "dkim=none":
        assert got == []
    elif expected != "-":
        assert got and AuthStatus.PASS not in got
        wanted = {"dkim=fail": {AuthStatus.FAIL},
                  "dkim=temperror": {AuthStatus.TEMPERROR},
                  "dkim=permerror (or neutral/policy)": {AuthStatus.PERMERROR, AuthStatus.NEUTRAL,
                                                         AuthStatus.POLICY}}[expected]
        assert set(got) & wanted, f"{expected} expected, got {[s.value for s in got]}"
    if case["must_not"] == "NOT dkim=pass":
        assert AuthStatus.PASS not in got


@pytest.mark.parametrize("case", [pytest.param(name, id=f"mail-dkim:{name}#512-bit-allowed")
                                  for name, dev in MAIL_DKIM_DEVIATIONS.items() if dev is SHORT_KEY]
                         if MAIL_DKIM.is_dir() else _missing(MAIL_DKIM, "mail-dkim"))
def test_mail_dkim_short_key_rows_verify_when_allowed(case: str, dns_server: Any,
                                                      make_engine: Callable[..., Engine]) -> None:
    """The 512-bit rows are rejected by RFC 8301 only: with dkim.min_rsa_bits lowered they verify
    cryptographically (extra tags, quoted-printable i=, case-differing d=, key flags and g=) and
    are then reported as policy, since they are rsa-sha1 (RFC 8301 3.1)."""
    _serve_fake_dns(dns_server)
    raw = (MAIL_DKIM / "corpus" / case).read_bytes()
    result = run_check(dkim_check, make_engine({"dkim": {"min_rsa_bits": 512}}), raw)
    assert [(s.status, s.algorithm) for s in result.outcome.signatures] == [
        (AuthStatus.POLICY, "rsa-sha1")]
