"""Reputation with real parts: SQLite files in tmp dirs (WAL), the real SPF/DKIM/DMARC checks on the
test DNS server deciding which identities are authenticated, decay under an injected clock,
a locked database, a WAL reader beside a writer, the recorder, learn corrections and the CLI."""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from authres import DKIMAuthenticationResult, IPRevAuthenticationResult, SPFAuthenticationResult
from authres.dmarc import DMARCAuthenticationResult

from trustmilter import authresults, checks, cli
from trustmilter.checks.base import CheckResult
from trustmilter.checks.outcomes import DKIMOutcome, DKIMSignatureResult, DMARCOutcome, SPFOutcome
from trustmilter.checks.reputation import identities_from_results
from trustmilter.config import load_config
from trustmilter.pipeline import Engine, evaluate
from trustmilter.store.feedback import ReputationFeedback
from trustmilter.store.recorder import StateRecorder, reputation_action
from trustmilter.store.reputation import (Policy, ReputationStore, decay, identities_from_authres,
                                          identity_keys, skip_ip_for)
from trustmilter.types import Action, AuthStatus, Envelope, Symbol, Verdict

DAY = 86400.0
T0 = 1_800_000_000.0
IP = "81.2.69.160"
ENV = Envelope(client_ip=IP, helo="mx.sender-corp.com", mail_from="bounce@sender-corp.com",
               rcpt_to=("u@dest.test",), queue_id="4ABCDEF123")
MSG = (b"From: Sender Corp <news@sender-corp.com>\r\nTo: u@dest.test\r\nSubject: news\r\n"
       b"Message-ID: <n1@sender-corp.com>\r\n\r\nhello\r\n")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _keys(ids: dict[str, Any]) -> list[str]:
    return identity_keys(ids, None, skip_ip_for([]))


# ---- decay and the store ------------------------------------------------------------------------
def test_decay_halves_each_half_life() -> None:
    assert decay(8.0, T0, T0 + 30 * DAY, 30 * DAY) == pytest.approx(4.0)
    assert decay(8.0, T0, T0 + 90 * DAY, 30 * DAY) == pytest.approx(1.0)
    assert decay(8.0, T0, T0 - DAY, 30 * DAY) == 8.0         # a clock going back never grows it


def test_record_lookup_and_decay_with_an_injected_clock(tmp_path: Path) -> None:
    clock = Clock(T0)
    store = ReputationStore(tmp_path / "rep.db", Policy(half_life_days=10), clock=clock)
    store.record([(["dkim:a.example"], "ham", T0)] * 8)
    store.record([(["dkim:a.example"], "reject", T0 + 10 * DAY)])
    st = store.lookup(["dkim:a.example", "dkim:unknown.example"], now=T0 + 10 * DAY)
    assert list(st) == ["dkim:a.example"]
    s = st["dkim:a.example"]
    assert s.ham == pytest.approx(4.0) and s.reject == pytest.approx(1.0)
    assert (s.first_seen, s.last_seen, s.messages) == (T0, T0 + 10 * DAY, 9)
    later = store.lookup(["dkim:a.example"], now=T0 + 30 * DAY)["dkim:a.example"]
    assert later.ham == pytest.approx(1.0) and later.reject == pytest.approx(0.25)
    # an update decays the stored counts to its own time before adding
    store.record([(["dkim:a.example"], "ham", T0 + 20 * DAY)])
    s = store.lookup(["dkim:a.example"], now=T0 + 20 * DAY)["dkim:a.example"]
    assert s.ham == pytest.approx(3.0) and s.reject == pytest.approx(0.5)


def test_policy_judgement(tmp_path: Path) -> None:
    policy = Policy(min_messages=5, good_ratio=0.9, bad_ratio=0.5, good_after_days=2)
    store = ReputationStore(tmp_path / "rep.db", policy)
    store.record([(["spf:good.example"], "ham", T0)] * 10 + [(["spf:bad.example"], "junk", T0)] * 4
                 + [(["spf:bad.example"], "ham", T0)] * 3 + [(["spf:few.example"], "junk", T0)] * 4)
    st = store.lookup(["spf:good.example", "spf:bad.example", "spf:few.example"], now=T0 + 3 * DAY)
    assert policy.judge(st["spf:good.example"], T0 + 3 * DAY).good
    assert not policy.judge(st["spf:good.example"], T0 + 1 * DAY).good   # too young to be good
    assert policy.judge(st["spf:bad.example"], T0 + 3 * DAY).bad
    few = policy.judge(st["spf:few.example"], T0 + 3 * DAY)
    assert not few.good and not few.bad and "too few" in few.reason


