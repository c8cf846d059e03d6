"""SPF check against the real test DNS server, through the pipeline and through run(ctx)."""
from __future__ import annotations

import threading
import time
from typing import Any

import dns.resolver
import pytest
import spf

from dnsserver import TestDNSServer as DNSServer
from trustmilter import authresults
from trustmilter.checks import spf as spf_check
from trustmilter.checks.base import CheckContext
from trustmilter.checks.outcomes import SPFOutcome
from trustmilter.dns import Resolver, session_for
from trustmilter.message import ParsedMessage
from trustmilter.pipeline import evaluate
from trustmilter.types import AuthStatus, Envelope

MSG = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: t\r\n\r\nhi\r\n"
IP = "192.0.2.10"


@pytest.fixture
def engine(make_engine: Any) -> Any:
    built = make_engine()
    built.checks = (spf_check,)   # only SPF: these tests own all the zone data they need
    return built


def run_check(engine: Any, envelope: Envelope, deadline: float = 3.0) -> tuple[Any, Any]:
    """The check's run() with a real context (what the pipeline builds) -> (result, session)."""
    session = session_for(engine.resolver, deadline)
    ctx = CheckContext(envelope=envelope, message=ParsedMessage.parse(MSG), dns=session,
                       config=engine.config, engine=engine)
    return spf_check.run(ctx), session


def names(verdict: Any) -> set[str]:
    return set(verdict.symbol_names())


def spf_clauses(ar_value: str) -> list[tuple[str, dict[str, str]]]:
    """(result, {property: value}) of each spf clause, parsed back with our parser."""
    parsed = authresults.parse(ar_value)
    return [(r.result, {f"{p.type}.{p.name}": p.value for p in r.properties})
            for r in parsed.results if r.method == "spf"]


def env(mail_from: str = "user@example.org", helo: str = "mail.example.org",
        ip: str | None = IP) -> Envelope:
    return Envelope(client_ip=ip, helo=helo, mail_from=mail_from)


# ----- the seven results -------------------------------------------------------------------

