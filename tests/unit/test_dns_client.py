"""The resolver's own stub path (trustmilter.dns): the query on the wire, replies matched to it
(stale and foreign datagrams ignored), TC -> TCP, timeouts and rcodes, CNAME chains, the cache
(negative TTLs as dnspython computes them), and its answers the same as dnspython's resolve()
gives for the same server. Against the real test DNS server, and a scripted one for replies the
test server never sends (wrong ids, SOAs in the authority section)."""
from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Iterator

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from trustmilter import dns as tdns
from trustmilter.dns import Resolver
from trustmilter.errors import DNSPermError, DNSTempError


def resolver(address: str, **kw: object) -> Resolver:
    kw.setdefault("timeout", 0.5)
    kw.setdefault("cache_size", 0)
    r = Resolver(address, **kw)  # type: ignore[arg-type]
    assert r._address is not None, "the stub path must be in use"
    return r


def reference(r: Resolver, name: str, rdtype: str) -> tdns.Answer:
    """The same question through dnspython's Resolver.resolve (what query() used to be)."""
    return r._resolve(dns.name.from_text(name), name, rdtype, r.timeout)


class Scripted:
    """A UDP server on 127.0.0.1 (or ::1) whose replies a test writes: ``reply(query)`` returns
    the datagrams to send back, in order."""

    def __init__(self, reply: Callable[[dns.message.Message], list[bytes]],
                 host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.reply = reply
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, client = self.sock.recvfrom(65535)
            except OSError:
                return
            if not data:   # shut down by close()
                return
            self.received.append(data)
            for datagram in self.reply(dns.message.from_wire(data)):
                self.sock.sendto(datagram, client)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def make(reply: Callable[[dns.message.Message], list[bytes]],
             host: str = "127.0.0.1") -> Scripted:
        servers.append(Scripted(reply, host))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def response(query: dns.message.Message, rcode: int = dns.rcode.NOERROR,
             answer: list[str] = (), authority: list[str] = (), qid: int | None = None) -> bytes:
    """A reply to ``query`` (zone-file lines for the sections), as a server compresses it."""
    msg = dns.message.make_response(query)
    msg.set_rcode(rcode)
    for line in answer:
        msg.answer.append(dns.rrset.from_text(*line.split(None, 4)))
    for line in authority:
        msg.authority.append(dns.rrset.from_text(*line.split(None, 4)))
    if qid is not None:
        msg.id = qid
    return msg.to_wire()


# ----- the query on the wire ---------------------------------------------------------------------
def test_query_wire_is_dnspythons_with_a_fresh_id(scripted) -> None:
    server = scripted(lambda q: [response(q, dns.rcode.NXDOMAIN)])
    r = resolver(server.address)
    for name in ("Mixed.Example", "a.b.example.", "x.example"):
        assert r.query(name, "TXT").nxdomain
    expected = dns.message.make_query(dns.name.from_text("Mixed.Example"), "TXT")
    expected.use_edns(0, 0, 1232)
    assert server.received[0][2:] == expected.to_wire()[2:]
    ids = {data[:2] for data in server.received}
    assert len(ids) == 3


def test_ipv6_server(scripted) -> None:
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    server = scripted(lambda q: [response(q, answer=["v6.example. 60 IN AAAA 2001:db8::5"])],
                      host="::1")
    assert resolver(server.address).query("v6.example", "AAAA").records == ["2001:db8::5"]


# ----- replies matched to the query --------------------------------------------------------------
def test_reply_with_wrong_id_or_question_or_not_a_response_is_ignored(scripted) -> None:
    def reply(q: dns.message.Message) -> list[bytes]:
        other = dns.message.make_query("other.example", "A")
        other.id = q.id
        not_qr = bytearray(response(q, answer=["m.example. 60 IN A 192.0.2.66"]))
        not_qr[2] &= 0x7F
        return [response(q, answer=["m.example. 60 IN A 192.0.2.66"], qid=(q.id + 1) % 65536),
                response(other, answer=["other.example. 60 IN A 192.0.2.67"]),
                bytes(not_qr),
                b"\x00\x01garbage",
                response(q, answer=["m.example. 60 IN A 192.0.2.1"])]

    server = scripted(reply)
    r = resolver(server.address)
    assert r.query("m.example", "A").records == ["192.0.2.1"]
    # and the same with a negative answer, read from the bytes
    server.reply = lambda q: [response(q, qid=(q.id + 1) % 65536),
                              response(q, dns.rcode.NXDOMAIN)]
    assert r.query("m.example", "A") == tdns.Answer([], nxdomain=True, ttl=0)


def test_name_in_the_reply_matches_case_insensitively(scripted) -> None:
    def reply(q: dns.message.Message) -> list[bytes]:
        upper = dns.message.make_query(q.question[0].name.to_text().upper(), q.question[0].rdtype)
        upper.id = q.id
        upper.flags = q.flags
        return [response(upper, dns.rcode.NXDOMAIN)]

    server = scripted(reply)
    assert resolver(server.address).query("case.example", "A").nxdomain


def test_late_answer_to_a_timed_out_query_is_not_taken(dns_server, monkeypatch) -> None:
    dns_server.add("late.example", "A", "192.0.2.1")
    dns_server.on("late.example", "delay:0.4")
    r = resolver(dns_server.address, timeout=0.2)
    with pytest.raises(DNSTempError, match="timeout"):
        r.query("late.example", "A")
    time.sleep(0.4)          # the late answer (192.0.2.1) is in this thread's socket now
    dns_server.clear()
    dns_server.add("late.example", "A", "192.0.2.2")
    examined: list[bytes] = []
    fast_read = tdns._fast_read

    def counting(wire: bytes, *args: object) -> object:
        examined.append(wire)
        return fast_read(wire, *args)

    monkeypatch.setattr(tdns, "_fast_read", counting)
    assert r.query("late.example", "A").records == ["192.0.2.2"]
    assert len(examined) == 1, "the stale datagram was drained before the query was sent"


# ----- failures ----------------------------------------------------------------------------------
def test_timeout_is_a_temperror_within_the_time_given(dns_server) -> None:
    dns_server.on("silent.example", "timeout")
    r = resolver(dns_server.address, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(DNSTempError, match=r"^silent\.example TXT: timeout$"):
        r.query("silent.example", "TXT", timeout=0.2)
    assert 0.19 < time.monotonic() - started < 0.6


@pytest.mark.parametrize("behaviour,text", [("servfail", "SERVFAIL"), ("refused", "REFUSED")])
def test_servfail_and_refused_are_temperrors_with_the_rcode(dns_server, behaviour, text) -> None:
    dns_server.on("broken.example", behaviour)
    r = resolver(dns_server.address, cache_size=100)
    for _ in range(2):   # never cached
        with pytest.raises(DNSTempError) as info:
            r.query("broken.example", "A")
        assert str(info.value) == f"broken.example A: server failure ({text})"
    assert len(dns_server.queries) == 2


def test_yxdomain_is_a_permerror(scripted) -> None:
    server = scripted(lambda q: [response(q, dns.rcode.YXDOMAIN)])
    with pytest.raises(DNSPermError, match="YXDOMAIN"):
        resolver(server.address).query("yx.example", "A")


def closed_port() -> int:
    """A UDP port on 127.0.0.1 that nothing listens on (bound, then let go)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_closed_port_is_a_timeout_then_the_socket_works_again(dns_server) -> None:
    closed = closed_port()
    r = resolver(f"127.0.0.1:{closed}", timeout=0.2)
    for _ in range(2):
        with pytest.raises(DNSTempError, match="timeout"):
            r.query("x.example", "A")


def test_bad_names_and_types(dns_server) -> None:
    r = resolver(dns_server.address)
    with pytest.raises(DNSPermError):
        r.query("a" * 64 + ".example", "TXT")
    with pytest.raises(DNSTempError, match="NoMetaqueries"):
        r.query("x.example", "ANY")
    with pytest.raises(DNSTempError, match="UnknownRdatatype"):
        r.query("x.example", "NOTATYPE")
    assert dns_server.queries == []


# ----- TCP ---------------------------------------------------------------------------------------
def test_truncated_reply_is_retried_over_tcp(dns_server) -> None:
    dns_server.add("tc.example", "TXT", "small")
    dns_server.on("tc.example", "truncate")
    r = resolver(dns_server.address)
    assert r.query("tc.example", "TXT").records == [b"small"]
    assert [t for _, _, t in dns_server.queries] == ["udp", "tcp"]


def test_huge_txt_over_tcp_as_dnspython_reads_it(dns_server) -> None:
    dns_server.add("huge.example", "TXT", [b"x" * 255] * 200)
    r = resolver(dns_server.address, timeout=2.0)
    answer = r.query("huge.example", "TXT")
    assert answer.records == [b"x" * 255 * 200]
    assert answer == reference(r, "huge.example", "TXT")


def test_tcp_refused_is_a_server_failure(scripted) -> None:
    server = scripted(lambda q: [response(q, dns.rcode.NOERROR)[:2] + b"\x82\x00" +
                                 response(q)[4:]])   # TC set; nothing listens on TCP
    with pytest.raises(DNSTempError, match=r"server failure \(no answer\)"):
        resolver(server.address).query("tcp.example", "A")


# ----- answers -----------------------------------------------------------------------------------
def test_answers_are_dnspythons(dns_server) -> None:
    dns_server.add("alias1.example", "CNAME", "alias2.example.", ttl=100)
    dns_server.add("alias2.example", "CNAME", "target.example.", ttl=50)
    dns_server.add("target.example", "A", "192.0.2.10", ttl=200)
    dns_server.add("target.example", "A", "192.0.2.11", ttl=200)
    dns_server.add("target.example", "TXT", ["v=spf1 ", "-all"], ttl=30)
    dns_server.add("target.example", "MX", "10 mx.target.example.")
    dns_server.add("target.example", "AAAA", "2001:db8::10")
    dns_server.add("10.2.0.192.in-addr.arpa", "PTR", "Target.Example.")
    dns_server.add("target.example", "NS", "ns1.example.")
    dns_server.add("target.example", "CAA", '0 issue "ca.example"')
    dns_server.add("dangling.example", "CNAME", "nowhere.example.")
    r = resolver(dns_server.address)
    cases = [("alias1.example", "A"), ("alias1.example", "TXT"), ("alias1.example", "CNAME"),
             ("ALIAS1.example.", "MX"), ("alias1.example", "AAAA"), ("target.example", "NS"),
             ("target.example", "CAA"), ("10.2.0.192.in-addr.arpa", "PTR"),
             ("alias2.example", "SOA"), ("dangling.example", "A"), ("nothing.example", "A")]
    for name, rdtype in cases:
        assert r.query(name, rdtype) == reference(r, name, rdtype), (name, rdtype)
    chained = r.query("alias1.example", "A")
    assert chained.records == ["192.0.2.10", "192.0.2.11"] and chained.ttl == 200
    assert r.query("alias1.example", "CNAME").records == ["alias2.example"]
    assert r.query("alias1.example", "TXT").records == [b"v=spf1 -all"]


def test_cname_chain_longer_than_dnspythons_limit_is_a_server_failure(scripted) -> None:
    chain = [f"c{i}.example. 60 IN CNAME c{i + 1}.example." for i in range(17)]
    server = scripted(lambda q: [response(q, answer=chain + ["c17.example. 60 IN A 192.0.2.1"])])
    r = resolver(server.address)
    with pytest.raises(DNSTempError, match=r"c0.example A: server failure \(bad answer"):
        r.query("c0.example", "A")
    tail = chain[-3:] + ["c17.example. 60 IN A 192.0.2.1"]
    short = scripted(lambda q: [response(q, answer=tail)])
    assert resolver(short.address).query("c14.example", "A").records == ["192.0.2.1"]


# ----- the cache ---------------------------------------------------------------------------------
@pytest.fixture
def clock(monkeypatch) -> Callable[[float], None]:
    """Move the monotonic clock forward (the cache's expiry is on it)."""
    real = time.monotonic
    offset = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real() + offset[0])

    def advance(seconds: float) -> None:
        offset[0] += seconds
    return advance


def test_cache_hit_is_not_a_query(dns_server) -> None:
    dns_server.add("hit.example", "A", "192.0.2.1", ttl=300)
    r = resolver(dns_server.address, cache_size=100)
    first = r.query("hit.example", "A")
    assert r.queries == 1
    for name in ("hit.example", "HIT.example.", "hit.Example"):
        assert r.query(name, "A") == first
    assert r.queries == 1 and len(dns_server.queries) == 1
    r.query("hit.example", "AAAA")   # another type: asked
    assert r.queries == 2 and len(dns_server.queries) == 2
    # a cached answer is a copy: changing it does not change the cache
    r.query("hit.example", "A").records.append("x")
    assert r.query("hit.example", "A").records == ["192.0.2.1"]


def test_positive_ttl_is_the_lowest_of_the_chain(dns_server, clock) -> None:
    dns_server.add("a.example", "CNAME", "b.example.", ttl=20)
    dns_server.add("b.example", "A", "192.0.2.1", ttl=300)
    r = resolver(dns_server.address, cache_size=100)
    assert r.query("a.example", "A").ttl == 300
    clock(19)
    r.query("a.example", "A")
    assert len(dns_server.queries) == 1
    clock(2)
    r.query("a.example", "A")
    assert len(dns_server.queries) == 2


def test_nxdomain_without_soa_is_cached_300s_for_every_type(dns_server, clock) -> None:
    """As dnspython does (NEGATIVE_TTL_WITHOUT_SOA); the test server sends no SOA."""
    r = resolver(dns_server.address, cache_size=100)
    assert r.query("gone.example", "TXT").nxdomain
    assert r.query("gone.example", "A").nxdomain and r.query("Gone.example", "MX").nxdomain
    assert len(dns_server.queries) == 1
    clock(299)
    assert r.query("gone.example", "A").nxdomain
    assert len(dns_server.queries) == 1
    clock(2)
    assert r.query("gone.example", "A").nxdomain
    assert len(dns_server.queries) == 2


@pytest.mark.parametrize("rcode", [dns.rcode.NXDOMAIN, dns.rcode.NOERROR])
def test_negative_ttl_from_the_soa(scripted, clock, rcode) -> None:
    """min(SOA TTL, SOA minimum) of the closest enclosing zone's SOA."""
    soa = "example. {ttl} IN SOA ns.example. admin.example. 1 7200 900 1209600 {minimum}"
    server = scripted(lambda q: [response(q, rcode, authority=[soa.format(ttl=60, minimum=5)])])
    r = resolver(server.address, cache_size=100)
    answer = r.query("neg.sub.example", "TXT")
    assert answer == tdns.Answer([], nxdomain=rcode == dns.rcode.NXDOMAIN, ttl=0)
    clock(4)
    r.query("neg.sub.example", "TXT")
    assert len(server.received) == 1
    clock(2)
    r.query("neg.sub.example", "TXT")
    assert len(server.received) == 2
    server.reply = lambda q: [response(q, rcode, authority=[soa.format(ttl=3, minimum=3600)])]
    r.query("other.example", "TXT")
    clock(2)
    r.query("other.example", "TXT")
    assert len(server.received) == 3
    clock(2)
    r.query("other.example", "TXT")
    assert len(server.received) == 4


def test_zero_ttl_is_not_served_from_the_cache(dns_server) -> None:
    dns_server.add("zero.example", "A", "192.0.2.1", ttl=0)
    r = resolver(dns_server.address, cache_size=100)
    r.query("zero.example", "A")
    r.query("zero.example", "A")
    assert len(dns_server.queries) == 2


def test_cache_size_is_a_bound_least_recently_used_out(dns_server) -> None:
    for i in range(4):
        dns_server.add(f"n{i}.example", "A", f"192.0.2.{i}")
    r = resolver(dns_server.address, cache_size=3)
    for i in range(3):
        r.query(f"n{i}.example", "A")
    r.query("n0.example", "A")       # n0 used: n1 is the oldest now
    r.query("n3.example", "A")       # n1 out
    asked = len(dns_server.queries)
    r.query("n0.example", "A")
    r.query("n2.example", "A")
    r.query("n3.example", "A")
    assert len(dns_server.queries) == asked
    r.query("n1.example", "A")
    assert len(dns_server.queries) == asked + 1
    assert len(r._cache) == 3
    uncached = resolver(dns_server.address, cache_size=0)
    uncached.query("n0.example", "A")
    uncached.query("n0.example", "A")
    assert len(dns_server.queries) == asked + 3


# ----- threads -----------------------------------------------------------------------------------
def test_concurrent_queries_get_their_own_answers(dns_server) -> None:
    for i in range(40):
        dns_server.add(f"t{i}.example", "A", f"192.0.2.{i}")
    dns_server.on("t7.example", "delay:0.3")
    r = resolver(dns_server.address, timeout=2.0)
    wrong: list[tuple[int, object]] = []

    def work(offset: int) -> None:
        for j in range(40):
            i = (j + offset) % 40
            got = r.query(f"t{i}.example", "A").records
            if got != [f"192.0.2.{i}"]:
                wrong.append((i, got))

    threads = [threading.Thread(target=work, args=(k * 5,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert r.queries == 320


# ----- replies read from the bytes: what dnspython would read ------------------------------------
def _dnspython_reading(wire: bytes) -> tuple[int, int] | None:
    try:
        msg = dns.message.from_wire(wire)
        return msg.rcode(), msg.resolve_chaining().minimum_ttl
    except Exception:  # noqa: BLE001
        return None


@pytest.mark.parametrize("authority", [
    [],
    ["example. 60 IN SOA ns.example. admin.example. 1 2 3 4 30"],
    ["example. 10 IN SOA ns.example. admin.example. 1 2 3 4 30"],
    ["sub.example. 99 IN SOA ns.example. admin.example. 1 2 3 4 77",
     "example. 10 IN SOA ns.example. admin.example. 1 2 3 4 30"],
    ["other.test. 10 IN SOA ns.example. admin.example. 1 2 3 4 30"],
    [". 500 IN SOA a.root-servers.net. nstld.verisign-grs.com. 1 2 3 4 400"],
    ["EXAMPLE. 60 IN SOA ns.example. admin.example. 1 2 3 4 30"],
    ["example. 60 IN SOA ns.example. admin.example. 1 2 3 4 4294967295"],
])
@pytest.mark.parametrize("rcode", [dns.rcode.NXDOMAIN, dns.rcode.NOERROR, dns.rcode.SERVFAIL])
def test_fast_read_agrees_with_dnspython(authority, rcode) -> None:
    query = dns.message.make_query("x.sub.example", "TXT")
    query.use_edns(0, 0, 1232)
    wire = response(query, rcode, authority=authority)
    question = dns.name.from_text("x.sub.example").to_wire() + b"\x00\x10\x00\x01"
    fast = tdns._fast_read(wire, query.id, question)
    expected = _dnspython_reading(wire)
    if fast is None:   # left to dnspython: only when dnspython would refuse it
        assert expected is None, (authority, rcode)
        return
    assert expected is not None and fast[0] == expected[0]
    if fast[1]:
        key = question[:-4].lower()
        assert tdns._negative_ttl(wire, key, len(question)) == expected[1]


def test_fast_read_leaves_odd_replies_to_dnspython() -> None:
    query = dns.message.make_query("x.example", "A")
    question = dns.name.from_text("x.example").to_wire() + b"\x00\x01\x00\x01"
    good = response(query, dns.rcode.NXDOMAIN)
    assert tdns._fast_read(good, query.id, question) == (dns.rcode.NXDOMAIN, True)
    upper = dns.message.make_query("X.EXAMPLE", "A")
    upper.id = query.id
    assert tdns._fast_read(response(upper, dns.rcode.NXDOMAIN), query.id, question) == \
        (dns.rcode.NXDOMAIN, True)
    assert tdns._fast_read(good, query.id ^ 1, question) is None              # id
    assert tdns._fast_read(good + b"\x00", query.id, question) is None       # trailing junk
    truncated = good[:2] + bytes([good[2] | 0x02]) + good[3:]
    assert tdns._fast_read(truncated, query.id, question) is None
    other = dns.name.from_text("y.example").to_wire() + b"\x00\x01\x00\x01"
    assert tdns._fast_read(good, query.id, other) is None                      # question
    with_answer = response(query, answer=["x.example. 60 IN A 192.0.2.1"])
    assert tdns._fast_read(with_answer, query.id, question) is None
    # a compression pointer pointing forwards: dnspython refuses the reply, so must we
    soa = bytearray(response(query,
                             authority=["example. 60 IN SOA ns.example. a.example. 1 2 3 4 5"]))
    at = 12 + len(question)
    soa[at:at + 2] = b"\xc0\xff"
    assert _dnspython_reading(bytes(soa)) is None
    assert tdns._fast_read(bytes(soa), query.id, question) is None


# ----- query_many: a batch on one socket ----------------------------------------------------------
def _outcome(result: object) -> tuple[str, object]:
    if isinstance(result, Exception):
        return type(result).__name__, str(result)
    assert isinstance(result, tdns.Answer)
    return "Answer", (result.records, result.nxdomain, result.ttl)


def _one_by_one(r: Resolver, names: list[str], rdtype: str, timeout: float) -> list[object]:
    out: list[object] = []
    for name in names:
        try:
            out.append(r.query(name, rdtype, timeout=timeout))
        except (DNSTempError, DNSPermError) as exc:
            out.append(exc)
    return out


def test_query_many_gives_each_name_what_query_gives(dns_server) -> None:
    dns_server.add("a.example", "A", "192.0.2.1", ttl=60)
    dns_server.add("b.example", "A", "192.0.2.2", ttl=60)
    dns_server.add("b.example", "A", "192.0.2.3", ttl=60)
    dns_server.add("txt-only.example", "TXT", "x")          # NODATA for A
    dns_server.add("tc.example", "A", "192.0.2.9")
    dns_server.on("tc.example", "truncate")                  # then over TCP
    dns_server.on("broken.example", "servfail")
    dns_server.on("refusing.example", "refused")
    dns_server.on("silent.example", "timeout")
    names = ["a.example", "missing.example", "b.example", "txt-only.example", "tc.example",
             "broken.example", "refusing.example", "silent.example", "a" * 64 + ".example",
             "A.Example"]
    batch = resolver(dns_server.address, timeout=1.0).query_many(names, "A", timeout=0.4)
    single = _one_by_one(resolver(dns_server.address, timeout=1.0), names, "A", 0.4)
    assert [_outcome(r) for r in batch] == [_outcome(r) for r in single]
    assert _outcome(batch[0])[0] == "Answer" and _outcome(batch[7]) == (
        "DNSTempError", "silent.example A: timeout")


def test_query_many_sends_everything_before_it_waits(dns_server) -> None:
    for i in range(6):
        dns_server.on(f"slow{i}.example", "delay:0.3")
        dns_server.add(f"slow{i}.example", "A", f"192.0.2.{i + 1}")
    dns_server.on("silent1.example", "timeout")
    dns_server.on("silent2.example", "timeout")
    r = resolver(dns_server.address, timeout=2.0)
    started = time.monotonic()
    results = r.query_many([f"slow{i}.example" for i in range(6)] +
                           ["silent1.example", "silent2.example"], "A", timeout=0.6)
    elapsed = time.monotonic() - started
    assert [x.records for x in results[:6]] == [[f"192.0.2.{i + 1}"] for i in range(6)]
    assert all(isinstance(x, DNSTempError) for x in results[6:])
    assert 0.55 < elapsed < 1.0, f"{elapsed:.2f} s: the lookups did not overlap"
    assert r.queries == 6     # answered from the network; timeouts are not counted


def test_query_many_matches_replies_out_of_order_and_ignores_strangers(scripted) -> None:
    """The server holds its replies until the last query, then sends them newest first, each
    after a datagram with a wrong id and one with the right id but another question."""
    held: list[dns.message.Message] = []

    def reply(q: dns.message.Message) -> list[bytes]:
        held.append(q)
        if len(held) < 4:
            return []
        out: list[bytes] = []
        for query in reversed(held):
            name = query.question[0].name.to_text()
            other = dns.message.make_query("other.example", "A")
            other.id = query.id
            out += [response(query, qid=(query.id + 1) % 65536,
                             answer=[f"{name} 60 IN A 198.51.100.1"]),
                    response(other, answer=["other.example. 60 IN A 198.51.100.2"]),
                    response(query, answer=[f"{name} 60 IN A 192.0.2.{len(out) // 3 + 1}"])]
        return out

    server = scripted(reply)
    names = [f"n{i}.example" for i in range(4)]
    results = resolver(server.address).query_many(names, "A")
    assert [x.records for x in results] == [["192.0.2.4"], ["192.0.2.3"], ["192.0.2.2"],
                                            ["192.0.2.1"]]
    assert len({dns.message.from_wire(d).id for d in server.received}) == 4   # distinct ids


def test_query_many_uses_the_cache_and_a_closed_port_times_out(dns_server) -> None:
    dns_server.add("cached.example", "A", "192.0.2.7", ttl=300)
    r = resolver(dns_server.address, cache_size=100)
    r.query("cached.example", "A")
    before = len(dns_server.queries)
    assert r.query_many(["cached.example"], "A")[0].records == ["192.0.2.7"]
    assert len(dns_server.queries) == before
    dead = resolver(f"127.0.0.1:{closed_port()}", timeout=0.2)
    for _ in range(2):   # and the socket works again (a fresh one) the next time
        assert [str(x) for x in dead.query_many(["x.example", "y.example"], "A")] == [
            "x.example A: timeout", "y.example A: timeout"]


def test_session_query_many_keeps_the_message_deadline(dns_server) -> None:
    dns_server.on("slow.example", "delay:1.0")
    dns_server.add("fast.example", "A", "192.0.2.1")
    session = tdns.session_for(resolver(dns_server.address, timeout=2.0), 0.3)
    started = time.monotonic()
    fast, slow = session.query_many(["fast.example", "slow.example"], "A")
    assert time.monotonic() - started < 0.6
    assert fast.records == ["192.0.2.1"] and isinstance(slow, DNSTempError)
    assert session.errors == ["slow.example A: timeout"] and session.lookups == 2
    time.sleep(0.05)
    late = session.query_many(["fast.example"], "A")
    assert [str(x) for x in late] == ["fast.example A: message DNS deadline passed"]