# ---- identities ---------------------------------------------------------------------------------
def test_identities_come_only_from_authenticated_results() -> None:
    sig = lambda status, d: DKIMSignatureResult(status, d, "s1", "abcdefgh", "rsa-sha256")  # noqa: E731
    results = {
        "spf": CheckResult(outcome=SPFOutcome(AuthStatus.SOFTFAIL, "softfail.example")),
        "dkim": CheckResult(outcome=DKIMOutcome((sig(AuthStatus.PASS, "Signer.Example"),
                                                 sig(AuthStatus.FAIL, "forged.example")))),
        "dmarc": CheckResult(outcome=DMARCOutcome(AuthStatus.FAIL, "from.example", "from.example",
                                                  "reject", "reject")),
    }
    ids = identities_from_results(results, ENV)
    assert ids == {"dkim": ["signer.example"], "ip": IP}
    results["spf"] = CheckResult(outcome=SPFOutcome(AuthStatus.PASS, "sender-corp.com"))
    results["dmarc"] = CheckResult(outcome=DMARCOutcome(AuthStatus.PASS, "sender-corp.com",
                                                        "sender-corp.com", "none", "none"))
    assert identities_from_results(results, ENV) == {
        "dkim": ["signer.example"], "spf": ["sender-corp.com"], "dmarc": ["sender-corp.com"],
        "ip": IP}


def test_identity_keys_networks_and_skips() -> None:
    ids = {"dkim": ["mail.sender-corp.co.uk"], "dmarc": ["sender-corp.co.uk"], "ip": IP}
    from trustmilter.psl import OrgDomains
    orgs = OrgDomains.load()
    keys = identity_keys(ids, orgs.registrable_domain, skip_ip_for([]))
    assert keys == ["dmarc:sender-corp.co.uk", "dkim:mail.sender-corp.co.uk",
                    "org:sender-corp.co.uk", f"ip:{IP}", "net:81.2.69.0/24"]
    assert _keys({"ip": "2a00:1450:4001:81c::2005"}) == ["net:2a00:1450:4001:81c::/64"]
    assert _keys({"ip": f"::ffff:{IP}"}) == [f"ip:{IP}", "net:81.2.69.0/24"]
    assert _keys({"ip": "10.1.2.3"}) == [] and _keys({"ip": "192.0.2.7"}) == []
    import ipaddress
    assert identity_keys({"ip": IP}, None, skip_ip_for([ipaddress.ip_network("81.2.0.0/16")])) == []


def test_memoised_keys_are_the_keys_and_cannot_be_changed_through_a_result() -> None:
    from trustmilter.store.reputation import ip_keys
    first = ip_keys(IP)
    first.append("junk")                       # a caller's list is its own
    assert ip_keys(IP) == [f"ip:{IP}", "net:81.2.69.0/24"]
    assert ip_keys("2a00:1450:4001:81c::2005") == ["net:2a00:1450:4001:81c::/64"]
    skip = skip_ip_for([])
    # The same answers however often asked (the skip test is memoised per trusted list).
    assert [skip(ip) for ip in (IP, "10.1.2.3", IP, "not an ip", "10.1.2.3")] == [
        False, True, False, True, True]


