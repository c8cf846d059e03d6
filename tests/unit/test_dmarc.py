"""DMARC (RFC 7489): record parsing, policy discovery over the real test DNS server, alignment,
policy/pct, From handling, forced actions, ARC override, the Authentication-Results piece, and
end-to-end runs through ``pipeline.evaluate`` with the real SPF and DKIM checks."""
from __future__ import annotations

import base64
from typing import Any, Callable

import dkim
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnsserver import TestDNSServer as DNSServer  # (aliased: pytest collects Test*)
from trustmilter import authresults
from trustmilter.checks import dmarc
from trustmilter.checks.base import CheckContext, CheckResult
from trustmilter.checks.outcomes import (ARCOutcome, DKIMOutcome, DKIMSignatureResult,
                                         DMARCOutcome, SPFOutcome)
from trustmilter.dns import session_for
from trustmilter.message import ParsedMessage
from trustmilter.pipeline import Engine, evaluate
from trustmilter.types import Action, AuthStatus, Envelope

PASS, FAIL, TEMP = AuthStatus.PASS, AuthStatus.FAIL, AuthStatus.TEMPERROR


# ----------------------------------------------------------------------------------------------
# Record parsing
# ----------------------------------------------------------------------------------------------
def test_parse_full_record() -> None:
    rec = dmarc.parse_record("v=DMARC1; p=reject; sp=none; pct=25; adkim=s; aspf=r; fo=1:d; "
                             "rf=afrf; ri=3600; rua=mailto:a@example.com,mailto:b@example.net!10m;"
                             " ruf=mailto:f@example.com")
    assert rec.p is dmarc.Policy.REJECT and rec.sp is dmarc.Policy.NONE
    assert rec.pct == 25 and rec.ri == 3600 and rec.fo == ("1", "d") and rec.rf == ("afrf",)
    assert rec.adkim is dmarc.Alignment.STRICT and rec.aspf is dmarc.Alignment.RELAXED
    assert rec.rua == ("mailto:a@example.com", "mailto:b@example.net!10m")
    assert rec.ruf == ("mailto:f@example.com",) and rec.warnings == () and not rec.p_defaulted
    assert rec.subdomain_policy is dmarc.Policy.NONE


def test_parse_defaults_and_case() -> None:
    rec = dmarc.parse_record("V = DMARC1 ;P=Quarantine;ADKIM=S;unknown=tag;")
    assert rec.p is dmarc.Policy.QUARANTINE and rec.sp is None
    assert rec.subdomain_policy is dmarc.Policy.QUARANTINE
    assert rec.adkim is dmarc.Alignment.STRICT and rec.aspf is dmarc.Alignment.RELAXED
    assert (rec.pct, rec.ri, rec.fo, rec.rf) == (100, 86400, ("0",), ("afrf",))


@pytest.mark.parametrize("text", [
    "", "p=reject", "p=reject; v=DMARC1", "v=DMARC2; p=reject", "v=dmarc1; p=reject",
    "v=DMARC1p=reject", "bio=a263adeab8", "v=spf1 -all", b"\xff\xfe",
])
def test_not_a_dmarc_record(text: str | bytes) -> None:
    assert not dmarc.is_dmarc_record(text)
    for strict in (True, False):
        with pytest.raises(dmarc.NotDMARCRecord):
            dmarc.parse_record(text, strict=strict)


