"""DNSBL against the real test DNS server: return codes to symbols, refusal codes, bad answers,
timeouts and SERVFAIL never counting as listings, IPv6 nibbles, skips, limits, concurrency and
the resolver cache."""
from __future__ import annotations

import copy
import ipaddress
import logging
import time
from typing import Any, Callable

import pytest

from trustmilter import checks, dnslists
from trustmilter.config import load_config
from trustmilter.errors import ConfigError
from trustmilter.pipeline import Engine, evaluate
from trustmilter.types import Envelope

MSG = b"From: a@example.org\r\nSubject: t\r\n\r\nhi\r\n"
IP = "81.2.69.160"
REV = "160.69.2.81"
IP6 = "2a00:1450:4001:81c::2005"
REV6 = ".".join(reversed(ipaddress.ip_address(IP6).exploded.replace(":", "")))


def _engine(make_engine: Callable[..., Engine], enable: list[str],
            extra: dict[str, Any] | None = None) -> Engine:
    """Only the dnsbl check, only the named shipped lists."""
    overrides: dict[str, Any] = {m.NAME: {"enabled": False} for m in checks.ALL if m.NAME != "dnsbl"}
    shipped = load_config(None).section("dnsbl")["lists"]
    overrides["dnsbl"] = {"lists": {name: {"enabled": name in enable} for name in shipped}}
    if extra:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(overrides.get(key), dict):
                merged = copy.deepcopy(overrides[key])
                for k, v in value.items():
                    if isinstance(v, dict) and isinstance(merged.get(k), dict):
                        for name, spec in v.items():
                            merged[k].setdefault(name, {}).update(spec)
                    else:
                        merged[k] = v
                overrides[key] = merged
            else:
                overrides[key] = value
    return make_engine(overrides)