def test_keys_for_an_engine_are_the_recorders_keys(make_engine) -> None:
    from trustmilter.checks.reputation import keys_for
    from trustmilter.psl import OrgDomains
    from trustmilter.received import parse_networks
    engine = make_engine({"trusted_networks": ["127.0.0.0/8", "81.2.69.0/24"]})
    orgs = OrgDomains.load()
    skip = skip_ip_for(parse_networks(["127.0.0.0/8", "81.2.69.0/24"]))
    for ids in ({"dkim": ["mail.sender-corp.co.uk"], "dmarc": ["sender-corp.co.uk"], "ip": IP},
                {"spf": ["a.b.example.com"], "ip": "198.51.100.7"},
                {"ip": "81.2.69.9"}, {"dkim": ["co.uk"]}, {}):
        for _ in range(2):                     # first time and memoised
            assert keys_for(engine, ids) == identity_keys(ids, orgs.registrable_domain, skip)


def test_identities_from_our_authentication_results_only() -> None:
    value = authresults.build("mx.test.example", [
        SPFAuthenticationResult(result="pass", smtp_mailfrom="bounce@Sender-Corp.com"),
        DKIMAuthenticationResult(result="pass", header_d="signer.example", header_s="s1"),
        DKIMAuthenticationResult(result="fail", header_d="forged.example", header_s="s1"),
        DMARCAuthenticationResult(result="pass", header_from="sender-corp.com"),
        IPRevAuthenticationResult(result="pass", policy_iprev=IP),
    ])
    assert identities_from_authres(value, "mx.test.example") == {
        "dkim": ["signer.example"], "spf": ["sender-corp.com"], "dmarc": ["sender-corp.com"],
        "ip": IP}
    assert identities_from_authres(value, "other.example") == {}
    assert identities_from_authres("garbage ; ;", None) == {}


# ---- the check, on real SPF/DMARC results --------------------------------------------------------
def _engine(make_engine: Callable[..., Engine], tmp_path: Path, clock: Clock | None = None,
            **reputation: Any) -> Engine:
    keep = {"spf", "dkim", "arc", "dmarc", "reputation"}
    overrides: dict[str, Any] = {m.NAME: {"enabled": False} for m in checks.ALL if m.NAME not in keep}
    overrides["state"] = {"dir": str(tmp_path)}
    overrides["reputation"] = reputation
    engine = make_engine(overrides)
    if clock is not None:
        section = engine.config.section("reputation")
        engine.state["reputation.reader"] = ReputationStore(
            tmp_path / "reputation.sqlite", Policy.from_config(section), readonly=True,
            busy_timeout_ms=int(section["read_timeout_ms"]), clock=clock)
    return engine


def _sender_dns(dns_server) -> None:
    dns_server.add("sender-corp.com", "TXT", f"v=spf1 ip4:{IP} -all")
    dns_server.add("_dmarc.sender-corp.com", "TXT", "v=DMARC1; p=none")


def _seed(tmp_path: Path, items: list[tuple[list[str], str, float]], created: float = T0 - 30 * DAY) -> None:
    store = ReputationStore(tmp_path / "reputation.sqlite", clock=Clock(created))
    store.record(items)
    with store.db.write() as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'created'", [repr(created)])
    store.close()


def _rep(verdict: Verdict) -> dict[str, Symbol]:
    return {s.name: s for s in verdict.symbols if s.name.startswith("REPUTATION_")}


def test_no_database_yet_means_no_symbols(dns_server, make_engine, tmp_path) -> None:
    _sender_dns(dns_server)
    verdict = evaluate(ENV, MSG, _engine(make_engine, tmp_path))
    assert "SPF_PASS" in verdict.symbol_names() and "DMARC_POLICY_ALLOW" in verdict.symbol_names()
    assert _rep(verdict) == {}
    assert not (tmp_path / "reputation.sqlite").exists()     # reading never creates it


def test_bad_domain_history(dns_server, make_engine, tmp_path) -> None:
    _sender_dns(dns_server)
    _seed(tmp_path, [(["spf:sender-corp.com"], "reject", T0 - 5 * DAY)] * 6
          + [(["spf:sender-corp.com"], "ham", T0 - 5 * DAY)] * 2)
    rep = _rep(evaluate(ENV, MSG, _engine(make_engine, tmp_path, Clock(T0))))
    assert set(rep) == {"REPUTATION_DOMAIN_BAD"}
    assert rep["REPUTATION_DOMAIN_BAD"].score == 2.5 and "spf:sender-corp.com" in rep["REPUTATION_DOMAIN_BAD"].reason


