"""The quarantine index (real SQLite, private files) and release/delete through a REAL Postfix hold
queue (tests/integration/postfix.py: a Postfix instance in a temp dir; a header_checks HOLD rule
puts messages on hold the way the milter's quarantine action does)."""
from __future__ import annotations

import json
import os
import pwd
import stat
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from trustmilter import cli
from trustmilter.config import load_config
from trustmilter.store.quarantine import (HELD, RELEASED, PostfixQueue, QuarantineEntry,
                                          QuarantineError, QuarantineIndex, check_queue_id, delete,
                                          release)
from trustmilter.store.recorder import StateRecorder
from trustmilter.types import Action, Envelope, Symbol, Verdict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from postfix import POSTSUPER, PostfixInstance, postfix_available  # noqa: E402

T0 = 1_800_000_000.0


@pytest.mark.parametrize("bad", ["ALL", "all", "-d", "../etc", "", "ABC", "4F2B 21C03A", "4F2B21C03A;rm"])
def test_queue_ids_are_checked_before_any_command(bad: str) -> None:
    with pytest.raises(QuarantineError):
        check_queue_id(bad)
    with pytest.raises(QuarantineError):
        PostfixQueue(postsuper="/bin/false").delete(bad)


def test_good_queue_ids() -> None:
    assert check_queue_id(" 4F2B21C03A ") == "4F2B21C03A"          # short format
    assert check_queue_id("4cNxYz5Wl8z9vXq") == "4cNxYz5Wl8z9vXq"  # long format