@pytest.fixture(params=["batch", "threads"])
def lookup_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The lookups all at once on one socket (Resolver.query_many, the stub path), or one per
    thread of the list pool (the path of a resolver that cannot batch)."""
    from trustmilter.dns import Resolver
    assert Resolver.batches.fget is not None
    if request.param == "threads":
        monkeypatch.setattr(Resolver, "batches", property(lambda self: False))
    return str(request.param)


def _symbols(verdict: Any) -> dict[str, Any]:
    return {s.name: s for s in verdict.symbols}


def test_query_names_ipv4_ipv6_and_domains() -> None:
    assert dnslists.ip_query_label(IP) == REV
    assert dnslists.ip_query_label(IP6) == REV6
    assert len(REV6.split(".")) == 32
    assert dnslists.domain_query_label("Exämple.co.uk.") == "xn--exmple-cua.co.uk"
    with pytest.raises(ValueError):
        dnslists.domain_query_label("bad_name")


def test_zen_codes_map_to_distinct_symbols(dns_server, make_engine, lookup_path) -> None:
    engine = _engine(make_engine, ["spamhaus_zen"])
    for code in ("127.0.0.2", "127.0.0.4", "127.0.0.10"):
        dns_server.add(f"{REV}.zen.spamhaus.org", "A", code)
    verdict = evaluate(Envelope(client_ip=IP, helo="x.example"), MSG, engine)
    syms = _symbols(verdict)
    assert {"RBL_SPAMHAUS_SBL", "RBL_SPAMHAUS_XBL", "RBL_SPAMHAUS_PBL"} <= set(syms)
    assert syms["RBL_SPAMHAUS_SBL"].score == 4.0 and syms["RBL_SPAMHAUS_PBL"].score == 2.0
    # pydnsbl's category for the code appears in the reason
    assert "exploits" in syms["RBL_SPAMHAUS_XBL"].reason
    assert IP in syms["RBL_SPAMHAUS_SBL"].reason and "zen.spamhaus.org" in syms["RBL_SPAMHAUS_SBL"].reason
    assert verdict.score == pytest.approx(4.0 + 4.0 + 2.0)


def test_pbl_only_is_not_sbl(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamhaus_zen"])
    dns_server.add(f"{REV}.zen.spamhaus.org", "A", "127.0.0.11")
    syms = _symbols(evaluate(Envelope(client_ip=IP), MSG, engine))
    assert set(syms) == {"RBL_SPAMHAUS_PBL"}


@pytest.mark.parametrize("code", ["127.255.255.254", "127.255.255.255", "127.255.255.252"])
def test_refusal_codes_are_errors_not_hits(dns_server, make_engine, caplog, code) -> None:
    engine = _engine(make_engine, ["spamhaus_zen", "spamcop"])
    dns_server.add(f"{REV}.zen.spamhaus.org", "A", code)
    dns_server.add(f"{REV}.bl.spamcop.net", "A", "127.0.0.2")
    dnslists.throttled._last.clear()
    with caplog.at_level(logging.WARNING, logger="trustmilter.dnslists"):
        verdict = evaluate(Envelope(client_ip=IP), MSG, engine)
    syms = _symbols(verdict)
    assert "DNSBL_BLOCKED" in syms and syms["DNSBL_BLOCKED"].score == 0.0
    assert code in syms["DNSBL_BLOCKED"].reason
    assert not [n for n in syms if n.startswith("RBL_SPAMHAUS")]
    assert "RBL_SPAMCOP" in syms            # the other list still counts
    assert any("zen.spamhaus.org refused" in r.getMessage() for r in caplog.records)


def test_refusal_mixed_with_listing_code_counts_nothing(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamhaus_zen"])
    dns_server.add(f"{REV}.zen.spamhaus.org", "A", "127.0.0.2")
    dns_server.add(f"{REV}.zen.spamhaus.org", "A", "127.255.255.254")
    syms = _symbols(evaluate(Envelope(client_ip=IP), MSG, engine))
    assert set(syms) == {"DNSBL_BLOCKED"}


def test_answer_outside_loopback_is_bad_answer(dns_server, make_engine, caplog) -> None:
    engine = _engine(make_engine, ["spamcop"])
    dns_server.add(f"{REV}.bl.spamcop.net", "A", "198.51.100.7")   # NXDOMAIN-rewriting resolver
    dnslists.throttled._last.clear()
    with caplog.at_level(logging.WARNING, logger="trustmilter.dnslists"):
        syms = _symbols(evaluate(Envelope(client_ip=IP), MSG, engine))
    assert set(syms) == {"DNSBL_BAD_ANSWER"}
    assert "outside 127.0.0.0/8" in syms["DNSBL_BAD_ANSWER"].reason
    assert any("no listing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("behaviour", ["timeout", "servfail", "refused"])
def test_timeout_and_servfail_are_tempfail_not_hits(dns_server, make_engine, behaviour, lookup_path) -> None:
    engine = _engine(make_engine, ["spamcop", "psbl"])
    dns_server.on(f"{REV}.bl.spamcop.net", behaviour)
    dns_server.add(f"{REV}.psbl.surriel.com", "A", "127.0.0.2")
    t0 = time.monotonic()
    syms = _symbols(evaluate(Envelope(client_ip=IP), MSG, engine))
    assert "DNSBL_TEMPFAIL" in syms and "bl.spamcop.net" in syms["DNSBL_TEMPFAIL"].reason
    assert "RBL_SPAMCOP" not in syms and "RBL_PSBL" in syms
    assert time.monotonic() - t0 < 2.5     # one query timeout (0.5 s), not the whole deadline


def test_not_listed_is_silent(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamcop", "psbl", "spamhaus_zen"])
    verdict = evaluate(Envelope(client_ip=IP), MSG, engine)
    assert verdict.symbols == []
    asked = {q[0] for q in dns_server.queries}
    assert asked == {f"{REV}.bl.spamcop.net", f"{REV}.psbl.surriel.com", f"{REV}.zen.spamhaus.org"}


def test_ipv6_nibbles_and_lists_without_ipv6(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamhaus_zen", "spamcop"])
    dns_server.add(f"{REV6}.zen.spamhaus.org", "A", "127.0.0.3")
    syms = _symbols(evaluate(Envelope(client_ip=IP6), MSG, engine))
    assert set(syms) == {"RBL_SPAMHAUS_CSS"}
    asked = {q[0] for q in dns_server.queries}
    assert asked == {f"{REV6}.zen.spamhaus.org"}      # spamcop serves no IPv6


def test_ipv4_mapped_ipv6_is_looked_up_as_ipv4(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamcop"])
    dns_server.add(f"{REV}.bl.spamcop.net", "A", "127.0.0.2")
    syms = _symbols(evaluate(Envelope(client_ip=f"::ffff:{IP}"), MSG, engine))
    assert "RBL_SPAMCOP" in syms


@pytest.mark.parametrize("ip", ["10.1.2.3", "192.168.1.1", "127.0.0.1", "192.0.2.1", "fd00::1",
                                "::1", "100.64.0.1", "169.254.1.1"])
def test_private_and_reserved_addresses_are_not_looked_up(dns_server, make_engine, ip) -> None:
    engine = _engine(make_engine, ["spamcop"])
    assert evaluate(Envelope(client_ip=ip), MSG, engine).symbols == []
    assert dns_server.queries == []


def test_trusted_skip_networks_and_authenticated_are_not_looked_up(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamcop"], {"trusted_networks": ["81.2.69.0/24"]})
    evaluate(Envelope(client_ip=IP), MSG, engine)
    engine = _engine(make_engine, ["spamcop"], {"dnsbl": {"skip_networks": ["81.2.0.0/16"]}})
    evaluate(Envelope(client_ip=IP), MSG, engine)
    engine = _engine(make_engine, ["spamcop"])
    evaluate(Envelope(client_ip=IP, auth_user="alice"), MSG, engine)
    evaluate(Envelope(client_ip=None), MSG, engine)
    assert dns_server.queries == []
    evaluate(Envelope(client_ip=IP), MSG, engine)
    assert len(dns_server.queries) == 1


def test_query_limit(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamcop", "psbl", "mailspike_bl", "mailspike_wl"],
                     {"dnsbl": {"max_queries": 2}})
    syms = _symbols(evaluate(Envelope(client_ip=IP), MSG, engine))
    assert "DNSBL_LIMIT" in syms and "2 list(s) not asked" in syms["DNSBL_LIMIT"].reason
    assert len(dns_server.queries) == 2


def test_lookups_run_concurrently(dns_server, make_engine, lookup_path) -> None:
    lists = ["spamcop", "psbl", "mailspike_bl", "mailspike_wl"]
    engine = _engine(make_engine, lists)
    for zone in ("bl.spamcop.net", "psbl.surriel.com", "bl.mailspike.net", "wl.mailspike.net"):
        dns_server.on(f"{REV}.{zone}", "delay:0.3")
    dns_server.add(f"{REV}.wl.mailspike.net", "A", "127.0.0.19")
    t0 = time.monotonic()
    syms = _symbols(evaluate(Envelope(client_ip=IP), MSG, engine))
    elapsed = time.monotonic() - t0
    assert set(syms) == {"RWL_MAILSPIKE_VERYGOOD"} and syms["RWL_MAILSPIKE_VERYGOOD"].score == -0.2
    assert elapsed < 0.9, f"4 lookups of 0.3 s took {elapsed:.2f} s: not concurrent"


def test_message_deadline_bounds_slow_lists(dns_server, make_engine, lookup_path) -> None:
    engine = _engine(make_engine, ["spamcop"], {"dns": {"deadline": 0.3, "timeout": 2.0}})
    dns_server.on(f"{REV}.bl.spamcop.net", "delay:1.5")
    t0 = time.monotonic()
    syms = _symbols(evaluate(Envelope(client_ip=IP), MSG, engine))
    assert "DNSBL_TEMPFAIL" in syms and "RBL_SPAMCOP" not in syms
    assert time.monotonic() - t0 < 1.2


def test_answers_come_from_the_resolver_cache(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamcop"], {"dns": {"cache_size": 1000}})
    dns_server.add(f"{REV}.bl.spamcop.net", "A", "127.0.0.2", ttl=300)
    for _ in range(3):
        assert "RBL_SPAMCOP" in _symbols(evaluate(Envelope(client_ip=IP), MSG, engine))
    assert len(dns_server.queries) == 1


def test_unknown_code_uses_the_lists_unknown_symbol_or_is_ignored(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["spamhaus_zen", "spamcop"])
    dns_server.add(f"{REV}.zen.spamhaus.org", "A", "127.0.0.99")
    dns_server.add(f"{REV}.bl.spamcop.net", "A", "127.0.0.42")       # spamcop: unknown = ""
    syms = _symbols(evaluate(Envelope(client_ip=IP), MSG, engine))
    assert set(syms) == {"RBL_SPAMHAUS"}


def test_wildcard_octets_dnswl_and_its_refusal_code(dns_server, make_engine) -> None:
    engine = _engine(make_engine, ["dnswl"])
    dns_server.add(f"{REV}.list.dnswl.org", "A", "127.0.15.2")
    assert set(_symbols(evaluate(Envelope(client_ip=IP), MSG, engine))) == {"RCVD_IN_DNSWL_MED"}
    dns_server.clear()
    dns_server.add(f"{REV}.list.dnswl.org", "A", "127.0.0.255")
    assert set(_symbols(evaluate(Envelope(client_ip=IP), MSG, engine))) == {"DNSBL_BLOCKED"}


def test_custom_list_definition_and_outcome() -> None:
    section = {"lists": {"mine": {"enabled": True, "zone": "bl.example.net",
                                  "codes": ["127.0.0.0/30 MY_LISTED", "127.0.0.8 MY_OTHER"]}},
               "scores": {"MY_LISTED": 1.0, "MY_OTHER": 2.0}}
    (lst,) = dnslists.parse_lists(section, "dnsbl")
    r = dnslists.read_answer(lst, ["127.0.0.3", "127.0.0.8"])
    assert dict(r.symbols) == {"MY_LISTED": "127.0.0.3", "MY_OTHER": "127.0.0.8"} and not r.error
    assert dnslists.read_answer(lst, ["127.0.0.4"]).unmapped == ("127.0.0.4",)
    assert dnslists.read_answer(lst, ["::1"]).error == "bad_answer"


def test_bitmask_reading() -> None:
    section = load_config(None, {"uribl": {"lists": {"uribl": {"enabled": True}}}}).section("uribl")
    (lst,) = dnslists.parse_lists(section, "uribl", frozenset({"body_urls"}))
    assert dict(dnslists.read_answer(lst, ["127.0.0.14"]).symbols) == {
        "URIBL_BLACK": "127.0.0.14", "URIBL_GREY": "127.0.0.14", "URIBL_RED": "127.0.0.14"}
    assert dnslists.read_answer(lst, ["127.0.0.1"]).error == "blocked"
    assert dnslists.read_answer(lst, ["127.0.1.2"]).symbols == ()


@pytest.mark.parametrize("spec,needle", [
    ({"codes": ["127.0.0.2"]}, 'expected "CODE SYMBOL"'),
    ({"codes": ["127.0.0.300 X_Y"]}, "out of range"),
    ({"codes": ["127.0.0.2 lower"]}, "bad symbol name"),
    ({"codes": ["127.0.0.2 NO_SCORE_HERE"]}, "has no score"),
    ({"zone": "bad zone"}, "bad zone"),
    ({"color": "red"}, "unknown setting"),
])
def test_bad_list_definitions_are_config_errors(spec, needle) -> None:
    base = {"enabled": True, "zone": "bl.example.net", "codes": ["127.0.0.2 MY_LISTED"]}
    base.update(spec)
    with pytest.raises(ConfigError) as err:
        dnslists.parse_lists({"lists": {"mine": base}, "scores": {"MY_LISTED": 1.0}}, "dnsbl")
    assert needle in str(err.value) and "dnsbl.lists.mine" in str(err.value)


def test_a_bad_list_disables_the_check_loudly(make_engine, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        engine = _engine(make_engine, ["spamcop"],
                         {"dnsbl": {"lists": {"spamcop": {"codes": ["127.0.0.2 UNSCORED_X"]}}}})
    assert "dnsbl" in engine.disabled and "UNSCORED_X" in engine.disabled["dnsbl"]
    assert any("dnsbl disabled" in r.getMessage() for r in caplog.records)