def test_good_domain_history_needs_age(dns_server, make_engine, tmp_path) -> None:
    _sender_dns(dns_server)
    _seed(tmp_path, [(["dmarc:sender-corp.com", "org:sender-corp.com"], "ham", T0 - 10 * DAY)] * 12)
    rep = _rep(evaluate(ENV, MSG, _engine(make_engine, tmp_path, Clock(T0))))
    assert set(rep) == {"REPUTATION_DOMAIN_GOOD"} and rep["REPUTATION_DOMAIN_GOOD"].score == -1.5
    rep = _rep(evaluate(ENV, MSG, _engine(make_engine, tmp_path, Clock(T0 - 9.5 * DAY))))
    assert set(rep) == {"REPUTATION_NEW_DOMAIN"}        # 12 hams, but only half a day old


def test_ip_history_uses_the_network_when_the_address_is_new(dns_server, make_engine, tmp_path) -> None:
    _sender_dns(dns_server)
    _seed(tmp_path, [(["net:81.2.69.0/24"], "junk", T0 - DAY)] * 9 + [(["ip:81.2.69.160"], "ham", T0)]
          + [(["org:sender-corp.com"], "ham", T0 - 3 * DAY)])
    rep = _rep(evaluate(ENV, MSG, _engine(make_engine, tmp_path, Clock(T0))))
    assert set(rep) == {"REPUTATION_IP_BAD"} and "net:81.2.69.0/24" in rep["REPUTATION_IP_BAD"].reason


def test_new_domain_after_the_learning_period(dns_server, make_engine, tmp_path) -> None:
    _sender_dns(dns_server)
    _seed(tmp_path, [(["org:other.example"], "ham", T0 - 20 * DAY)], created=T0 - 30 * DAY)
    rep = _rep(evaluate(ENV, MSG, _engine(make_engine, tmp_path, Clock(T0))))
    assert set(rep) == {"REPUTATION_NEW_DOMAIN"} and "sender-corp.com" in rep["REPUTATION_NEW_DOMAIN"].reason
    # first seen 2 hours ago: still new; 2 days ago: known
    _seed(tmp_path, [(["org:sender-corp.com"], "ham", T0 - 2 * 3600)])
    assert set(_rep(evaluate(ENV, MSG, _engine(make_engine, tmp_path, Clock(T0))))) == {"REPUTATION_NEW_DOMAIN"}
    rep = _rep(evaluate(ENV, MSG, _engine(make_engine, tmp_path, Clock(T0 + 2 * DAY))))
    assert "REPUTATION_NEW_DOMAIN" not in rep


def test_no_new_domain_while_learning(dns_server, make_engine, tmp_path) -> None:
    _sender_dns(dns_server)
    _seed(tmp_path, [(["org:other.example"], "ham", T0)], created=T0 - 2 * DAY)
    assert _rep(evaluate(ENV, MSG, _engine(make_engine, tmp_path, Clock(T0)))) == {}


def test_an_unauthenticated_from_never_counts(dns_server, make_engine, tmp_path) -> None:
    """SPF fails (the client is not allowed), so DMARC fails: the From domain's bad history must
    not be charged to this message, nor may a forger borrow a good one."""
    _sender_dns(dns_server)
    forger = Envelope(client_ip="203.0.113.66", helo="x.example", mail_from="bounce@sender-corp.com")
    _seed(tmp_path, [(["dmarc:sender-corp.com", "spf:sender-corp.com", "org:sender-corp.com"], "ham",
                      T0 - 20 * DAY)] * 20)
    verdict = evaluate(forger, MSG, _engine(make_engine, tmp_path, Clock(T0)))
    assert "SPF_FAIL" in verdict.symbol_names()
    assert _rep(verdict) == {}
    assert verdict.symbols and all(not s.name.startswith("REPUTATION_DOMAIN") for s in verdict.symbols)


