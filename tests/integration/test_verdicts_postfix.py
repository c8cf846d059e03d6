"""Issue 5 end to end: every action through a real Postfix, recorded by the milter's state
writer, and the admin's commands (`quarantine list/release`, `history`) on that state; a broken
rule file at reload under traffic keeps the running rule set. GTUBE strings trigger each action
(shipped rules in rules/gtube.yaml), so no content model decides these tests."""
from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dnsserver import TestDNSServer  # noqa: E402
from postfix import MilterProcess, PostfixInstance, postfix_available  # noqa: E402
from test_milter_postfix import (make_message, milter_config, our_authres,  # noqa: E402
                                 queue_id_of, rsa_key, send, zone)

pytestmark = [pytest.mark.postfix]
_why_not = postfix_available()
if _why_not:
    pytestmark.append(pytest.mark.skip(reason=_why_not))

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-{}*C.34X"


def body(kind: str) -> bytes:
    return f"Hello,\r\n\r\n{GTUBE.format(kind)}\r\n".encode()


@pytest.fixture(scope="module")
def dns() -> Iterator[TestDNSServer]:
    server = TestDNSServer().start()
    zone(server, rsa_key(1024)[1])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def setup(dns: TestDNSServer) -> Iterator[tuple[PostfixInstance, MilterProcess]]:
    pf = PostfixInstance.create(prefix="tm-verdicts-")
    workdir = pf.base / "milter"
    pf.milters = f"unix:{workdir / 'tm.sock'}"
    pf.write_config()
    config = milter_config(dns, workdir / "trustmilter.log")
    config["quarantine"] = {"postfix_config_dir": str(pf.config_dir)}
    config["rules"] = {"local_dir": str(workdir / "rules.d")}
    (workdir / "rules.d").mkdir(parents=True, exist_ok=True)
    milter = MilterProcess(workdir, config, pf.milters)
    try:
        milter.start()
        pf.start()
        yield pf, milter
    finally:
        milter.stop()
        pf.destroy()


def cli(milter: MilterProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trustmilter.cli", *args, "--config",
                           str(milter.config_path)], capture_output=True, text=True, timeout=60)


def history(milter: MilterProcess, queue_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The verdict the state writer recorded (it writes in batches, off the SMTP path)."""
    end = time.monotonic() + timeout
    while True:
        out = cli(milter, "history", "--queue-id", queue_id, "--json")
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        if rows or time.monotonic() > end:
            assert rows, f"no history for {queue_id}"
            return rows[0]
        time.sleep(0.2)


def test_inbox_is_delivered_and_recorded(setup: tuple[PostfixInstance, MilterProcess]) -> None:
    pf, milter = setup
    msgid, raw = make_message("alice@good.test")
    send(pf, raw, "alice@good.test")
    delivered = pf.find_delivered(msgid)
    assert our_authres(delivered)
    row = history(milter, queue_id_of(delivered))
    assert row["action"] == "inbox" and row["client_ip"] == "192.0.2.10"
    assert "good.test" in json.dumps(row["identities"])


def test_gtube_reject_550_and_recorded(setup: tuple[PostfixInstance, MilterProcess]) -> None:
    pf, milter = setup
    msgid, raw = make_message("alice@good.test", body=body("EMAIL"))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(pf, raw, "alice@good.test")
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.decode().startswith("5.7.1 ")
    entry = next(e for e in reversed(milter.messages()) if e.get("action") == "reject")
    assert "GTUBE" in entry["symbols"]
    row = history(milter, entry["queue_id"])
    assert row["action"] == "reject"


def test_gtube_junk_delivered_flagged(setup: tuple[PostfixInstance, MilterProcess]) -> None:
    pf, _ = setup
    msgid, raw = make_message("alice@good.test", subject="Test", body=body("JUNK"))
    send(pf, raw, "alice@good.test")
    delivered = pf.find_delivered(msgid).decode()
    assert "X-Spam-Flag: YES" in delivered and "Subject: [SPAM] Test" in delivered


def test_gtube_quarantine_listed_and_released(setup: tuple[PostfixInstance, MilterProcess]
                                              ) -> None:
    pf, milter = setup
    msgid, raw = make_message("alice@good.test", subject="Hold me", body=body("QUARANTINE"))
    send(pf, raw, "alice@good.test")
    held: list[dict[str, Any]] = []
    for _ in range(100):
        held = pf.hold_queue()
        if held:
            break
        time.sleep(0.1)
    assert len(held) == 1
    queue_id = held[0]["queue_id"]
    # Listed by the admin's command, from the index the milter wrote.
    for _ in range(50):
        listed = cli(milter, "quarantine", "list", "--json")
        rows = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
        if any(r["queue_id"] == queue_id for r in rows):
            break
        time.sleep(0.2)
    row = next(r for r in rows if r["queue_id"] == queue_id)
    assert row["subject"] == "Hold me" and row["sender"] == "alice@good.test"
    assert any("GTUBE" in str(s) for s in row["symbols"])
    shown = cli(milter, "quarantine", "show", queue_id)
    assert shown.returncode == 0 and queue_id in shown.stdout
    # Released through postsuper -H: delivered as it was, with our header.
    released = cli(milter, "quarantine", "release", queue_id)
    assert released.returncode == 0, released.stderr
    pf.flush()
    assert our_authres(pf.find_delivered(msgid))
    assert not pf.hold_queue()


def test_broken_rules_at_reload_keep_the_running_set_under_traffic(
        setup: tuple[PostfixInstance, MilterProcess]) -> None:
    pf, milter = setup
    rules_dir = Path(milter.config["rules"]["local_dir"])
    stop = threading.Event()
    sent: list[str] = []
    failures: list[BaseException] = []

    def traffic() -> None:
        while not stop.is_set():
            msgid, raw = make_message("alice@good.test")
            try:
                send(pf, raw, "alice@good.test")
                sent.append(msgid)
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        since = len(milter.log_file_text())
        (rules_dir / "broken.yaml").write_text("MY_RULE:\n  score: 1\n  match:\n"
                                               "    header: {name: Subject, regex: '(unclosed'}\n")
        os.kill(milter.pid, signal.SIGUSR1)
        line = milter.wait_log("reload failed", since=since)
        assert "broken.yaml" in line
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(60)
        (rules_dir / "broken.yaml").unlink()
    assert not failures, failures
    assert len(sent) >= 3
    for msgid in sent:
        assert our_authres(pf.find_delivered(msgid))
    # The running rules still work: GTUBE is still refused.
    _, raw = make_message("alice@good.test", body=body("EMAIL"))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(pf, raw, "alice@good.test")
    assert refused.value.smtp_code == 550
