"""Faults of the milter's own processes, through a real Postfix: config and rules reloaded
(SIGUSR1) several times while several SMTP sessions send, and a worker process SIGKILLed while
messages are in flight. Every message is accounted for: delivered once with our header, or
answered with a 4xx the sender saw and then delivered when the sender retried.

Faults covered elsewhere (not duplicated here):
- a rule file broken at reload: tests/integration/test_verdicts_postfix.py::
  test_broken_rules_at_reload_keep_the_running_set_under_traffic
- the milter SIGKILLed mid-message and restarted: tests/integration/test_milter_postfix.py::
  test_milter_killed_mid_run_mail_waits_and_arrives_after_restart
"""
from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from dnsserver import TestDNSServer  # noqa: E402 (path set up by conftest)
from postfix import alive, xclient  # noqa: E402
from test_milter_postfix import make_message, our_authres, queue_id_of  # noqa: E402

from .conftest import Harness, build_harness, skip_without_postfix, wait_for

pytestmark = skip_without_postfix()

SESSIONS = 6
PER_SESSION = 8
RELOADS = 3
PTR = "10.2.0.192.in-addr.arpa"


@pytest.fixture(scope="module")
def harness(fault_dns: TestDNSServer) -> Iterator[Harness]:
    def prepare(workdir: Path, config: dict[str, Any]) -> None:
        (workdir / "rules.d").mkdir(parents=True, exist_ok=True)
        config["rules"] = {"local_dir": str(workdir / "rules.d")}

    yield from build_harness(fault_dns, prepare)