def test_a_locked_database_costs_a_symbol_not_a_stall(dns_server, make_engine, tmp_path, caplog) -> None:
    _sender_dns(dns_server)
    _seed(tmp_path, [(["spf:sender-corp.com"], "reject", T0 - 5 * DAY)] * 6)
    locker = sqlite3.connect(tmp_path / "reputation.sqlite", isolation_level=None)
    locker.execute("PRAGMA locking_mode = EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    locker.execute("UPDATE meta SET value = value WHERE key = 'schema'")
    try:
        engine = _engine(make_engine, tmp_path, Clock(T0))
        with caplog.at_level(logging.WARNING, logger="trustmilter.checks.reputation"):
            t0 = time.monotonic()
            verdict = evaluate(ENV, MSG, engine)
            elapsed = time.monotonic() - t0
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert set(_rep(verdict)) == {"REPUTATION_UNAVAILABLE"}
    assert "locked" in _rep(verdict)["REPUTATION_UNAVAILABLE"].reason
    assert elapsed < 1.0
    assert any("cannot read" in r.getMessage() for r in caplog.records)
    # once the lock is gone, the same engine reads again
    assert set(_rep(evaluate(ENV, MSG, engine))) == {"REPUTATION_DOMAIN_BAD"}


def test_wal_reader_is_not_blocked_by_an_open_write(tmp_path) -> None:
    writer = ReputationStore(tmp_path / "rep.db")
    writer.record([(["ip:81.2.69.160"], "ham", T0)])
    reader = ReputationStore(tmp_path / "rep.db", readonly=True, busy_timeout_ms=50)
    with writer.db.write() as conn:      # a write transaction is open...
        conn.execute("UPDATE reputation SET ham = 100 WHERE key = 'ip:81.2.69.160'")
        t0 = time.monotonic()
        seen = reader.lookup(["ip:81.2.69.160"], now=T0)["ip:81.2.69.160"].ham
        assert time.monotonic() - t0 < 0.2 and seen == pytest.approx(1.0)   # ...and reads go on
    assert reader.lookup(["ip:81.2.69.160"], now=T0)["ip:81.2.69.160"].ham == pytest.approx(100)


def test_concurrent_reader_while_the_writer_writes(tmp_path) -> None:
    writer = ReputationStore(tmp_path / "rep.db")
    writer.record([(["net:81.2.69.0/24"], "ham", T0)])
    reader = ReputationStore(tmp_path / "rep.db", readonly=True, busy_timeout_ms=50)
    errors: list[BaseException] = []
    seen: list[list[int]] = [[], [], []]
    done = threading.Event()

    def read(mine: list[int]) -> None:
        try:
            while not done.is_set():
                st = reader.lookup(["net:81.2.69.0/24"], now=T0)["net:81.2.69.0/24"]
                mine.append(st.messages)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(mine,)) for mine in seen]
    for t in threads:
        t.start()
    for i in range(100):
        writer.record([(["net:81.2.69.0/24"], "junk", T0)] * 10)
        if i % 10 == 0:     # on a busy machine, let every reader in between some of the writes
            deadline = time.monotonic() + 5
            counts = [len(mine) for mine in seen]
            while (any(len(mine) == n for mine, n in zip(seen, counts))
                   and time.monotonic() < deadline and not errors):
                time.sleep(0.001)
    done.set()
    for t in threads:
        t.join()
    assert not errors
    for mine in seen:
        # every read saw a committed state (whole batches of 10), never going back
        assert len(mine) > 5
        assert all(a <= b for a, b in zip(mine, mine[1:]))
        assert all((m - 1) % 10 == 0 for m in mine)
    assert writer.lookup(["net:81.2.69.0/24"], now=T0)["net:81.2.69.0/24"].messages == 1001


# ---- recording and corrections ------------------------------------------------------------------
def _verdict(action: Action, score: float, symbols: list[tuple[str, float]] = (), **kw: Any) -> Verdict:
    return Verdict(action=action, score=score, symbols=[Symbol(n, s) for n, s in symbols],
                   authentication_results="mx.test.example; none", **kw)


