"""History: real SQLite files, retention with an injected clock, the recorder's fields, and
``trustmilter history``."""
from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from trustmilter import cli
from trustmilter.config import load_config
from trustmilter.store.history import HistoryEntry, HistoryStore, parse_since
from trustmilter.store.recorder import StateRecorder
from trustmilter.types import Action, Envelope, Symbol, Verdict

DAY = 86400.0
T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _entry(t: float, action: str = "inbox", qid: str = "", score: float = 0.0) -> HistoryEntry:
    return HistoryEntry(time=t, action=action, score=score, queue_id=qid, client_ip="81.2.69.160",
                        mail_from="a@example.org", rcpt=["u@dest.test"],
                        symbols=[["SPF_PASS", -0.5]], timings={"spf": 1.5})


def test_add_and_query_filters(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.db")
    store.add_many([_entry(T0 + i, "reject" if i % 3 == 0 else "inbox", f"Q{i:04d}ABC") for i in range(30)])
    all_rows = store.query(limit=1000)
    assert len(all_rows) == 30 and [e.time for e in all_rows] == sorted(e.time for e in all_rows)
    rejects = store.query(actions=["reject"], limit=1000)
    assert len(rejects) == 10 and all(e.action == "reject" for e in rejects)
    recent = store.query(since=T0 + 25, limit=1000)
    assert [e.queue_id for e in recent] == [f"Q{i:04d}ABC" for i in range(25, 30)]
    window = store.query(since=T0 + 10, until=T0 + 13, limit=1000)
    assert [e.time for e in window] == [T0 + 10, T0 + 11, T0 + 12]
    newest = store.query(limit=3)
    assert [e.time for e in newest] == [T0 + 27, T0 + 28, T0 + 29]      # the newest 3, in order
    one = store.query(queue_id="Q0007ABC")[0]
    assert one.symbols == [["SPF_PASS", -0.5]] and one.timings == {"spf": 1.5} and one.rcpt == ["u@dest.test"]


def test_retention_prunes_in_batches(tmp_path: Path) -> None:
    clock = Clock(T0)
    store = HistoryStore(tmp_path / "h.db", retention_days=30, clock=clock)
    store.add_many([_entry(T0 - 40 * DAY + i) for i in range(10)] + [_entry(T0 - 10 * DAY)])
    assert store.prune(batch=3) == 10
    assert [e.time for e in store.query()] == [T0 - 10 * DAY]
    clock.now = T0 + 25 * DAY
    assert store.prune() == 1 and store.query() == []


def test_parse_since() -> None:
    now = T0
    assert parse_since("1h", now) == now - 3600
    assert parse_since("30m", now) == now - 1800
    assert parse_since("2d", now) == now - 2 * DAY
    assert parse_since("1w", now) == now - 7 * DAY
    import datetime as dt
    assert parse_since("2026-11-01", now) == dt.datetime(2026, 11, 1).timestamp()
    assert parse_since("2026-11-01T10:30", now) == dt.datetime(2026, 11, 1, 10, 30).timestamp()
    with pytest.raises(ValueError):
        parse_since("yesterday", now)


def test_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = HistoryStore(tmp_path / "state" / "h.db")
        store.add_many([_entry(T0)])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    for name in ("h.db", "h.db-wal", "h.db-shm"):
        path = tmp_path / "state" / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    assert store.db.conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _verdict(**kw: Any) -> Verdict:
    base: dict[str, Any] = dict(action=Action.REJECT, score=16.25,
                                symbols=[Symbol("RBL_SPAMHAUS_SBL", 4.0), Symbol("SPF_FAIL", 2.5)],
                                authentication_results="mx.test.example; spf=fail "
                                                       "smtp.mailfrom=a@example.org",
                                timings_ms={"spf": 3.25, "dnsbl": 12.0}, elapsed_ms=15.5,
                                identities={"dkim": ["Signer.Example"], "ip": "81.2.69.160"})
    base.update(kw)
    return Verdict(**base)


def test_recorder_writes_every_verdict(tmp_path: Path) -> None:
    clock = Clock(T0)
    config = load_config(None, {"state": {"dir": str(tmp_path)}})
    rec = StateRecorder(config, clock=clock)
    env = Envelope(client_ip="81.2.69.160", helo="mx.example.org", mail_from="a@example.org",
                   rcpt_to=("u@dest.test", "v@dest.test"), queue_id="4ABC123DEF")
    rec.record(env, _verdict(), message_id=" <m1@example.org> ")
    clock.now += 5
    rec.record(env, _verdict(action=Action.INBOX, add_headers=[("X-Trustmilter-Shadow-Action",
                                                                   "quarantine")]))
    assert rec.flush(5)
    rec.close()
    rows = HistoryStore(tmp_path / "history.sqlite").query()
    assert len(rows) == 2
    first, second = rows
    assert (first.queue_id, first.action, first.score, first.message_id) == (
        "4ABC123DEF", "reject", 16.25, "<m1@example.org>")
    assert first.rcpt == ["u@dest.test", "v@dest.test"] and first.helo == "mx.example.org"
    assert first.identities == {"dkim": ["signer.example"], "ip": "81.2.69.160"}
    assert first.symbols == [["RBL_SPAMHAUS_SBL", 4.0], ["SPF_FAIL", 2.5]]
    assert first.timings == {"spf": 3.25, "dnsbl": 12.0} and first.elapsed_ms == 15.5
    assert (second.action, second.intended, second.time) == ("inbox", "quarantine", T0 + 5)


def test_recorder_prunes_old_history(tmp_path: Path) -> None:
    clock = Clock(T0)
    config = load_config(None, {"state": {"dir": str(tmp_path), "prune_interval_s": 0},
                                "history": {"retention_days": 1}})
    HistoryStore(tmp_path / "history.sqlite").add_many([_entry(T0 - 3 * DAY)] * 5)
    rec = StateRecorder(config, clock=clock)
    rec.record(Envelope(client_ip="81.2.69.160"), _verdict())
    assert rec.flush(5)
    rec.close()
    assert [e.time for e in HistoryStore(tmp_path / "history.sqlite").query()] == [T0]


def test_history_cli(tmp_path: Path, capsys) -> None:
    conf = tmp_path / "tm.yaml"
    conf.write_text(f"state:\n  dir: {tmp_path}\n")
    now = time.time()
    store = HistoryStore(tmp_path / "history.sqlite")
    store.add_many([_entry(now - 7200, "reject", "OLDREJECT1", 20.0), _entry(now - 60, "reject", "NEWREJECT1", 18.5),
                    _entry(now - 30, "inbox", "NEWINBOX01", -1.0)])
    assert cli.main(["history", "--since", "1h", "--action", "reject", "--json", "--config", str(conf)]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["queue_id"] for r in rows] == ["NEWREJECT1"] and rows[0]["score"] == 18.5
    assert cli.main(["history", "--config", str(conf)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "OLDREJECT1" in out[0] and "NEWINBOX01" in out[2]
    assert "SPF_PASS(-0.5)" in out[0] and "ip=81.2.69.160" in out[0]
    day = time.strftime("%Y-%m-%d", time.localtime(now - 7200))
    assert cli.main(["history", "--since", day, "--action", "inbox", "--action", "reject",
                     "--config", str(conf)]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 2
    assert cli.main(["history", "--since", "soon", "--config", str(conf)]) == 2
    empty = tmp_path / "empty.yaml"
    empty.write_text(f"state:\n  dir: {tmp_path / 'none'}\n")
    assert cli.main(["history", "--config", str(empty)]) == 2
    assert "no history recorded yet" in capsys.readouterr().err