def workers(h: Harness) -> set[int]:
    """The worker processes: the forkserver's children (the milter's own children are the
    forkserver and the resource tracker)."""
    def parent(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return -1
    everyone = h.milter.children()
    return {p for p in everyone if parent(p) != h.milter.pid}


def rule_file(h: Harness, generation: int) -> None:
    """A local rule that changes with each reload: the subject tag is the generation."""
    rules = Path(h.base_config["rules"]["local_dir"]) / "fault_reload.yaml"
    rules.write_text(
        f"FAULT_RELOAD_{generation}:\n  description: reload generation {generation}\n"
        "  score: 0.01\n  match:\n    header: {name: X-Fault-Probe, contains: probe}\n")


def test_reload_config_and_rules_under_load_every_message_accounted_for(h: Harness) -> None:
    """SESSIONS concurrent SMTP sessions send PER_SESSION messages each straight to the MX while
    the config and a rule file change and SIGUSR1 is sent RELOADS times. Every message got 250
    and was delivered once with our header; each reload was applied; the new rules score."""
    outcomes: dict[str, Any] = {}
    lock = threading.Lock()
    start = threading.Barrier(SESSIONS + 1)
    reloads_done = threading.Event()

    def session(n: int) -> None:
        start.wait()
        try:
            with h.mx.smtp() as smtp:
                xclient(smtp, "192.0.2.10", "mail.good.test", name="mail.good.test")
                i = 0
                # At least PER_SESSION messages, and on until the last reload is done: every
                # reload happens while sessions are sending.
                while i < PER_SESSION or not reloads_done.is_set():
                    i += 1
                    msgid, raw = make_message("alice@good.test", subject=f"s{n} m{i}",
                                              extra=b"X-Fault-Probe: probe\r\n")
                    try:
                        refused = smtp.sendmail("alice@good.test", ["user@dest.test"], raw)
                        result: Any = ("250", refused)
                    except smtplib.SMTPResponseException as exc:
                        result = (str(exc.smtp_code), exc.smtp_error)
                    with lock:
                        outcomes[msgid] = result
                    time.sleep(0.05)   # spread the session over the reloads
        except Exception as exc:  # noqa: BLE001 - reported below
            with lock:
                outcomes[f"session {n}"] = ("exception", repr(exc))

    threads = [threading.Thread(target=session, args=(n,)) for n in range(SESSIONS)]
    for t in threads:
        t.start()
    since = len(h.milter.log_file_text())
    try:
        start.wait()
        for generation in range(1, RELOADS + 1):
            rule_file(h, generation)
            # Alternate a config value too (HELO score; HELO is valid here, so no verdict moves).
            config = h.config(helo={"scores": {"HELO_NOT_FQDN": 9.0 + generation}})
            h.milter.reload(config)
    finally:
        reloads_done.set()
        for t in threads:
            t.join(120)
    assert not [t for t in threads if t.is_alive()]
    assert h.milter.log_file_text()[since:].count("reloaded ") >= RELOADS
    bad = {k: v for k, v in outcomes.items() if v[0] != "250" or v[1]}
    assert not bad, bad
    ids = [k for k in outcomes if k.startswith("<")]
    assert len(ids) >= SESSIONS * PER_SESSION
    print(f"reload under load: {len(ids)} messages in {SESSIONS} sessions over {RELOADS} "
          "reloads: all 250, all delivered once with our header")
    delivered = {msgid: h.mx.find_delivered(msgid, timeout=30) for msgid in ids}
    for msgid, raw in delivered.items():
        assert len(our_authres(raw)) == 1, msgid
        assert sum(1 for r in h.mx.delivered() if msgid.encode() in r) == 1, msgid
    # Each verdict is in the log, none of them an error; the last rule set scores.
    entries = {e["queue_id"]: e for e in h.milter.messages()}
    for raw in delivered.values():
        entry = entries[queue_id_of(raw)]
        assert entry["action"] == "inbox", entry
    msgid, raw = make_message("alice@good.test", extra=b"X-Fault-Probe: probe\r\n")
    with h.mx.smtp() as smtp:
        xclient(smtp, "192.0.2.10", "mail.good.test", name="mail.good.test")
        smtp.sendmail("alice@good.test", ["user@dest.test"], raw)
    entry = h.milter.message(queue_id_of(h.mx.find_delivered(msgid)))
    assert f"FAULT_RELOAD_{RELOADS}" in entry["symbols"], entry
    h.milter.reload(h.base_config)


def test_worker_killed_pool_recovers_every_message_delivered(h: Harness) -> None:
    """A worker is SIGKILLed while messages are being evaluated (a slow PTR answer keeps them in
    flight). The milter replaces that worker; the message it had is retried on another worker or
    answered 451 4.3.0, which the sender's MTA (the front) retries. All 20 arrive once, with our
    header; the replacement serves mail afterwards."""
    h.dns.on(PTR, "delay:0.3")
    try:
        # The current pool only (workers of a pool retired by an earlier reload exit after
        # their last message).
        size = int(h.base_config["milter"]["workers"])
        wait_for(lambda: len(workers(h)) == size, 30, f"{size} workers",
                 lambda: str(workers(h)))
        before = workers(h)
        since = len(h.milter.log_file_text())
        front_at = len(h.front.log_text())
        ids = []
        with h.front.smtp() as smtp:
            xclient(smtp, "192.0.2.10", "mail.good.test", name="mail.good.test")
            for i in range(20):
                msgid, raw = make_message("alice@good.test", subject=f"kill {i}")
                smtp.sendmail("alice@good.test", ["user@dest.test"], raw)
                ids.append(msgid)
        def arrived() -> int:
            return sum(1 for raw in h.mx.delivered() if any(m.encode() in raw for m in ids))
        wait_for(lambda: arrived() >= 3, 30, "first deliveries", h.detail)
        victim = sorted(before)[0]
        os.kill(victim, signal.SIGKILL)
        assert arrived() < 20, "all delivered before the kill: proves nothing"
        h.milter.wait_log(f"worker {victim} died", timeout=30, since=since)
        got = h.wait_all_delivered(ids, timeout=90)
        for msgid, raw in got.items():
            assert len(our_authres(raw)) == 1, msgid
        # What the sender's MTA saw for the messages in flight (if any): our on_error 451.
        replies = h.deferred_replies(front_at)
        for reply in replies:
            assert reply.startswith("451 4.3.0 "), reply
        errors = [e for e in h.milter.messages() if str(e.get("action", "")).startswith("error")]
        print(f"worker kill: 20 sent, 20 delivered; the front saw {len(replies)} deferral(s); "
              f"milter error verdicts in the log: {len(errors)}")
        assert not alive(victim)
        after = wait_for(lambda: workers(h) - before or None, 30, "a replacement worker")
        assert victim not in after and len(workers(h)) == size
    finally:
        h.dns.behaviour.pop(PTR, None)
    # The new pool serves mail.
    msgid, raw = make_message("alice@good.test")
    with h.mx.smtp() as smtp:
        xclient(smtp, "192.0.2.10", "mail.good.test", name="mail.good.test")
        assert smtp.sendmail("alice@good.test", ["user@dest.test"], raw) == {}
    assert our_authres(h.mx.find_delivered(msgid))