@pytest.mark.parametrize(("text", "error"), [
    ("v=DMARC1", dmarc.InvalidPolicyError),
    ("v=DMARC1; p=bogus", dmarc.InvalidPolicyError),
    ("v=DMARC1; p=none; sp=maybe", dmarc.InvalidPolicyError),
    ("v=DMARC1; p=none; pct=101", dmarc.TagValueError),
    ("v=DMARC1; p=none; pct=-1", dmarc.TagValueError),
    ("v=DMARC1; p=none; pct=ten", dmarc.TagValueError),
    ("v=DMARC1; p=none; adkim=x", dmarc.TagValueError),
    ("v=DMARC1; p=none; aspf=relaxed", dmarc.TagValueError),
    ("v=DMARC1; p=none; fo=2", dmarc.TagValueError),
    ("v=DMARC1; p=none; ri=soon", dmarc.TagValueError),
    ("v=DMARC1; p=none; ri=99999999999", dmarc.TagValueError),
    ("v=DMARC1; p=none; rua=not a uri", dmarc.TagValueError),
    ("v=DMARC1; p=none; garbage", dmarc.TagSyntaxError),
    ("v=DMARC1; p=none; 1x=2", dmarc.TagSyntaxError),
    ("v=DMARC1; p=none; v=DMARC1", dmarc.TagSyntaxError),
    ("v=DMARC1; p=none; p=reject", dmarc.DuplicateTagError),
])
def test_strict_parser_raises_typed_errors(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        dmarc.parse_record(text)
    assert issubclass(error, dmarc.DMARCRecordError)


def test_lenient_parser_discards_bad_optional_tags() -> None:
    rec = dmarc.parse_record("v=DMARC1; p=reject; pct=500; adkim=x; garbage; fo=9",
                             strict=False)
    assert rec.p is dmarc.Policy.REJECT and rec.pct == 100
    assert rec.adkim is dmarc.Alignment.RELAXED and rec.fo == ("0",)
    assert len(rec.warnings) == 4 and not rec.p_defaulted


@pytest.mark.parametrize("text", ["v=DMARC1; p=bogus; rua=mailto:r@example.com",
                                  "v=DMARC1; rua=mailto:r@example.com",
                                  "v=DMARC1; p=reject; sp=x; rua=mailto:r@example.com"])
def test_invalid_policy_with_valid_rua_is_p_none(text: str) -> None:
    """RFC 7489 6.6.3: act as if v=DMARC1; p=none was retrieved."""
    rec = dmarc.parse_record(text, strict=False)
    assert rec.p is dmarc.Policy.NONE and rec.sp is None and rec.p_defaulted


@pytest.mark.parametrize("text", ["v=DMARC1", "v=DMARC1; p=bogus", "v=DMARC1; p=bogus; rua=junk",
                                  "v=DMARC1; p=none; p=reject; rua=mailto:r@example.com x"])
def test_invalid_policy_without_valid_rua_raises(text: str) -> None:
    with pytest.raises(dmarc.InvalidPolicyError):
        dmarc.parse_record(text, strict=False)


# ----------------------------------------------------------------------------------------------
# Harness: dmarc.run with hand-made SPF/DKIM/ARC outcomes, DNS from the real test server
# ----------------------------------------------------------------------------------------------
def message(*froms: str, message_id: str | None = "<m1@example.com>",
            extra: str = "") -> bytes:
    head = "".join(f"From: {f}\r\n" for f in froms)
    if message_id is not None:
        head += f"Message-ID: {message_id}\r\n"
    return (head + extra + "To: bob@example.net\r\nSubject: hello\r\n\r\nbody\r\n").encode()


def spf(status: AuthStatus, domain: str | None) -> SPFOutcome:
    return SPFOutcome(mailfrom=status, domain=domain)


def dkim_sigs(*sigs: tuple[AuthStatus, str]) -> DKIMOutcome:
    return DKIMOutcome(tuple(DKIMSignatureResult(status, domain, "sel", "abcdefgh", "rsa-sha256")
                             for status, domain in sigs))


def run_dmarc(engine: Engine, raw: bytes, *, spf_outcome: Any = None, dkim_outcome: Any = None,
              arc_outcome: Any = None, results: dict[str, CheckResult] | None = None,
              envelope: Envelope | None = None) -> CheckResult:
    given = dict(results or {})
    for name, outcome in (("spf", spf_outcome), ("dkim", dkim_outcome), ("arc", arc_outcome)):
        if outcome is not None:
            given[name] = CheckResult(outcome=outcome)
    ctx = CheckContext(envelope=envelope or Envelope(client_ip="192.0.2.1", helo="mx.example.net",
                                                     mail_from="bounce@example.com"),
                       message=ParsedMessage.parse(raw), dns=session_for(engine.resolver, 3.0),
                       config=engine.config, engine=engine, results=given)
    return dmarc.run(ctx)


def names(result: CheckResult) -> set[str]:
    return {s.name for s in result.symbols}


def outcome_of(result: CheckResult) -> DMARCOutcome:
    assert isinstance(result.outcome, DMARCOutcome)
    return result.outcome


def ar_text(engine: Engine, result: CheckResult) -> str:
    return authresults.build(engine.config.authserv_id, result.authres)


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine()


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------
def test_record_at_from_domain_pass_via_dkim(engine: Engine, dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    res = run_dmarc(engine, message("Alice <alice@example.com>"),
                    spf_outcome=spf(FAIL, "example.com"),
                    dkim_outcome=dkim_sigs((PASS, "example.com")))
    out = outcome_of(res)
    assert (out.status, out.from_domain, out.policy_domain, out.policy) == \
        (PASS, "example.com", "example.com", "reject")
    assert out.dkim_aligned and not out.spf_aligned
    assert names(res) == {"DMARC_POLICY_ALLOW"} and res.forced is None
    # On a pass nothing is done to the message: the disposition is none.
    assert ("dmarc=pass (p=reject dis=none) header.from=example.com policy.dmarc=none"
            in ar_text(engine, res))


def test_pass_via_aligned_spf(engine: Engine, dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    res = run_dmarc(engine, message("alice@example.com"),
                    spf_outcome=spf(PASS, "bounce.example.com"),
                    dkim_outcome=dkim_sigs((PASS, "mailer.example.net")))
    out = outcome_of(res)
    assert out.status is PASS and out.spf_aligned and not out.dkim_aligned


def test_fallback_to_org_domain_in_private_section(engine: Engine,
                                                   dns_server: DNSServer) -> None:
    """za.org is a suffix in the PSL's private section: the org domain of a.b.yoni.za.org is
    yoni.za.org, never za.org."""
    dns_server.add("_dmarc.yoni.za.org", "TXT", "v=DMARC1; p=reject; sp=quarantine")
    dns_server.add("_dmarc.za.org", "TXT", "v=DMARC1; p=none")
    res = run_dmarc(engine, message("x@a.b.yoni.za.org"), spf_outcome=spf(FAIL, "a.b.yoni.za.org"),
                    dkim_outcome=dkim_sigs())
    out = outcome_of(res)
    assert (out.status, out.policy_domain, out.policy, out.applied_policy) == \
        (FAIL, "yoni.za.org", "quarantine", "quarantine")
    asked = [q[0] for q in dns_server.queries if q[1] == "TXT"]
    assert asked == ["_dmarc.a.b.yoni.za.org", "_dmarc.yoni.za.org"]
    assert "DMARC_POLICY_QUARANTINE" in names(res)


def test_relaxed_alignment_across_private_suffix_siblings_fails(engine: Engine,
                                                                dns_server: DNSServer) -> None:
    # alice.za.org and mallory.za.org are different organizations.
    dns_server.add("_dmarc.alice.za.org", "TXT", "v=DMARC1; p=reject")
    res = run_dmarc(engine, message("a@alice.za.org"), spf_outcome=spf(PASS, "mallory.za.org"),
                    dkim_outcome=dkim_sigs((PASS, "mallory.za.org")))
    assert outcome_of(res).status is FAIL and "DMARC_POLICY_REJECT" in names(res)


def test_sp_applies_only_to_subdomains_via_org_record(engine: Engine,
                                                      dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject; sp=none")
    org = run_dmarc(engine, message("a@example.com"), spf_outcome=spf(FAIL, "example.com"),
                    dkim_outcome=dkim_sigs())
    sub = run_dmarc(engine, message("a@sub.example.com"), spf_outcome=spf(FAIL, "x.example.com"),
                    dkim_outcome=dkim_sigs())
    assert outcome_of(org).applied_policy == "reject" and "DMARC_POLICY_REJECT" in names(org)
    assert outcome_of(sub).applied_policy == "none" and "DMARC_POLICY_SOFTFAIL" in names(sub)
    assert outcome_of(sub).policy_domain == "example.com" and sub.forced is None


def test_record_at_subdomain_uses_its_p_not_sp(engine: Engine, dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.sub.example.com", "TXT", "v=DMARC1; p=reject; sp=none")
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=none")
    res = run_dmarc(engine, message("a@sub.example.com"), spf_outcome=spf(FAIL, "example.com"),
                    dkim_outcome=dkim_sigs())
    out = outcome_of(res)
    assert (out.policy_domain, out.policy) == ("sub.example.com", "reject")


def test_no_record_anywhere_is_none(engine: Engine, dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "bio=a263adeab8")     # not a DMARC record
    res = run_dmarc(engine, message("a@sub.example.com"), spf_outcome=spf(FAIL, "example.com"),
                    dkim_outcome=dkim_sigs())
    assert outcome_of(res).status is AuthStatus.NONE and names(res) == {"DMARC_NA"}
    assert "dmarc=none header.from=sub.example.com" in ar_text(engine, res)


def test_multiple_records_mean_none_without_fallback(engine: Engine,
                                                     dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.sub.example.com", "TXT", "v=DMARC1; p=reject")
    dns_server.add("_dmarc.sub.example.com", "TXT", "v=DMARC1; p=quarantine")
    dns_server.add("_dmarc.sub.example.com", "TXT", "unrelated text")
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    res = run_dmarc(engine, message("a@sub.example.com"), spf_outcome=spf(FAIL, "example.com"),
                    dkim_outcome=dkim_sigs())
    assert outcome_of(res).status is AuthStatus.NONE and res.forced is None
    assert [q[0] for q in dns_server.queries if q[1] == "TXT"] == ["_dmarc.sub.example.com"]


def test_one_dmarc_record_among_other_txt(engine: Engine, dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "some-verification=abc")
    dns_server.add("_dmarc.example.com", "TXT", ["v=DMARC1; ", "p=reject"])  # two strings, one RR
    res = run_dmarc(engine, message("a@example.com"), spf_outcome=spf(FAIL, "example.com"),
                    dkim_outcome=dkim_sigs())
    assert outcome_of(res).applied_policy == "reject"


def test_malformed_record_is_permerror(engine: Engine, dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=bogus")
    res = run_dmarc(engine, message("a@example.com"), spf_outcome=spf(FAIL, "example.com"),
                    dkim_outcome=dkim_sigs())
    out = outcome_of(res)
    assert out.status is AuthStatus.PERMERROR and res.forced is None
    assert names(res) == {"DMARC_BAD_POLICY"}
    assert "dmarc=permerror" in ar_text(engine, res)


def test_invalid_p_with_rua_evaluates_as_none(engine: Engine, dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=rejet; rua=mailto:r@example.com")
    res = run_dmarc(engine, message("a@example.com"), spf_outcome=spf(FAIL, "example.com"),
                    dkim_outcome=dkim_sigs())
    out = outcome_of(res)
    assert (out.status, out.applied_policy) == (FAIL, "none")
    assert names(res) == {"DMARC_POLICY_SOFTFAIL", "DMARC_BAD_POLICY"} and res.forced is None


@pytest.mark.parametrize("behaviour", ["servfail", "timeout", "refused"])
def test_dns_failure_on_record_is_temperror(engine: Engine, dns_server: DNSServer,
                                            behaviour: str) -> None:
    dns_server.on("_dmarc.example.com", behaviour)
    res = run_dmarc(engine, message("a@example.com"), spf_outcome=spf(FAIL, "example.com"),
                    dkim_outcome=dkim_sigs())
    out = outcome_of(res)
    assert out.status is TEMP and names(res) == {"DMARC_DNSFAIL"}
    assert res.forced is None                     # temperror_action: accept (the default)
    assert "dmarc=temperror" in ar_text(engine, res)


def test_dns_failure_on_org_fallback_is_temperror(engine: Engine,
                                                  dns_server: DNSServer) -> None:
    dns_server.on("_dmarc.example.com", "servfail")
    res = run_dmarc(engine, message("a@deep.sub.example.com"),
                    spf_outcome=spf(FAIL, "example.com"), dkim_outcome=dkim_sigs())
    assert outcome_of(res).status is TEMP


def test_idn_from_domain_is_queried_as_a_labels(engine: Engine, dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.xn--bcher-kva.example", "TXT", "v=DMARC1; p=reject")
    raw = "From: b\u00fccher@b\u00fccher.example\r\n\r\nx\r\n".encode()
    res = run_dmarc(engine, raw, spf_outcome=spf(PASS, "xn--bcher-kva.example"),
                    dkim_outcome=dkim_sigs())
    assert outcome_of(res).status is PASS and outcome_of(res).from_domain == "xn--bcher-kva.example"


# ----------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("record", "spf_domain", "dkim_domain", "status"), [
    ("v=DMARC1; p=reject", "bounce.example.com", None, PASS),
    ("v=DMARC1; p=reject; aspf=s", "bounce.example.com", None, FAIL),
    ("v=DMARC1; p=reject; aspf=s", "mail.example.com", None, PASS),
    ("v=DMARC1; p=reject", None, "example.com", PASS),
    ("v=DMARC1; p=reject; adkim=s", None, "example.com", FAIL),
    ("v=DMARC1; p=reject; adkim=s", None, "MAIL.Example.COM.", PASS),
    ("v=DMARC1; p=reject", "example.net", "example.org", FAIL),
])
def test_strict_and_relaxed_alignment(engine: Engine, dns_server: DNSServer, record: str,
                                      spf_domain: str | None, dkim_domain: str | None,
                                      status: AuthStatus) -> None:
    dns_server.add("_dmarc.example.com", "TXT", record)
    res = run_dmarc(engine, message("a@mail.example.com"),
                    spf_outcome=spf(PASS if spf_domain else AuthStatus.NONE, spf_domain),
                    dkim_outcome=dkim_sigs(*([(PASS, dkim_domain)] if dkim_domain else [])))
    assert outcome_of(res).status is status


def test_failed_signature_of_aligned_domain_does_not_count(engine: Engine,
                                                           dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    res = run_dmarc(engine, message("a@example.com"), spf_outcome=spf(AuthStatus.SOFTFAIL,
                                                                    "example.com"),
                    dkim_outcome=dkim_sigs((FAIL, "example.com"), (PASS, "other.example"),
                                           (AuthStatus.POLICY, "example.com")))
    assert outcome_of(res).status is FAIL


def test_null_sender_aligns_on_helo_identity(engine: Engine, dns_server: DNSServer) -> None:
    """SPFOutcome.domain is the HELO name for the null sender (RFC 7208 2.4)."""
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    res = run_dmarc(engine, message("a@example.com"), spf_outcome=spf(PASS, "mx1.example.com"),
                    dkim_outcome=dkim_sigs(),
                    envelope=Envelope(client_ip="192.0.2.1", helo="mx1.example.com", mail_from=""))
    assert outcome_of(res).status is PASS and outcome_of(res).spf_aligned


def test_aligned_temperror_is_temperror(engine: Engine, dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    by_spf = run_dmarc(engine, message("a@example.com"), spf_outcome=spf(TEMP, "example.com"),
                       dkim_outcome=dkim_sigs())
    by_dkim = run_dmarc(engine, message("a@example.com"), spf_outcome=spf(FAIL, "example.com"),
                        dkim_outcome=dkim_sigs((TEMP, "sub.example.com")))
    for res in (by_spf, by_dkim):
        assert outcome_of(res).status is TEMP and names(res) == {"DMARC_DNSFAIL"}
        assert res.forced is None


def test_unaligned_temperror_does_not_matter(engine: Engine, dns_server: DNSServer) -> None:
    """rspamd 'SPF DNSFAIL FAILED INCLUDE UNALIGNED': fail with the domain's policy."""
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=none")
    res = run_dmarc(engine, message("a@example.com"), spf_outcome=spf(TEMP, "other.example"),
                    dkim_outcome=dkim_sigs((TEMP, "third.example")))
    assert outcome_of(res).status is FAIL and names(res) == {"DMARC_POLICY_SOFTFAIL"}


def test_missing_or_crashed_checks(make_engine: Callable[..., Engine],
                                   dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    engine = make_engine()
    raw = message("a@example.com", extra="DKIM-Signature: v=1; a=rsa-sha256; d=example.com; "
                                         "s=sel; h=from; bh=x; b=y\r\n")
    # Absent results (checks disabled or not run): no pass -> fail.
    absent = run_dmarc(engine, raw)
    assert outcome_of(absent).status is FAIL
    # A check that crashed (result without outcome) for an aligned identity: unknown, not fail.
    crashed_spf = run_dmarc(engine, message("a@example.com"), dkim_outcome=dkim_sigs(),
                            results={"spf": CheckResult()})
    crashed_dkim = run_dmarc(engine, raw, spf_outcome=spf(FAIL, "other.example"),
                             results={"dkim": CheckResult()})
    assert outcome_of(crashed_spf).status is TEMP and outcome_of(crashed_dkim).status is TEMP
    # ... but a crashed check whose identity could not align changes nothing.
    unaligned = run_dmarc(engine, message("a@example.com"), dkim_outcome=dkim_sigs(),
                          results={"spf": CheckResult()},
                          envelope=Envelope(client_ip="192.0.2.1", mail_from="b@other.example"))
    assert outcome_of(unaligned).status is FAIL
    # A disabled check is an admin's choice: no pass, no temperror.
    disabled = make_engine({"spf": {"enabled": False}})
    res = run_dmarc(disabled, message("a@example.com"), dkim_outcome=dkim_sigs(),
                    results={"spf": CheckResult()})
    assert outcome_of(res).status is FAIL


# ----------------------------------------------------------------------------------------------
# Policy and pct
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("record", "applied", "symbol"), [
    ("v=DMARC1; p=reject; pct=0", "quarantine", "DMARC_POLICY_QUARANTINE"),
    ("v=DMARC1; p=quarantine; pct=0", "none", "DMARC_POLICY_SOFTFAIL"),
    ("v=DMARC1; p=none; pct=0", "none", "DMARC_POLICY_SOFTFAIL"),
    ("v=DMARC1; p=reject; pct=100", "reject", "DMARC_POLICY_REJECT"),
])
def test_pct_applies_next_weaker_policy(engine: Engine, dns_server: DNSServer, record: str,
                                        applied: str, symbol: str) -> None:
    dns_server.add("_dmarc.example.com", "TXT", record)
    res = run_dmarc(engine, message("a@example.com"), spf_outcome=spf(FAIL, "example.com"),
                    dkim_outcome=dkim_sigs())
    out = outcome_of(res)
    assert out.policy == record.split("p=")[1].split(";")[0]
    assert out.applied_policy == applied and symbol in names(res)


def test_pct_zero_sp_quarantine_for_subdomain(engine: Engine, dns_server: DNSServer) -> None:
    """rspamd 'DMARC PCT ZERO SP QUARANTINE': sp=quarantine with pct=0 applies none."""
    dns_server.add("_dmarc.zero_pct.com", "TXT", "v=DMARC1; p=reject; sp=quarantine; pct=0")
    res = run_dmarc(engine, message("foo@subdomain.zero_pct.com"),
                    spf_outcome=spf(FAIL, "mom.za.org"), dkim_outcome=dkim_sigs())
    out = outcome_of(res)
    assert (out.policy, out.applied_policy) == ("quarantine", "none")


def test_pct_draw_is_deterministic_and_proportional(engine: Engine,
                                                    dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject; pct=30")
    applied = []
    for i in range(60):
        raw = message("a@example.com", message_id=f"<{i}@sender.example>")
        first = run_dmarc(engine, raw, spf_outcome=spf(FAIL, "x"), dkim_outcome=dkim_sigs())
        again = run_dmarc(engine, raw, spf_outcome=spf(FAIL, "x"), dkim_outcome=dkim_sigs())
        assert outcome_of(first).applied_policy == outcome_of(again).applied_policy
        applied.append(outcome_of(first).applied_policy)
    assert set(applied) == {"reject", "quarantine"}
    assert 8 <= applied.count("reject") <= 30      # sha256 draw, fixed ids: ~30% of 60


# ----------------------------------------------------------------------------------------------
# From handling (RFC 7489 6.6.1)
# ----------------------------------------------------------------------------------------------
def test_no_from_is_permerror(engine: Engine, dns_server: DNSServer) -> None:
    for raw in (message(), message("undisclosed-recipients:;"), message("Just A Name")):
        res = run_dmarc(engine, raw, spf_outcome=spf(PASS, "example.com"),
                        dkim_outcome=dkim_sigs((PASS, "example.com")))
        assert outcome_of(res).status is AuthStatus.PERMERROR
        assert "DMARC_NO_FROM" in names(res) and "DMARC_POLICY_ALLOW" not in names(res)
        assert "dmarc=permerror" in ar_text(engine, res)


def test_two_from_headers_with_different_domains(engine: Engine,
                                                 dns_server: DNSServer) -> None:
    """authentication_milter 'DMARC Multi': each domain evaluated; the p=reject failure wins."""
    dns_server.add("_dmarc.goestheweasel.com", "TXT", "v=DMARC1; p=reject")
    dns_server.add("_dmarc.marcbradshaw.net", "TXT", "v=DMARC1; p=none")
    raw = message("test@goestheweasel.com", "test@marcbradshaw.net, test@example.com")
    res = run_dmarc(engine, raw, spf_outcome=spf(FAIL, "goestheweasel.com"),
                    dkim_outcome=dkim_sigs())
    out = outcome_of(res)
    assert (out.status, out.from_domain, out.applied_policy) == \
        (FAIL, "goestheweasel.com", "reject")
    assert {"DMARC_MULTI_FROM", "DMARC_POLICY_REJECT"} <= names(res)
    assert res.forced is not None and res.forced.action is Action.REJECT
    parsed = authresults.parse(ar_text(engine, res))
    assert [(r.result, r.header_from) for r in parsed.results] == [
        ("fail", "goestheweasel.com"), ("fail", "marcbradshaw.net"), ("none", "example.com")]


def test_multi_from_all_passing_is_never_a_pass(engine: Engine, dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.attacker.example", "TXT", "v=DMARC1; p=reject")
    res = run_dmarc(engine, message("me@attacker.example", "ceo@bank.example"),
                    spf_outcome=spf(PASS, "attacker.example"),
                    dkim_outcome=dkim_sigs((PASS, "attacker.example")))
    assert outcome_of(res).status is AuthStatus.PERMERROR
    assert "DMARC_MULTI_FROM" in names(res) and "DMARC_POLICY_ALLOW" not in names(res)
    text = ar_text(engine, res)
    assert "dmarc=pass" not in text and "header.from=attacker.example" in text


def test_two_from_headers_same_domain_are_evaluated(engine: Engine,
                                                    dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    res = run_dmarc(engine, message("a@example.com", "b@Example.com"),
                    spf_outcome=spf(PASS, "example.com"), dkim_outcome=dkim_sigs())
    assert outcome_of(res).status is PASS
    assert names(res) == {"DMARC_POLICY_ALLOW", "DMARC_MULTI_FROM"}


def test_garbage_cannot_shield_a_reject_domain(engine: Engine, dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.bank.example", "TXT", "v=DMARC1; p=reject")
    for value in ("me@attacker.example;ceo@bank.example", '"x" <ceo@bank.example> <a@b.example>',
                  "ceo@bank.example>"):
        res = run_dmarc(engine, message(value), spf_outcome=spf(PASS, "attacker.example"),
                        dkim_outcome=dkim_sigs((PASS, "attacker.example")))
        out = outcome_of(res)
        assert (out.status, out.from_domain) == (FAIL, "bank.example"), value
        assert "DMARC_NO_FROM" in names(res) and res.forced is not None


def test_malformed_from_without_failure_is_permerror(engine: Engine,
                                                     dns_server: DNSServer) -> None:
    """authentication_milter 'Only SPF hide_none': an unparseable From gives permerror."""
    raw = message('"Dear Customer\r\n Happy new Year",        <noreply@example.com>')
    res = run_dmarc(engine, raw, spf_outcome=spf(PASS, "example.com"), dkim_outcome=dkim_sigs())
    assert outcome_of(res).status is AuthStatus.PERMERROR and "DMARC_NO_FROM" in names(res)


def test_encoded_words_cannot_inject_addresses(engine: Engine, dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.attacker.example", "TXT", "v=DMARC1; p=none")
    raw = message("=?utf-8?q?ceo=40bank.example=2C?= <me@attacker.example>")
    res = run_dmarc(engine, raw, spf_outcome=spf(PASS, "attacker.example"),
                    dkim_outcome=dkim_sigs())
    assert outcome_of(res).status is PASS and outcome_of(res).from_domain == "attacker.example"
    assert "DMARC_MULTI_FROM" not in names(res)


# ----------------------------------------------------------------------------------------------
# Forced actions, their SMTP texts, ARC override
# ----------------------------------------------------------------------------------------------
def _failing(engine: Engine, dns_server: DNSServer, record: str,
             arc_outcome: ARCOutcome | None = None) -> CheckResult:
    dns_server.clear()
    dns_server.add("_dmarc.example.com", "TXT", record)
    return run_dmarc(engine, message("a@example.com"), spf_outcome=spf(FAIL, "example.com"),
                     dkim_outcome=dkim_sigs(), arc_outcome=arc_outcome)


def test_reject_forced_action_text(engine: Engine, dns_server: DNSServer) -> None:
    res = _failing(engine, dns_server, "v=DMARC1; p=reject")
    assert res.forced is not None
    assert (res.forced.action, res.forced.smtp_code, res.forced.smtp_xcode) == \
        (Action.REJECT, "550", "5.7.1")
    assert res.forced.reason == "DMARC policy of example.com is reject: not aligned/authenticated"
    assert "dmarc=fail (p=reject dis=reject) header.from=example.com policy.dmarc=reject" in \
        ar_text(engine, res)


@pytest.mark.parametrize(("overrides", "record", "action"), [
    ({"reject_action": "quarantine"}, "v=DMARC1; p=reject", Action.QUARANTINE),
    ({"reject_action": "junk"}, "v=DMARC1; p=reject", Action.JUNK),
    ({"reject_action": "inbox"}, "v=DMARC1; p=reject", None),
    ({}, "v=DMARC1; p=quarantine", Action.JUNK),
    ({"quarantine_action": "quarantine"}, "v=DMARC1; p=quarantine", Action.QUARANTINE),
    ({}, "v=DMARC1; p=none", None),
])
def test_configured_actions(make_engine: Callable[..., Engine], dns_server: DNSServer,
                            overrides: dict[str, str], record: str, action: Action | None) -> None:
    res = _failing(make_engine({"dmarc": overrides}), dns_server, record)
    if action is None:
        assert res.forced is None
        return
    assert res.forced is not None and res.forced.action is action
    assert res.forced.smtp_code is None          # only a reject carries an SMTP reply
    policy = record.split("p=")[1]
    assert res.forced.reason == \
        f"DMARC policy of example.com is {policy}: not aligned/authenticated"


def test_temperror_tempfail(make_engine: Callable[..., Engine], dns_server: DNSServer) -> None:
    engine = make_engine({"dmarc": {"temperror_action": "tempfail"}})
    dns_server.on("_dmarc.example.com", "servfail")
    res = run_dmarc(engine, message("a@example.com"), spf_outcome=spf(FAIL, "example.com"),
                    dkim_outcome=dkim_sigs())
    assert res.forced is not None
    assert (res.forced.action, res.forced.smtp_code, res.forced.smtp_xcode) == \
        (Action.TEMPFAIL, "451", "4.7.1")
    assert "example.com" in res.forced.reason and "try again later" in res.forced.reason
    # An identity equal to the From domain passed: whatever the record says, nothing would be
    # enforced, so no tempfail (the result is still temperror).
    strictly = run_dmarc(engine, message("a@example.com"), spf_outcome=spf(PASS, "example.com"),
                         dkim_outcome=dkim_sigs())
    assert outcome_of(strictly).status is TEMP and strictly.forced is None
    # A p=none domain's aligned temperror cannot lead to enforcement either.
    dns_server.add("_dmarc.none.example", "TXT", "v=DMARC1; p=none")
    res = run_dmarc(engine, message("a@none.example"), spf_outcome=spf(TEMP, "none.example"),
                    dkim_outcome=dkim_sigs())
    assert outcome_of(res).status is TEMP and res.forced is None


@pytest.mark.parametrize("key", ["reject_action", "quarantine_action", "arc_override_action",
                                 "temperror_action"])
def test_bad_action_value_disables_check_loudly(make_engine: Callable[..., Engine],
                                                key: str) -> None:
    engine = make_engine({"dmarc": {key: "bounce"}})
    assert "dmarc" in engine.disabled
    assert f"dmarc.{key}" in engine.disabled["dmarc"] and "bounce" in engine.disabled["dmarc"]


def test_trusted_arc_softens_reject(make_engine: Callable[..., Engine],
                                    dns_server: DNSServer) -> None:
    trusted = ARCOutcome(PASS, sealer="lists.example.org", instance=2, trusted=True)
    res = _failing(make_engine(), dns_server, "v=DMARC1; p=reject", trusted)
    assert outcome_of(res).status is FAIL and outcome_of(res).applied_policy == "reject"
    assert names(res) == {"DMARC_ARC_OVERRIDE"}
    assert res.forced is not None and res.forced.action is Action.JUNK
    assert "lists.example.org" in res.forced.reason and res.forced.smtp_code is None
    assert "arc=pass override" in ar_text(make_engine(), res)

    inbox = _failing(make_engine({"dmarc": {"arc_override_action": "inbox"}}), dns_server,
                     "v=DMARC1; p=reject", trusted)
    assert inbox.forced is None
    # Softens, never hardens: quarantine_action junk beats an override of quarantine.
    milder = _failing(make_engine({"dmarc": {"arc_override_action": "quarantine"}}), dns_server,
                      "v=DMARC1; p=quarantine", trusted)
    assert milder.forced is not None and milder.forced.action is Action.JUNK


@pytest.mark.parametrize("arc_outcome", [
    ARCOutcome(PASS, sealer="random.example", instance=1, trusted=False),
    ARCOutcome(FAIL, sealer="lists.example.org", instance=1, trusted=False),
    ARCOutcome(AuthStatus.NONE),
])
def test_untrusted_or_failed_arc_does_not_override(engine: Engine, dns_server: DNSServer,
                                                   arc_outcome: ARCOutcome) -> None:
    res = _failing(engine, dns_server, "v=DMARC1; p=reject", arc_outcome)
    assert res.forced is not None and res.forced.action is Action.REJECT
    assert "DMARC_POLICY_REJECT" in names(res)


# ----------------------------------------------------------------------------------------------
# Authentication-Results piece
# ----------------------------------------------------------------------------------------------
def test_ar_piece_parses_back(engine: Engine, dns_server: DNSServer) -> None:
    res = _failing(engine, dns_server, "v=DMARC1; p=reject; pct=0")
    value = ar_text(engine, res)
    assert value == ("mx.test.example; dmarc=fail (p=reject dis=quarantine) "
                     "header.from=example.com policy.dmarc=quarantine")
    parsed = authresults.parse(value)
    (piece,) = parsed.results
    assert (piece.method, piece.result, piece.header_from, piece.policy) == \
        ("dmarc", "fail", "example.com", "quarantine")


# ----------------------------------------------------------------------------------------------
# End to end: pipeline.evaluate with the real SPF and DKIM checks
# ----------------------------------------------------------------------------------------------
class Signer:
    """An ed25519 DKIM key published in the test DNS server (RFC 8463)."""

    def __init__(self, dns_server: DNSServer, domain: str, selector: str = "sel") -> None:
        self.domain, self.selector = domain, selector
        self._key = nacl.signing.SigningKey.generate()
        public = base64.b64encode(bytes(self._key.verify_key)).decode()
        dns_server.add(f"{selector}._domainkey.{domain}", "TXT",
                       f"v=DKIM1; k=ed25519; p={public}")

    def sign(self, raw: bytes) -> bytes:
        signature = dkim.sign(raw, self.selector.encode(), self.domain.encode(),
                              base64.b64encode(bytes(self._key)),
                              signature_algorithm=b"ed25519-sha256",
                              include_headers=[b"from", b"to", b"subject", b"message-id"])
        return signature + raw


def _e2e_message(from_domain: str) -> bytes:
    return (f"From: Alice <alice@{from_domain}>\r\nTo: bob@example.net\r\n"
            f"Subject: quarterly report\r\nMessage-ID: <e2e-1@{from_domain}>\r\n"
            f"Date: Mon, 2 Mar 2026 10:00:00 +0000\r\n\r\nHello Bob.\r\n").encode()


def _e2e_engine(make_engine: Callable[..., Engine], dmarc_overrides: dict[str, str] | None = None
                ) -> Engine:
    # The full pipeline runs CPU-bound checks in threads of this process, beside the test DNS
    # server: a 0.5 s DNS timeout is too tight for it under load.
    return make_engine({"dns": {"timeout": 2.0, "deadline": 8.0},
                        "dmarc": dict(dmarc_overrides or {})})


def _dmarc_ar(value: str) -> list[Any]:
    return [r for r in authresults.parse(value).results if r.method == "dmarc"]


def test_e2e_dkim_aligned_pass(make_engine: Callable[..., Engine],
                               dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    dns_server.add("example.com", "TXT", "v=spf1 ip4:198.51.100.0/24 -all")
    signer = Signer(dns_server, "mail.example.com")
    raw = signer.sign(_e2e_message("example.com"))
    env = Envelope(client_ip="192.0.2.99", helo="relay.example.net",
                   mail_from="list-bounce@lists.example.net", rcpt_to=("bob@example.net",))
    verdict = evaluate(env, raw, _e2e_engine(make_engine))
    assert "dkim=pass" in verdict.authentication_results, verdict.authentication_results
    (piece,) = _dmarc_ar(verdict.authentication_results)
    assert (piece.result, piece.header_from) == ("pass", "example.com")
    assert "DMARC_POLICY_ALLOW" in verdict.symbol_names()
    assert verdict.action is not Action.REJECT


def test_e2e_spf_aligned_pass(make_engine: Callable[..., Engine],
                              dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject; adkim=s")
    dns_server.add("bounces.example.com", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    env = Envelope(client_ip="192.0.2.99", helo="mx.example.com",
                   mail_from="b@bounces.example.com", rcpt_to=("bob@example.net",))
    verdict = evaluate(env, _e2e_message("example.com"), _e2e_engine(make_engine))
    assert "spf=pass" in verdict.authentication_results, verdict.authentication_results
    (piece,) = _dmarc_ar(verdict.authentication_results)
    assert piece.result == "pass"


def test_e2e_reject(make_engine: Callable[..., Engine], dns_server: DNSServer) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    dns_server.add("example.com", "TXT", "v=spf1 ip4:198.51.100.0/24 -all")
    attacker = Signer(dns_server, "attacker.example")
    raw = attacker.sign(_e2e_message("example.com"))
    env = Envelope(client_ip="192.0.2.99", helo="evil.example",
                   mail_from="ceo@example.com", rcpt_to=("bob@example.net",))
    verdict = evaluate(env, raw, _e2e_engine(make_engine))
    ar = verdict.authentication_results
    assert "spf=fail" in ar and "dkim=pass" in ar, ar
    (piece,) = _dmarc_ar(ar)
    assert (piece.result, piece.policy) == ("fail", "reject")
    assert verdict.action is Action.REJECT
    assert (verdict.smtp_code, verdict.smtp_xcode) == ("550", "5.7.1")
    assert verdict.reason == "DMARC policy of example.com is reject: not aligned/authenticated"


def test_e2e_dns_failure_tempfails(make_engine: Callable[..., Engine],
                                   dns_server: DNSServer) -> None:
    dns_server.on("_dmarc.example.com", "servfail")
    dns_server.add("example.com", "TXT", "v=spf1 ip4:198.51.100.0/24 -all")
    env = Envelope(client_ip="192.0.2.99", helo="evil.example", mail_from="ceo@example.com",
                   rcpt_to=("bob@example.net",))
    verdict = evaluate(env, _e2e_message("example.com"),
                       _e2e_engine(make_engine, {"temperror_action": "tempfail"}))
    (piece,) = _dmarc_ar(verdict.authentication_results)
    assert piece.result == "temperror"
    assert verdict.action is Action.TEMPFAIL and verdict.smtp_code == "451"


# ----------------------------------------------------------------------------------------------
# Hostile input: only typed errors, never a crash
# ----------------------------------------------------------------------------------------------
_RECORDISH = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    st.lists(st.sampled_from(["v=DMARC1", "p=reject", "p=", "sp=none", "pct=101", "pct=50",
                              "adkim=s", "aspf=x", "rua=mailto:a@b", "rua=", "fo=1:d", "=",
                              "ri=99999999999", "x", " ", "\t", "V = DMARC1", "p=none;p=none"]),
             max_size=8).map(";".join),
)


@settings(max_examples=400, deadline=None)
@given(_RECORDISH)
def test_parser_raises_only_typed_errors(text: str | bytes) -> None:
    for strict in (True, False):
        try:
            rec = dmarc.parse_record(text, strict=strict)
        except dmarc.DMARCRecordError:
            continue
        assert 0 <= rec.pct <= 100 and isinstance(rec.p, dmarc.Policy)
        assert dmarc.is_dmarc_record(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=3))
def test_author_domains_never_raises(values: list[str]) -> None:
    found = dmarc.author_domains(values)
    assert found.header_count == len(values)
    assert all(d == d.lower() and d.isascii() for d in found.domains)


@pytest.mark.parametrize("value", [
    "a@b.example", "<a@b.example>", "Ann Bee <a.b+c_d-e@x-y.example.org>", '"Ann Bee" <a@b.example>',
    "Ann<a@b.example>", "1@2.3", "a@-x.example", "a-@x-.example",
])
def test_simple_from_fast_path_matches_the_stdlib_parser(value: str) -> None:
    """author_domains skips the (slow) stdlib parser for plain mailboxes: the stdlib must find
    exactly that one domain, without defects, for everything the fast path accepts."""
    import email.policy
    match = dmarc._SIMPLE_MAILBOX.fullmatch(value)
    assert match is not None
    header = email.policy.default.header_factory("From", value)
    assert [a.domain for a in header.addresses] == [match.group("angle") or match.group("bare")]
    assert list(header.defects) == []


@pytest.mark.parametrize("value", [
    "a..b@x.example", ".a@x.example", "a@x..example", "a@x", '"" <a@x.example>', "A  B <a@x.example>",
    "A <a@x.example>, b@y.example", "a@x.example, ", "A.B <a@x.example>", "=?utf-8?q?A?= <a@x.example>",
])
def test_other_from_values_take_the_stdlib_parser(value: str) -> None:
    assert dmarc._SIMPLE_MAILBOX.fullmatch(value) is None
