from trustmilter.pipeline import evaluate
from trustmilter.types import Envelope

MSG = b"From: a@example.org\r\nSubject: t\r\n\r\nhi\r\n"


def names(verdict) -> set[str]:
    return set(verdict.symbol_names())


def only(engine_factory):
    # Run only iprev and helo so these tests do not depend on other checks' zone data.
    engine = engine_factory({"spf": {"enabled": False}, "dkim": {"enabled": False},
                             "arc": {"enabled": False}, "dmarc": {"enabled": False}})
    return engine


def test_iprev_pass_fail_none_temperror(dns_server, make_engine) -> None:
    engine = only(make_engine)
    dns_server.add("10.2.0.192.in-addr.arpa", "PTR", "mail.example.org.")
    dns_server.add("mail.example.org", "A", "192.0.2.10")
    v = evaluate(Envelope(client_ip="192.0.2.10", helo="mail.example.org"), MSG, engine)
    assert "IPREV_PASS" in names(v)
    assert "iprev=pass policy.iprev=192.0.2.10 (mail.example.org)" in v.authentication_results

    dns_server.add("11.2.0.192.in-addr.arpa", "PTR", "liar.example.org.")
    dns_server.add("liar.example.org", "A", "192.0.2.99")
    v = evaluate(Envelope(client_ip="192.0.2.11", helo="x.example"), MSG, engine)
    assert "IPREV_FAIL" in names(v) and "iprev=fail" in v.authentication_results

    v = evaluate(Envelope(client_ip="192.0.2.12", helo="x.example"), MSG, engine)
    assert "IPREV_NONE" in names(v)

    dns_server.on("13.2.0.192.in-addr.arpa", "servfail")
    v = evaluate(Envelope(client_ip="192.0.2.13", helo="x.example"), MSG, engine)
    assert "IPREV_TEMPERROR" in names(v) and "iprev=temperror" in v.authentication_results
    assert "IPREV_FAIL" not in names(v)


def test_iprev_ipv6(dns_server, make_engine) -> None:
    engine = only(make_engine)
    rev = "5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
    dns_server.add(rev, "PTR", "v6.example.org.")
    dns_server.add("v6.example.org", "AAAA", "2001:db8::25")
    v = evaluate(Envelope(client_ip="2001:db8::25", helo="v6.example.org"), MSG, engine)
    assert "IPREV_PASS" in names(v)


def test_helo_sanity(dns_server, make_engine) -> None:
    engine = only(make_engine)
    cases = {"192.0.2.1": "HELO_BARE_IP", "localhostish": "HELO_NOT_FQDN",
             "mx.test.example": "HELO_IS_OUR_NAME", "[192.0.2.99]": "HELO_IP_MISMATCH"}
    for helo, symbol in cases.items():
        v = evaluate(Envelope(client_ip="192.0.2.1", helo=helo), MSG, engine)
        assert symbol in names(v), helo
    v = evaluate(Envelope(client_ip="192.0.2.1", helo="[192.0.2.1]"), MSG, engine)
    assert not {n for n in names(v) if n.startswith("HELO_")}
    v = evaluate(Envelope(client_ip="192.0.2.1", helo="good.example.org"), MSG, engine)
    assert not {n for n in names(v) if n.startswith("HELO_")}