def test_pass_fail_softfail_neutral_none(dns_server: DNSServer, engine: Any) -> None:
    dns_server.add("pass.example", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    dns_server.add("fail.example", "TXT", "v=spf1 ip4:198.51.100.1 -all")
    dns_server.add("soft.example", "TXT", "v=spf1 ip4:198.51.100.1 ~all")
    dns_server.add("neutral.example", "TXT", "v=spf1 ?all")
    dns_server.add("none.example", "TXT", "google-site-verification=abc")   # not SPF
    expected = {"pass": ("SPF_PASS", "pass"), "fail": ("SPF_FAIL", "fail"),
                "soft": ("SPF_SOFTFAIL", "softfail"), "neutral": ("SPF_NEUTRAL", "neutral"),
                "none": ("SPF_NONE", "none"), "nxdomain": ("SPF_NONE", "none")}
    for label, (symbol, result) in expected.items():
        sender = f"user@{label}.example"
        v = evaluate(env(sender, helo=""), MSG, engine)
        assert symbol in names(v), (label, v.symbol_names())
        assert [s for s in v.symbol_names() if s.startswith("SPF_")] == [symbol]
        clauses = spf_clauses(v.authentication_results)
        assert clauses == [(result, {"smtp.mailfrom": sender})], v.authentication_results
    # The score comes from config, the reason names the mechanism.
    v = evaluate(env("user@fail.example", helo=""), MSG, engine)
    fail = next(s for s in v.symbols if s.name == "SPF_FAIL")
    assert fail.score == engine.config.score("SPF_FAIL") and fail.score > 0
    assert "-all" in fail.reason and "fail.example" in fail.reason


def test_outcome_is_typed_for_dmarc(dns_server: DNSServer, engine: Any) -> None:
    dns_server.add("example.org", "TXT", "v=spf1 ip4:192.0.2.10 -all")
    dns_server.add("mail.example.org", "TXT", "v=spf1 a -all")
    dns_server.add("mail.example.org", "A", "192.0.2.10")
    result, _ = run_check(engine, env("User@Example.ORG", helo="mail.example.org"))
    outcome = result.outcome
    assert isinstance(outcome, SPFOutcome)
    assert outcome.mailfrom is AuthStatus.PASS and outcome.domain == "example.org"
    assert outcome.helo is AuthStatus.PASS and outcome.helo_domain == "mail.example.org"
    assert [s.name for s in result.symbols] == ["SPF_PASS", "SPF_HELO_PASS"]


def test_permerror_syntax_and_limits(dns_server: DNSServer, engine: Any) -> None:
    dns_server.add("syntax.example", "TXT", "v=spf1 ip4:192.0.2.300 -all")
    dns_server.add("unknown.example", "TXT", "v=spf1 frobnicate:x -all")
    dns_server.add("two.example", "TXT", "v=spf1 -all")
    dns_server.add("two.example", "TXT", "v=spf1 +all")
    # 11 include lookups: over RFC 7208 4.6.4's limit of 10 DNS-querying terms.
    chain = " ".join(f"include:i{n}.many.example" for n in range(11))
    dns_server.add("many.example", "TXT", f"v=spf1 {chain} -all")
    for n in range(11):
        dns_server.add(f"i{n}.many.example", "TXT", "v=spf1 ip4:198.51.100.1 -all")
    # Three lookups that return nothing: over the void lookup limit of 2.
    dns_server.add("void.example", "TXT",
                   "v=spf1 a:v1.void.example a:v2.void.example a:v3.void.example -all")
    for domain, cue in {"syntax": "192.0.2.300", "unknown": "frobnicate",
                        "two": "Two or more", "many": "Too many DNS lookups",
                        "void": "Void lookup limit"}.items():
        result, _ = run_check(engine, env(f"u@{domain}.example", helo=""))
        assert result.outcome.mailfrom is AuthStatus.PERMERROR, domain
        assert [s.name for s in result.symbols] == ["SPF_PERMERROR"], domain
        assert cue in result.symbols[0].reason, (domain, result.symbols[0].reason)


@pytest.mark.parametrize("cue", ["servfail", "timeout"])
def test_dns_failure_is_temperror_never_fail(dns_server: DNSServer, engine: Any,
                                             cue: str) -> None:
    dns_server.on("broken.example", cue)
    v = evaluate(env("u@broken.example", helo=""), MSG, engine)
    assert "SPF_TEMPERROR" in names(v)
    assert not names(v) & {"SPF_FAIL", "SPF_NONE", "SPF_SOFTFAIL", "SPF_PERMERROR"}
    assert spf_clauses(v.authentication_results)[0][0] == "temperror"

    # The same failure one include deep, under "-all": still temperror, not fail.
    dns_server.add("wrapper.example", "TXT", "v=spf1 include:broken.example -all")
    result, session = run_check(engine, env("u@wrapper.example", helo=""))
    assert result.outcome.mailfrom is AuthStatus.TEMPERROR
    assert "broken.example" in result.symbols[0].reason
    assert any("broken.example" in e for e in session.errors)   # the message's session saw it


def test_time_budget_bounds_spf(dns_server: DNSServer, make_engine: Any) -> None:
    built = make_engine({"spf": {"max_lookup_seconds": 0.6}, "dns": {"timeout": 0.4}})
    built.checks = (spf_check,)
    # Each hop answers slowly but within the per-query timeout; together they exceed the budget.
    dns_server.add("slow.example", "TXT",
                   "v=spf1 a:s1.slow.example a:s2.slow.example a:s3.slow.example -all")
    for n in (1, 2, 3):
        dns_server.add(f"s{n}.slow.example", "A", "198.51.100.1")
        dns_server.on(f"s{n}.slow.example", "delay:0.3")
    t0 = time.monotonic()
    result, _ = run_check(built, env("u@slow.example", helo=""))
    elapsed = time.monotonic() - t0
    assert result.outcome.mailfrom is AuthStatus.TEMPERROR
    assert elapsed < 1.2, elapsed


def test_message_deadline_bounds_spf(dns_server: DNSServer, engine: Any) -> None:
    dns_server.add("late.example", "TXT", "v=spf1 -all")
    dns_server.on("late.example", "delay:0.4")
    result, _ = run_check(engine, env("u@late.example", helo=""), deadline=0.1)
    assert result.outcome.mailfrom is AuthStatus.TEMPERROR


# ----- identities ------------------------------------------------------------------------------

def test_null_sender_uses_helo(dns_server: DNSServer, engine: Any) -> None:
    dns_server.add("mx.sender.example", "TXT", "v=spf1 ip4:192.0.2.10 -all")
    v = evaluate(env("", helo="mx.sender.example"), MSG, engine)
    assert [s for s in v.symbol_names() if s.startswith("SPF")] == ["SPF_PASS"]
    assert spf_clauses(v.authentication_results) == [("pass", {"smtp.helo": "mx.sender.example"})]
    result, _ = run_check(engine, env("", helo="mx.sender.example", ip="192.0.2.99"))
    assert result.outcome.mailfrom is AuthStatus.FAIL
    assert result.outcome.domain == "mx.sender.example"
    assert "HELO" in result.symbols[0].reason
    # Null sender and no HELO: nothing to check.
    result, _ = run_check(engine, env("", helo=""))
    assert result.outcome.mailfrom is AuthStatus.NONE


def test_helo_identity_and_check_helo_off(dns_server: DNSServer, make_engine: Any) -> None:
    dns_server.add("example.org", "TXT", "v=spf1 ip4:192.0.2.10 -all")
    dns_server.add("bad-helo.example", "TXT", "v=spf1 -all")
    on = make_engine()
    on.checks = (spf_check,)
    v = evaluate(env("u@example.org", helo="bad-helo.example"), MSG, on)
    assert {"SPF_PASS", "SPF_HELO_FAIL"} <= names(v)
    assert spf_clauses(v.authentication_results) == [
        ("pass", {"smtp.mailfrom": "u@example.org"}), ("fail", {"smtp.helo": "bad-helo.example"})]
    off = make_engine({"spf": {"check_helo": False}})
    off.checks = (spf_check,)
    v = evaluate(env("u@example.org", helo="bad-helo.example"), MSG, off)
    assert not {n for n in names(v) if n.startswith("SPF_HELO")}
    assert len(spf_clauses(v.authentication_results)) == 1
    # An address literal or a single label HELO is "none" without any lookup (RFC 7208 4.3).
    dns_server.queries.clear()
    result, _ = run_check(on, env("u@example.org", helo="[192.0.2.10]"))
    assert result.outcome.helo is AuthStatus.NONE
    assert not [q for q in dns_server.queries if "192.0.2.10" in q[0]]


def test_ipv6_and_ipv4_mapped(dns_server: DNSServer, engine: Any) -> None:
    dns_server.add("six.example", "TXT", "v=spf1 ip6:2001:db8:1::/48 -all")
    dns_server.add("four.example", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    dns_server.add("mxsix.example", "TXT", "v=spf1 mx -all")
    dns_server.add("mxsix.example", "MX", "10 mail.mxsix.example.")
    dns_server.add("mail.mxsix.example", "AAAA", "2001:db8:2::25")
    cases = [("u@six.example", "2001:db8:1::25", AuthStatus.PASS),
             ("u@six.example", "2001:db8:9::25", AuthStatus.FAIL),
             ("u@mxsix.example", "2001:db8:2::25", AuthStatus.PASS),
             ("u@four.example", "::ffff:192.0.2.77", AuthStatus.PASS),   # IPv4-mapped
             ("u@four.example", "::ffff:198.51.100.7", AuthStatus.FAIL),
             ("u@four.example", "2001:db8:1::25", AuthStatus.FAIL)]      # ip4 never matches v6
    for sender, ip, want in cases:
        result, _ = run_check(engine, env(sender, helo="", ip=ip))
        assert result.outcome.mailfrom is want, (sender, ip, result.symbols)


def test_include_redirect_mx_exists_ptr(dns_server: DNSServer, engine: Any) -> None:
    dns_server.add("inc.example", "TXT", "v=spf1 include:_spf.provider.example -all")
    dns_server.add("_spf.provider.example", "TXT", ["v=spf1 ip4:192.0.2.0/25 ",
                                                    "ip4:198.51.100.0/24 ~all"])  # two strings
    dns_server.add("redir.example", "TXT", "v=spf1 redirect=_spf.provider.example")
    dns_server.add("mx.example", "TXT", "v=spf1 mx:inc.example -all")
    dns_server.add("inc.example", "MX", "10 in1.inc.example.")
    dns_server.add("in1.inc.example", "A", IP)
    dns_server.add("exists.example", "TXT", "v=spf1 exists:%{i}.allow.exists.example -all")
    dns_server.add(f"{IP}.allow.exists.example", "A", "127.0.0.2")
    dns_server.add("ptr.example", "TXT", "v=spf1 ptr -all")
    dns_server.add("10.2.0.192.in-addr.arpa", "PTR", "host.ptr.example.")
    dns_server.add("host.ptr.example", "A", IP)
    for domain, mechanism in {"inc": "include:_spf.provider.example",
                              "redir": "ip4:192.0.2.0/25", "mx": "mx:inc.example",
                              "exists": "exists:%{i}.allow.exists.example",
                              "ptr": "ptr"}.items():
        result, _ = run_check(engine, env(f"u@{domain}.example", helo=""))
        assert result.outcome.mailfrom is AuthStatus.PASS, (domain, result.symbols)
        assert mechanism in result.symbols[0].reason, (domain, result.symbols[0].reason)
    # Outside every range: the include does not match, redirect's ~all applies.
    result, _ = run_check(engine, env("u@inc.example", helo="", ip="203.0.113.5"))
    assert result.outcome.mailfrom is AuthStatus.FAIL
    result, _ = run_check(engine, env("u@redir.example", helo="", ip="203.0.113.5"))
    assert result.outcome.mailfrom is AuthStatus.SOFTFAIL


def test_ptr_dns_error_skips_the_mechanism(dns_server: DNSServer, engine: Any) -> None:
    """RFC 7208 5.5: a DNS error in the PTR lookup means "ptr" does not match (evaluation goes
    on), unlike every other lookup, where it is a temperror."""
    dns_server.add("ptrerr.example", "TXT", "v=spf1 ptr ?all")
    dns_server.on("10.2.0.192.in-addr.arpa", "servfail")
    result, _ = run_check(engine, env("u@ptrerr.example", helo=""))
    assert result.outcome.mailfrom is AuthStatus.NEUTRAL


def test_explanation_reaches_the_reason(dns_server: DNSServer, engine: Any) -> None:
    dns_server.add("exp.example", "TXT", "v=spf1 -all exp=why.exp.example")
    dns_server.add("why.exp.example", "TXT", "%{i} may not send for %{d}")
    result, _ = run_check(engine, env("u@exp.example", helo=""))
    assert result.outcome.mailfrom is AuthStatus.FAIL
    assert f"{IP} may not send for exp.example" in result.symbols[0].reason


def test_internationalized_domain_is_looked_up_as_a_label(dns_server: DNSServer,
                                                          engine: Any) -> None:
    dns_server.add("xn--bcher-kva.example", "TXT", "v=spf1 ip4:192.0.2.10 -all")
    result, _ = run_check(engine, env("käufer@bücher.example", helo=""))
    assert result.outcome.mailfrom is AuthStatus.PASS
    assert result.outcome.domain == "xn--bcher-kva.example"


def test_no_client_ip_is_none_without_lookups(dns_server: DNSServer, engine: Any) -> None:
    dns_server.add("example.org", "TXT", "v=spf1 -all")
    v = evaluate(env("u@example.org", ip=None), MSG, engine)
    spf_symbols = [s for s in v.symbols if s.name.startswith("SPF")]
    assert [s.name for s in spf_symbols] == ["SPF_NONE"]
    assert "client IP unknown" in spf_symbols[0].reason
    assert spf_clauses(v.authentication_results)[0][0] == "none"
    assert dns_server.queries == []


# ----- Authentication-Results ------------------------------------------------------------------

def test_hostile_mail_from_cannot_forge_results(dns_server: DNSServer, engine: Any) -> None:
    dns_server.add("evil.example", "TXT", "v=spf1 -all")
    v = evaluate(env("x;dkim=pass header.d=bank.example@evil.example",
                     helo="h;dmarc=pass@evil.example"), MSG, engine)
    parsed = authresults.parse(v.authentication_results)
    assert [r.method for r in parsed.results] == ["spf", "spf"], v.authentication_results
    clauses = spf_clauses(v.authentication_results)
    assert clauses[0] == ("fail", {"smtp.mailfrom": "evil.example"})
    # Quoted, so it stays one value rather than starting a dmarc clause.
    assert clauses[1] == ("none", {"smtp.helo": "h;dmarc=pass@evil.example"})
    assert 'smtp.helo="h;dmarc=pass@evil.example"' in v.authentication_results


def test_reasons_and_ar_parse_back(dns_server: DNSServer, engine: Any) -> None:
    dns_server.on("tmp.example", "servfail")
    dns_server.add("perm.example", "TXT", "v=spf1 include:nowhere.example -all")
    for sender in ("u@tmp.example", "u@perm.example", "first.last+tag@perm.example"):
        v = evaluate(env(sender, helo="mail.example.org"), MSG, engine)
        parsed = authresults.parse(v.authentication_results)
        assert parsed.authserv_id == "mx.test.example"
        methods = [(r.method, r.result) for r in parsed.results]
        assert methods[0][0] == "spf" and methods[0][1] in ("temperror", "permerror")
        assert parsed.results[0].reason   # why it was an error, in reason=


# ----- all DNS through our resolver -------------------------------------------------------------

def test_every_lookup_reaches_the_test_server(dns_server: DNSServer, engine: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the global dnspython resolver was used")

    monkeypatch.setattr(dns.resolver, "resolve", forbidden)
    monkeypatch.setattr(dns.resolver, "query", forbidden)
    monkeypatch.setattr(dns.resolver, "get_default_resolver", forbidden)
    dns_server.add("inc.example", "TXT", "v=spf1 a:host.inc.example include:p.example -all")
    dns_server.add("p.example", "TXT", "v=spf1 mx ip4:192.0.2.0/24 -all")
    dns_server.add("p.example", "MX", "10 mx.p.example.")
    dns_server.add("mx.p.example", "A", "198.51.100.9")
    result, session = run_check(engine, env("u@inc.example", helo="mail.example.org"))
    assert result.outcome.mailfrom is AuthStatus.PASS
    asked = {(name, rtype) for name, rtype, _ in dns_server.queries}
    assert {("inc.example", "TXT"), ("host.inc.example", "A"), ("p.example", "TXT"),
            ("p.example", "MX"), ("mx.p.example", "A"), ("mail.example.org", "TXT")} <= asked
    # No cache in the test engine: each lookup of the session is one query the server saw.
    assert session.lookups == len(dns_server.queries)
    assert spf.DNSLookup is spf_check._spf_dns_lookup


def test_pyspf_without_a_session_is_temperror(dns_server: DNSServer) -> None:
    dns_server.add("example.org", "TXT", "v=spf1 +all")
    # Straight pyspf use outside our evaluation finds no session: temperror, no lookup at all.
    assert spf.query(i=IP, s="u@example.org", h="x.example").check()[0] == "temperror"
    assert dns_server.queries == []


def test_concurrent_evaluations_use_their_own_session(dns_server: DNSServer) -> None:
    """pyspf's DNSLookup is module-global; checks run in threads. Two servers with different
    zones: every thread must see only its own session's server."""
    dns_server.add("example.org", "TXT", "v=spf1 +all")
    other = DNSServer().start()
    try:
        other.add("example.org", "TXT", "v=spf1 -all")
        resolvers = {AuthStatus.PASS: Resolver(dns_server.address, 1.0, 0),
                     AuthStatus.FAIL: Resolver(other.address, 1.0, 0)}
        wrong: list[str] = []

        def worker(want: AuthStatus) -> None:
            for _ in range(15):
                session = session_for(resolvers[want], 5.0)
                report = spf_check.evaluate(session, IP, "u@example.org", "", check_helo=False)
                if report.mailfrom.status is not want:
                    wrong.append(f"{want.value}: got {report.mailfrom.status.value}")

        threads = [threading.Thread(target=worker, args=(want,))
                   for want in (AuthStatus.PASS, AuthStatus.FAIL) * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wrong == []
        assert other.queries and dns_server.queries
    finally:
        other.stop()