def test_reputation_counts_the_action_without_its_own_symbols() -> None:
    config = load_config(None)          # junk 6, quarantine 12, reject 15
    v = _verdict(Action.JUNK, 7.0, [("REPUTATION_DOMAIN_BAD", 2.5), ("SPF_FAIL", 4.5)])
    assert reputation_action(v, config) is Action.INBOX
    v = _verdict(Action.REJECT, 16.0, [("REPUTATION_DOMAIN_BAD", 2.5), ("X", 13.5)])
    assert reputation_action(v, config) is Action.QUARANTINE
    # forced by DMARC: reputation had no say, the action stands
    v = _verdict(Action.REJECT, 3.0, [("REPUTATION_DOMAIN_BAD", 2.5), ("DMARC_POLICY_REJECT", 0.5)])
    assert reputation_action(v, config) is Action.REJECT
    # shadow mode delivered it, but it meant reject
    v = _verdict(Action.INBOX, 16.0, [("X", 16.0)],
                 add_headers=[("X-Trustmilter-Shadow-Action", "reject")])
    assert reputation_action(v, config) is Action.REJECT


def _recorder(tmp_path: Path, clock: Clock, **extra: Any) -> StateRecorder:
    config = load_config(None, {"state": {"dir": str(tmp_path), **extra},
                                "authserv_id": "mx.test.example"})
    return StateRecorder(config, clock=clock)


def test_recorder_writes_reputation_from_the_verdicts_authentication_results(dns_server, make_engine, tmp_path) -> None:
    """The path the milter takes: evaluate, then record. Identities come from Verdict.identities
    or, until the pipeline fills it, from our own Authentication-Results value."""
    _sender_dns(dns_server)
    verdict = evaluate(ENV, MSG, _engine(make_engine, tmp_path))
    clock = Clock(T0)
    rec = _recorder(tmp_path, clock)
    for _ in range(3):
        assert rec.record(ENV, verdict, subject="news", message_id="<n1@sender-corp.com>")
    rec.record(Envelope(client_ip=IP, auth_user="alice"), verdict)     # our user: no reputation
    assert rec.flush(10)
    rec.close()
    store = ReputationStore(tmp_path / "reputation.sqlite", clock=clock)
    st = store.lookup(["spf:sender-corp.com", "dmarc:sender-corp.com", "org:sender-corp.com",
                       f"ip:{IP}", "net:81.2.69.0/24"])
    assert set(st) == {"spf:sender-corp.com", "dmarc:sender-corp.com", "org:sender-corp.com",
                       f"ip:{IP}", "net:81.2.69.0/24"}
    assert all(s.ham == pytest.approx(3.0) and s.messages == 3 for s in st.values())