def test_index_entries_and_private_files(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        index = QuarantineIndex(tmp_path / "state" / "quarantine.sqlite")
        index.add_many([QuarantineEntry(queue_id=f"AAAA{i}BBBB", time=T0 + i, sender="s@x.example",
                                        recipients=["u@dest.test"], subject=f"s{i}", score=13.0,
                                        symbols=[["X", 13.0]]) for i in range(3)])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state" / "quarantine.sqlite").stat().st_mode) == 0o600
    assert [e.subject for e in index.entries()] == ["s0", "s1", "s2"]
    entry = index.get("AAAA1BBBB")
    assert entry is not None and entry.symbols == [["X", 13.0]] and entry.status == HELD
    index.mark(int(entry.id or 0), RELEASED, "admin")
    assert [e.queue_id for e in index.entries()] == ["AAAA0BBBB", "AAAA2BBBB"]
    assert {e.status for e in index.entries(status=None)} == {HELD, RELEASED}
    # a reused short queue id: the held entry is the one acted on
    index.add_many([QuarantineEntry(queue_id="AAAA1BBBB", time=T0 + 10)])
    assert index.get("AAAA1BBBB").status == HELD


def test_root_hands_new_files_to_the_service_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    nobody = pwd.getpwnam("nobody")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    index = QuarantineIndex(state / "quarantine.sqlite")
    index.add_many([QuarantineEntry(queue_id="AAAA0BBBB", time=T0)])
    for name in ("quarantine.sqlite", "quarantine.sqlite-wal", "quarantine.sqlite-shm"):
        if (state / name).exists():
            assert (state / name).stat().st_uid == nobody.pw_uid, name


def test_recorder_indexes_quarantined_verdicts_only(tmp_path: Path) -> None:
    config = load_config(None, {"state": {"dir": str(tmp_path)}})
    rec = StateRecorder(config)
    env = Envelope(client_ip="81.2.69.160", mail_from="s@x.example", rcpt_to=("u@dest.test",),
                   queue_id="4F2B21C03A")
    held = Verdict(action=Action.QUARANTINE, score=13.5, symbols=[Symbol("DBL_SPAM", 5.0)],
                   authentication_results="mx; none", reason="message scored 13.5")
    shadow = Verdict(action=Action.INBOX, score=13.5, symbols=[], authentication_results="mx; none",
                     add_headers=[("X-Trustmilter-Shadow-Action", "quarantine")])
    rec.record(env, held, subject="=?utf-8?q?Gr=C3=BC=C3=9Fe?= from x", message_id="<q1@x>")
    rec.record(Envelope(queue_id="5A5A5A5A5A"), shadow)
    assert rec.flush(5)
    rec.close()
    entries = QuarantineIndex(tmp_path / "quarantine.sqlite").entries(status=None)
    assert len(entries) == 1
    e = entries[0]
    assert (e.queue_id, e.sender, e.recipients, e.subject, e.score, e.message_id) == (
        "4F2B21C03A", "s@x.example", ["u@dest.test"], "Grüße from x", 13.5, "<q1@x>")
    assert e.symbols == [["DBL_SPAM", 5.0]] and e.reason == "message scored 13.5"


def test_a_failing_postsuper_changes_nothing(tmp_path: Path) -> None:
    index = QuarantineIndex(tmp_path / "q.db")
    index.add_many([QuarantineEntry(queue_id="4F2B21C03A", time=T0)])
    mta = PostfixQueue(config_dir=str(tmp_path / "no-such-postfix"), postsuper=POSTSUPER)
    with pytest.raises(QuarantineError, match="failed"):
        release(index, mta, "4F2B21C03A")
    with pytest.raises(QuarantineError, match="not found"):
        release(index, PostfixQueue(postsuper=str(tmp_path / "missing")), "4F2B21C03A")
    assert index.get("4F2B21C03A").status == HELD


# ---- a real Postfix hold queue ------------------------------------------------------------------
_why_not = postfix_available()


@pytest.fixture(scope="module")
def postfix() -> Iterator[PostfixInstance]:
    if _why_not:
        pytest.skip(_why_not)
    inst = PostfixInstance.create(prefix="tm-q-")
    checks = inst.base / "header_checks"
    checks.write_text("/^Subject: .*HOLDME/ HOLD quarantined for the test\n")
    inst.extra_main["header_checks"] = f"regexp:{checks}"
    inst.write_config()
    inst.start()
    yield inst
    inst.destroy()


def _hold(pf: PostfixInstance, n: int) -> tuple[str, str]:
    """Send a message that Postfix puts on hold; (queue id, Message-ID)."""
    before = set(pf.hold_queue_ids())
    mid = f"<hold{n}.{time.time_ns()}@src.test>"
    raw = (f"From: Spammer <s@src.test>\r\nTo: user@dest.test\r\nSubject: HOLDME {n}\r\n"
           f"Message-ID: {mid}\r\n\r\nbody {n}\r\n").encode()
    with pf.smtp() as smtp:
        smtp.sendmail("s@src.test", ["user@dest.test"], raw)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        new = set(pf.hold_queue_ids()) - before
        if new:
            return new.pop(), mid
        time.sleep(0.05)
    raise TimeoutError(f"not held: {pf.queue()}\n{pf.log_tail()}")


def _hold_queue_ids(self: PostfixInstance) -> list[str]:
    return [m["queue_id"] for m in self.hold_queue()]


PostfixInstance.hold_queue_ids = _hold_queue_ids  # type: ignore[attr-defined]


def _index_verdict(tmp_path: Path, queue_id: str, message_id: str, n: int) -> None:
    config = load_config(None, {"state": {"dir": str(tmp_path)}})
    rec = StateRecorder(config)
    rec.record(Envelope(client_ip="81.2.69.160", mail_from="s@src.test",
                        rcpt_to=("user@dest.test",), queue_id=queue_id),
               Verdict(action=Action.QUARANTINE, score=13.0 + n, symbols=[Symbol("DBL_SPAM", 5.0)],
                       authentication_results="mx; none", reason="held for the test"),
               subject=f"HOLDME {n}", message_id=message_id)
    assert rec.flush(5)
    rec.close()


def _conf(tmp_path: Path, pf: PostfixInstance) -> str:
    conf = tmp_path / "tm.yaml"
    conf.write_text(f"state:\n  dir: {tmp_path}\nquarantine:\n  postfix_config_dir: {pf.config_dir}\n")
    return str(conf)


def test_list_show_release_delete_through_postfix(postfix: PostfixInstance, tmp_path: Path,
                                                  capsys) -> None:
    pf = postfix
    conf = _conf(tmp_path, pf)
    (q1, m1), (q2, m2) = _hold(pf, 1), _hold(pf, 2)
    _index_verdict(tmp_path, q1, m1, 1)
    _index_verdict(tmp_path, q2, m2, 2)

    assert cli.main(["quarantine", "list", "--config", conf]) == 0
    out = capsys.readouterr().out
    assert q1 in out and q2 in out and "HOLDME 1" in out and "<s@src.test>" in out
    assert cli.main(["quarantine", "show", q1, "--json", "--config", conf]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["queue_id"] == q1 and shown["message_id"] == m1 and shown["status"] == "held"

    # release: Postfix delivers it, then (only then) the index says released
    assert cli.main(["quarantine", "release", q1, "--config", conf]) == 0
    assert f"{q1}: released" in capsys.readouterr().out
    delivered = pf.find_delivered(m1)
    assert b"HOLDME 1" in delivered
    index = QuarantineIndex(tmp_path / "quarantine.sqlite")
    assert index.get(q1).status == "released" and index.get(q1).status_by
    assert q1 not in pf.hold_queue_ids()

    # releasing twice is refused, and changes nothing
    assert cli.main(["quarantine", "release", q1, "--config", conf]) == 1
    assert "already released" in capsys.readouterr().err

    # delete: gone from the hold queue, never delivered
    assert cli.main(["quarantine", "delete", q2, "--config", conf]) == 0
    assert f"{q2}: deleted" in capsys.readouterr().out
    assert q2 not in pf.hold_queue_ids() and index.get(q2).status == "deleted"
    time.sleep(0.5)
    assert not [r for r in pf.delivered() if m2.encode() in r]

    assert cli.main(["quarantine", "list", "--config", conf]) == 0
    out = capsys.readouterr().out
    assert q1 not in out and q2 not in out
    assert cli.main(["quarantine", "list", "--all", "--json", "--config", conf]) == 0
    statuses = {json.loads(x)["queue_id"]: json.loads(x)["status"] for x in capsys.readouterr().out.splitlines()}
    assert statuses == {q1: "released", q2: "deleted"}


def test_released_elsewhere_is_not_marked_and_shows_as_gone(postfix: PostfixInstance, tmp_path: Path,
                                                           capsys) -> None:
    pf = postfix
    conf = _conf(tmp_path, pf)
    q3, m3 = _hold(pf, 3)
    _index_verdict(tmp_path, q3, m3, 3)
    pf.release_hold(q3)                         # an admin used postsuper by hand
    pf.find_delivered(m3)
    assert cli.main(["quarantine", "release", q3, "--config", conf]) == 1
    assert "not in the hold queue" in capsys.readouterr().err
    assert cli.main(["quarantine", "delete", q3, "--config", conf]) == 1
    capsys.readouterr()
    assert QuarantineIndex(tmp_path / "quarantine.sqlite").get(q3).status == "held"   # untouched
    assert cli.main(["quarantine", "list", "--mta", "--config", conf]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(q3))
    assert " gone " in line


def test_a_held_message_missing_from_the_index_can_still_be_released(postfix: PostfixInstance,
                                                                    tmp_path: Path, capsys) -> None:
    pf = postfix
    conf = _conf(tmp_path, pf)
    q4, m4 = _hold(pf, 4)
    assert not (tmp_path / "quarantine.sqlite").exists()            # its index entry was lost
    assert cli.main(["quarantine", "list", "--mta", "--json", "--config", conf]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {"queue_id": q4, "status": "unindexed"}.items() <= next(r for r in rows if r["queue_id"] == q4).items()
    assert cli.main(["quarantine", "release", q4, "--config", conf]) == 0
    assert "not in the index" in capsys.readouterr().out
    pf.find_delivered(m4)


def test_release_library_call_marks_only_after_postfix_confirmed(postfix: PostfixInstance,
                                                                 tmp_path: Path) -> None:
    pf = postfix
    q5, m5 = _hold(pf, 5)
    _index_verdict(tmp_path, q5, m5, 5)
    index = QuarantineIndex(tmp_path / "quarantine.sqlite")
    mta = PostfixQueue(config_dir=str(pf.config_dir), postsuper=POSTSUPER)
    assert q5 in mta.held()
    entry = release(index, mta, q5, by="test")
    assert entry.status == "released" and index.get(q5).status == "released"
    pf.find_delivered(m5)
    with pytest.raises(QuarantineError):
        delete(index, mta, q5)
