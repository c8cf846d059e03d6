import time

import pytest

from trustmilter.dns import Resolver, parse_server, session_for
from trustmilter.errors import DNSPermError, DNSTempError


def resolver(server, **kw) -> Resolver:
    kw.setdefault("timeout", 0.5)
    kw.setdefault("cache_size", 0)
    return Resolver(server.address, **kw)


def test_parse_server() -> None:
    assert parse_server("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_server("[::1]:5353") == ("::1", 5353)
    assert parse_server("::1") == ("::1", 53)


def test_answers_nxdomain_and_nodata(dns_server) -> None:
    dns_server.add("host.example", "A", "192.0.2.1")
    dns_server.add("host.example", "TXT", "hello")
    r = resolver(dns_server)
    assert r.query("host.example", "A").records == ["192.0.2.1"]
    assert r.query("host.example", "TXT").records == [b"hello"]
    nodata = r.query("host.example", "MX")
    assert nodata.records == [] and not nodata.nxdomain
    missing = r.query("missing.example", "A")
    assert missing.records == [] and missing.nxdomain


def test_servfail_and_timeout_are_temperrors(dns_server) -> None:
    dns_server.on("broken.example", "servfail")
    dns_server.on("silent.example", "timeout")
    r = resolver(dns_server, timeout=0.3)
    with pytest.raises(DNSTempError, match="server failure"):
        r.query("broken.example", "TXT")
    started = time.monotonic()
    with pytest.raises(DNSTempError, match="timeout"):
        r.query("silent.example", "TXT")
    assert time.monotonic() - started < 2.0


def test_truncated_answer_retried_over_tcp(dns_server) -> None:
    dns_server.add("big.example", "TXT", "v=spf1 " + "a " * 1500)
    r = resolver(dns_server)
    answer = r.query("big.example", "TXT")
    assert len(answer.records[0]) > 3000
    transports = [t for name, _, t in dns_server.queries if name == "big.example"]
    assert transports == ["udp", "tcp"]


def test_cache_respects_ttl(dns_server) -> None:
    dns_server.add("short.example", "A", "192.0.2.7", ttl=1)
    r = resolver(dns_server, cache_size=100)
    for _ in range(3):
        assert r.query("short.example", "A").records == ["192.0.2.7"]
    assert sum(1 for q in dns_server.queries if q[0] == "short.example") == 1
    time.sleep(1.2)
    r.query("short.example", "A")
    assert sum(1 for q in dns_server.queries if q[0] == "short.example") == 2


def test_session_deadline_and_error_record(dns_server) -> None:
    dns_server.on("slow.example", "delay:0.4")
    dns_server.add("slow.example", "A", "192.0.2.9")
    session = session_for(resolver(dns_server, timeout=2.0), 0.2)
    with pytest.raises(DNSTempError):
        session.query("slow.example", "A")
    with pytest.raises(DNSTempError, match="deadline"):
        time.sleep(0.25)
        session.query("slow.example", "A")
    assert len(session.errors) == 2


def test_ptr_and_addresses(dns_server) -> None:
    dns_server.add("1.2.0.192.in-addr.arpa", "PTR", "mail.example.")
    dns_server.add("mail.example", "A", "192.0.2.1")
    dns_server.add("mail.example", "AAAA", "2001:db8::1")
    dns_server.add("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", "PTR",
                   "mail.example.")
    session = session_for(resolver(dns_server), 3)
    assert session.ptr("192.0.2.1") == ["mail.example"]
    assert session.ptr("2001:db8::1") == ["mail.example"]
    assert sorted(session.addresses("mail.example")) == ["192.0.2.1", "2001:db8::1"]


def test_bad_name_is_permerror(dns_server) -> None:
    r = resolver(dns_server)
    with pytest.raises(DNSPermError):
        r.query("a" * 64 + ".example", "TXT")