def test_recorder_never_blocks_when_the_database_is_locked(tmp_path, caplog) -> None:
    clock = Clock(T0)
    rec = _recorder(tmp_path, clock, busy_timeout_ms=50, queue_size=5)
    rec.record(ENV, _verdict(Action.INBOX, 0.0))
    assert rec.flush(5)
    locker = sqlite3.connect(tmp_path / "reputation.sqlite", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")      # another writer (a CLI, learn) holds the write lock
    locker.execute("UPDATE meta SET value = value WHERE key = 'schema'")
    try:
        with caplog.at_level(logging.WARNING, logger="trustmilter.state"):
            t0 = time.monotonic()
            results = [rec.record(ENV, _verdict(Action.JUNK, 7.0)) for _ in range(50)]
            assert time.monotonic() - t0 < 0.5          # the milter thread never waited
            assert not all(results) and rec.dropped > 0  # a full queue drops, with a log line
            assert any("queue full" in r.getMessage() for r in caplog.records)
            assert rec.flush(30)
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert any("record(s) lost" in r.getMessage() for r in caplog.records)
    # history (another file) got every verdict that was queued
    rows = sqlite3.connect(tmp_path / "history.sqlite").execute("SELECT count(*) FROM history").fetchone()[0]
    assert rows == 1 + sum(results)
    rec.record(ENV, _verdict(Action.JUNK, 7.0))
    assert rec.flush(5)
    rec.close()
    st = ReputationStore(tmp_path / "reputation.sqlite").lookup([f"ip:{IP}"], now=T0)[f"ip:{IP}"]
    assert st.junk == pytest.approx(1.0) and st.ham == pytest.approx(1.0)


def test_learn_corrections_from_history_and_from_authentication_results(tmp_path) -> None:
    clock = Clock(T0)
    rec = _recorder(tmp_path, clock)
    ar = authresults.build("mx.test.example", [
        SPFAuthenticationResult(result="pass", smtp_mailfrom="bounce@sender-corp.com")])
    verdict = Verdict(action=Action.JUNK, score=7.0, symbols=[Symbol("SPF_PASS", -0.5)],
                      authentication_results=ar)
    rec.record(ENV, verdict, message_id="<n1@sender-corp.com>")
    assert rec.flush(5)
    rec.close()
    config = load_config(None, {"state": {"dir": str(tmp_path)}, "authserv_id": "mx.test.example"})
    fb = ReputationFeedback(config)
    fb.store.clock = clock
    store = ReputationStore(tmp_path / "reputation.sqlite", clock=clock)

    c = fb.correct(MSG, "ham")
    assert c.source == "history" and c.previous == "junk" and "spf:sender-corp.com" in c.keys
    s = store.lookup(["spf:sender-corp.com"])["spf:sender-corp.com"]
    assert s.junk == pytest.approx(0.0) and s.ham == pytest.approx(3.0) and s.corrections == 1
    assert fb.correct(MSG, "ham").changed == 0                      # learned twice: counts once
    c = fb.correct(MSG, "spam")                                      # changed their mind
    s = store.lookup(["spf:sender-corp.com"])["spf:sender-corp.com"]
    assert s.ham == pytest.approx(0.0) and s.junk == pytest.approx(3.0) and s.corrections == 2

    # not in history: our own Authentication-Results header in the delivered copy
    delivered = (f"Authentication-Results: {authresults.build('mx.test.example', [DKIMAuthenticationResult(result='pass', header_d='news.example')])}\r\n"
                 f"Authentication-Results: other.example; dkim=pass header.d=bank.example\r\n").encode() + MSG.replace(b"<n1@", b"<n2@")
    c = fb.correct(delivered, "spam")
    assert c.source == "authentication-results" and c.keys == ["dkim:news.example", "org:news.example"]
    assert store.lookup(["dkim:bank.example"]) == {}                 # another server's claim: ignored
    foreign_only = b"Authentication-Results: other.example; dkim=pass header.d=bank.example\r\n" + MSG.replace(b"<n1@", b"<n3@")
    assert fb.correct(foreign_only, "spam").source == "none"
    fb.close()


# ---- the CLI ------------------------------------------------------------------------------------
def test_reputation_cli(tmp_path, capsys) -> None:
    conf = tmp_path / "tm.yaml"
    conf.write_text(f"state:\n  dir: {tmp_path}\n")
    now = time.time()
    store = ReputationStore(tmp_path / "reputation.sqlite")
    store.record([(["dkim:bad.example", "org:bad.example"], "reject", now)] * 7
                 + [(["dkim:good.example"], "ham", now)] * 4 + [([f"ip:{IP}", "net:81.2.69.0/24"], "junk", now)])
    assert cli.main(["reputation", "show", "bad.example", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "dkim:bad.example" in out and "org:bad.example" in out and "bad" in out
    assert cli.main(["reputation", "show", IP, "--json", "--config", str(conf)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["key"] for r in rows] == [f"ip:{IP}", "net:81.2.69.0/24"] and rows[0]["junk"] == pytest.approx(1.0)
    assert cli.main(["reputation", "top", "--kind", "dkim", "--json", "--config", str(conf)]) == 0
    assert [json.loads(x)["key"] for x in capsys.readouterr().out.splitlines()] == ["dkim:bad.example", "dkim:good.example"]
    assert cli.main(["reputation", "top", "--good", "-n", "1", "--config", str(conf)]) == 0
    assert "dkim:good.example" in capsys.readouterr().out
    assert cli.main(["reputation", "forget", "bad.example", "--config", str(conf)]) == 0
    assert "forgot 2 key(s)" in capsys.readouterr().out
    assert cli.main(["reputation", "show", "bad.example", "--config", str(conf)]) == 1
    assert cli.main(["reputation", "show", "nothing.example", "--config", str(tmp_path / "nope.yaml")]) == 2
