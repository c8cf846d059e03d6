"""URIBL/DBL/SURBL against the real test DNS server: registered domains of body links, envelope
sender, From and Reply-To; return codes and bitmasks to symbols; refusals and failures never
counting as listings; limits and skips."""
from __future__ import annotations

import logging
from typing import Any, Callable

import pytest

from trustmilter import checks, dnslists
from trustmilter.config import load_config
from trustmilter.pipeline import Engine, evaluate
from trustmilter.types import Envelope

IP = "81.2.69.160"


def _engine(make_engine: Callable[..., Engine], enable: list[str],
            uribl: dict[str, Any] | None = None, **top: Any) -> Engine:
    """Only the uribl check, only the named shipped lists (plus per-list overrides)."""
    overrides: dict[str, Any] = {m.NAME: {"enabled": False} for m in checks.ALL if m.NAME != "uribl"}
    shipped = load_config(None).section("uribl")["lists"]
    lists: dict[str, Any] = {name: {"enabled": name in enable} for name in shipped}
    section = dict(uribl or {})
    for name, spec in section.pop("lists", {}).items():
        lists[name].update(spec)
    overrides["uribl"] = {"lists": lists, **section}
    overrides.update(top)
    return make_engine(overrides)


def _msg(body: str = "hello", *, frm: str = "Shop <news@mail.sender-corp.com>",
         reply_to: str | None = None, html: str | None = None) -> bytes:
    head = f"From: {frm}\r\nTo: u@dest.test\r\nSubject: offer\r\nMessage-ID: <1@x>\r\n"
    if reply_to:
        head += f"Reply-To: {reply_to}\r\n"
    if html is None:
        return (head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body + "\r\n").encode()
    return (head + "MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=BB\r\n\r\n"
            "--BB\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body + "\r\n"
            "--BB\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html + "\r\n--BB--\r\n").encode()


def _symbols(verdict: Any) -> dict[str, Any]:
    return {s.name: s for s in verdict.symbols}


def _asked(dns_server, zone: str) -> list[str]:
    return [q[0][: -len(zone) - 1] for q in dns_server.queries if q[0].endswith("." + zone)]


ENV = Envelope(client_ip=IP, helo="mx.sender-corp.com", mail_from="bounce@sender-corp.com")


def test_body_link_registered_domain_listed_in_dbl(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamhaus_dbl"])
    dns_server.add("spammy-shop.co.uk.dbl.spamhaus.org", "A", "127.0.1.2")
    raw = _msg("Buy now: https://deals.www.spammy-shop.co.uk/x?id=1 cheap",
               html='<a href="http://click.spammy-shop.co.uk/r">here</a>')
    syms = _symbols(evaluate(ENV, raw, engine))
    assert set(syms) == {"DBL_SPAM"}
    assert syms["DBL_SPAM"].score == 5.0
    assert "spammy-shop.co.uk (body URL)" in syms["DBL_SPAM"].reason
    assert "spam" in syms["DBL_SPAM"].reason      # pydnsbl's category for 127.0.1.2
    # the registered domain, once, however many links point into it
    assert _asked(dns_server, "dbl.spamhaus.org").count("spammy-shop.co.uk") == 1


def test_header_domains_are_looked_up_first(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamhaus_dbl"])
    dns_server.add("phish-reply.net.dbl.spamhaus.org", "A", "127.0.1.4")
    raw = _msg("see http://link-one.example.org/ and http://link-two.example.org/",
               frm="Bank <alerts@secure.from-bank.com>",
               reply_to="Support <help@mail.phish-reply.net>")
    syms = _symbols(evaluate(Envelope(client_ip=IP, mail_from="b@bounces.envelope-co.net"),
                             raw, engine))
    assert set(syms) == {"DBL_PHISH"} and "(Reply-To)" in syms["DBL_PHISH"].reason
    asked = _asked(dns_server, "dbl.spamhaus.org")
    assert set(asked) == {"envelope-co.net", "from-bank.com", "phish-reply.net", "example.org"}
    # header domains have priority when the per-message limit cuts (lookups run concurrently,
    # so the order they reach the server says nothing)
    dns_server.clear()
    engine = _engine(make_engine, ["spamhaus_dbl"], {"max_domains": 3})
    evaluate(Envelope(client_ip=IP, mail_from="b@bounces.envelope-co.net"), raw, engine)
    assert set(_asked(dns_server, "dbl.spamhaus.org")) == {"envelope-co.net", "from-bank.com",
                                                          "phish-reply.net"}


def test_dbl_ip_queries_refused_code_and_spamhaus_refusal(dns_server, make_engine, caplog) -> None:
    engine = _engine(make_engine, ["spamhaus_dbl"])
    dns_server.add("sender-corp.com.dbl.spamhaus.org", "A", "127.0.1.255")
    dns_server.add("links-site.org.dbl.spamhaus.org", "A", "127.255.255.254")
    dnslists.throttled._last.clear()
    with caplog.at_level(logging.WARNING, logger="trustmilter.dnslists"):
        syms = _symbols(evaluate(ENV, _msg("http://www.links-site.org/"), engine))
    assert set(syms) == {"URIBL_BLOCKED"}
    assert "(+1 more)" in syms["URIBL_BLOCKED"].reason
    assert any("refused our query" in r.getMessage() for r in caplog.records)


def test_bitmask_lists_and_their_refusal_code(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["surbl", "uribl"])
    dns_server.add("bad-site.org.multi.surbl.org", "A", "127.0.0.24")      # PH + MW
    dns_server.add("bad-site.org.multi.uribl.com", "A", "127.0.0.1")       # refused
    syms = _symbols(evaluate(ENV, _msg("go to http://www.bad-site.org/now"), engine))
    assert set(syms) == {"SURBL_PH", "SURBL_MW", "URIBL_BLOCKED"}
    assert verdict_score(syms) == pytest.approx(11.0)


def verdict_score(syms: dict[str, Any]) -> float:
    return sum(s.score for s in syms.values())


def test_uribl_black_and_grey(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["uribl"])
    dns_server.add("bad-site.org.multi.uribl.com", "A", "127.0.0.6")
    syms = _symbols(evaluate(ENV, _msg("http://bad-site.org/"), engine))
    assert set(syms) == {"URIBL_BLACK", "URIBL_GREY"}


@pytest.mark.parametrize("behaviour", ["timeout", "servfail"])
def test_failures_are_tempfail_not_hits(dns_server, make_engine, behaviour) -> None:
    engine = _engine(make_engine, ["spamhaus_dbl"])
    dns_server.on("bad-site.org.dbl.spamhaus.org", behaviour)
    dns_server.add("worse-site.net.dbl.spamhaus.org", "A", "127.0.1.5")
    syms = _symbols(evaluate(ENV, _msg("http://bad-site.org/ http://a.worse-site.net/"),
                             engine))
    assert set(syms) == {"URIBL_TEMPFAIL", "DBL_MALWARE"}
    assert "dbl.spamhaus.org" in syms["URIBL_TEMPFAIL"].reason


def test_answer_outside_loopback_is_not_a_listing(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamhaus_dbl"])
    dns_server.add("*.dbl.spamhaus.org", "A", "203.0.113.80")     # a wildcarding zone
    syms = _symbols(evaluate(ENV, _msg("http://x.example.org/"), engine))
    assert set(syms) == {"URIBL_BAD_ANSWER"}


def test_domain_and_query_limits(dns_server, make_engine) -> None:
    links = " ".join(f"http://www.example-{i}.com/" for i in range(30))
    engine = _engine(make_engine, ["spamhaus_dbl", "surbl"], {"max_domains": 5})
    syms = _symbols(evaluate(Envelope(client_ip=IP), _msg(links, frm="a@b-sender.net"), engine))
    assert "URIBL_LIMIT" in syms and "26 domain(s)" in syms["URIBL_LIMIT"].reason
    assert len(dns_server.queries) == 10                 # 5 domains x 2 lists
    dns_server.clear()
    engine = _engine(make_engine, ["spamhaus_dbl", "surbl"], {"max_queries": 7})
    syms = _symbols(evaluate(Envelope(client_ip=IP), _msg(links, frm="a@b-sender.net"), engine))
    assert "URIBL_LIMIT" in syms and "lookup(s) beyond uribl.max_queries=7" in syms["URIBL_LIMIT"].reason
    assert len(dns_server.queries) == 7


def test_skip_domains_sources_and_per_list_sources(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamhaus_dbl", "sem_uribl"],
                     {"skip_domains": ["example.org"], "sources": ["from", "body_urls"]})
    evaluate(ENV, _msg("http://a.example.org/ http://b.example.net/"), engine)
    dbl = set(_asked(dns_server, "dbl.spamhaus.org"))
    sem = set(_asked(dns_server, "uribl.spameatingmonkey.net"))
    assert dbl == {"sender-corp.com", "example.net"}  # From's domain + the unskipped link
    assert sem == {"example.net"}                     # sem_uribl: body_urls only
    dns_server.clear()
    evaluate(Envelope(client_ip=IP, mail_from="x@envelope-only.com"), _msg("no links"), engine)
    assert set(_asked(dns_server, "dbl.spamhaus.org")) == {"sender-corp.com"}  # source off


def test_idn_link_is_asked_as_a_label_and_ip_links_are_not_asked(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamhaus_dbl"])
    raw = _msg("x", html='<a href="http://www.b\u00fccher.de/">b</a> '
                         '<a href="http://203.0.113.9/login">ip</a>', frm="a@b-corp.de")
    evaluate(Envelope(client_ip=IP), raw, engine)
    asked = set(_asked(dns_server, "dbl.spamhaus.org"))
    assert asked == {"b-corp.de", "xn--bcher-kva.de"}


def test_authenticated_submission_is_not_looked_up(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamhaus_dbl"])
    evaluate(Envelope(client_ip=IP, auth_user="alice", mail_from="alice@example.com"),
             _msg("http://example.org/"), engine)
    assert dns_server.queries == []


def test_unknown_source_is_a_config_error(make_engine) -> None:
    engine = _engine(make_engine, ["spamhaus_dbl"], {"sources": ["body_urls", "subject"]})
    assert "uribl" in engine.disabled and "subject" in engine.disabled["uribl"]
    engine = _engine(make_engine, ["spamhaus_dbl"],
                     {"lists": {"spamhaus_dbl": {"sources": ["helo"]}}})
    assert "uribl" in engine.disabled and "uribl.lists.spamhaus_dbl.sources" in engine.disabled["uribl"]


def test_no_enabled_list_asks_nothing(dns_server, make_engine) -> None:
    engine = _engine(make_engine, [])
    assert evaluate(ENV, _msg("http://example.org/"), engine).symbols == []
    assert dns_server.queries == []
