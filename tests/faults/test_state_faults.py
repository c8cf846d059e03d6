"""SQLite state faults through a real Postfix: the state databases (history, reputation, the
quarantine index, Bayes tokens: all in state.dir) locked by a long writer, made read-only, and on
a full disk. state.dir is a small tmpfs of its own so the disk can really fill and the filesystem
really turn read-only (root ignores file modes, so chmod would prove nothing). Mail keeps flowing
with our header; what could not be read or written is named by a symbol or a log line; once the
fault clears, verdicts are recorded again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from dnsserver import TestDNSServer  # noqa: E402 (path set up by conftest)
from postfix import xclient  # noqa: E402
from test_milter_postfix import make_message, our_authres, queue_id_of  # noqa: E402

from .conftest import Harness, build_harness, skip_without_postfix, wait_for

pytestmark = skip_without_postfix()

STATE_FILES = ("history.sqlite", "reputation.sqlite", "quarantine.sqlite", "bayes.sqlite")
TMPFS_MB = 48


def _mount(path: Path) -> str | None:
    """Mount a tmpfs on ``path``; None when done, else why not."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m,mode=0700", "tmpfs",
                          str(path)], capture_output=True, text=True)
    return None if res.returncode == 0 else f"mount -t tmpfs failed: {res.stderr.strip()}"


def _can_mount() -> str | None:
    """None when this machine lets us mount a tmpfs (root with CAP_SYS_ADMIN), else why not.
    A loop-mounted image needs the same privilege, so there is no fallback worth trying."""
    if os.geteuid() != 0:
        return "mounting a tmpfs for state.dir needs root"
    probe = Path(tempfile.mkdtemp(prefix="tm-mntprobe-"))
    try:
        why = _mount(probe)
        if why is None:
            subprocess.run(["umount", str(probe)], capture_output=True)
        return why
    finally:
        probe.rmdir()


@pytest.fixture(scope="module")
def harness(fault_dns: TestDNSServer) -> Iterator[Harness]:
    why = _can_mount()
    if why:
        pytest.skip(f"state faults need their own small filesystem: {why}")

    def prepare(workdir: Path, config: dict[str, Any]) -> None:
        state = workdir / "state"
        problem = _mount(state)
        assert problem is None, problem
        # Short waits for a locked database: the writer gives up on a batch within ~3 s.
        config["state"] = {"dir": str(state), "busy_timeout_ms": 300}

    def cleanup(workdir: Path) -> None:
        subprocess.run(["umount", "-l", str(workdir / "state")], capture_output=True)

    yield from build_harness(fault_dns, prepare, cleanup)


def send_direct(h: Harness, count: int = 1) -> list[str]:
    """good.test mail straight to the MX; returns the Message-IDs. Raises on any refusal (the
    sender must see 250 for every message whatever happens to the state files)."""
    ids = []
    with h.mx.smtp() as smtp:
        xclient(smtp, "192.0.2.10", "mail.good.test", name="mail.good.test")
        for i in range(count):
            msgid, raw = make_message("alice@good.test", subject=f"state fault {i}")
            assert smtp.sendmail("alice@good.test", ["user@dest.test"], raw) == {}
            ids.append(msgid)
    return ids


def delivered_entries(h: Harness, ids: list[str]) -> list[dict[str, Any]]:
    out = []
    for msgid in ids:
        raw = h.mx.find_delivered(msgid, timeout=30)
        assert len(our_authres(raw)) == 1, raw[:600]
        out.append(h.milter.message(queue_id_of(raw)))
    return out


def history_has(h: Harness, queue_id: str) -> bool:
    out = subprocess.run([sys.executable, "-m", "trustmilter.cli", "history", "--queue-id",
                          queue_id, "--json", "--config", str(h.milter.config_path)],
                         capture_output=True, text=True, timeout=60)
    return out.returncode == 0 and queue_id in out.stdout


def assert_recorded_again(h: Harness) -> None:
    """After the fault: a new message's verdict reaches history (the writer recovered)."""
    [msgid] = send_direct(h)
    queue_id = queue_id_of(h.mx.find_delivered(msgid))
    wait_for(lambda: history_has(h, queue_id), 30, f"history records {queue_id}", h.detail)


def state_dir(h: Harness) -> Path:
    return Path(h.base_config["state"]["dir"])


LOCKER = """
import sqlite3, sys
conns = []
for path in sys.argv[1:]:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    # The write lock and an uncommitted write, as a long `trustmilter learn` holds them: in WAL
    # mode readers go on (the checks read a consistent snapshot), every other writer waits.
    conn.execute("BEGIN EXCLUSIVE")
    conn.execute("CREATE TABLE IF NOT EXISTS fault_lock (x)")
    conn.execute("INSERT INTO fault_lock VALUES (1)")
    conns.append(conn)
print("locked", flush=True)
sys.stdin.read()          # held until the test closes our stdin
for conn in conns:
    conn.execute("ROLLBACK")
"""


def test_state_db_locked_by_a_long_writer_mail_flows(h: Harness) -> None:
    """Another process holds the write lock of every state database for longer than the
    writer's busy timeout and retries (a long `learn`): mail is delivered with our header
    meanwhile, the readers (reputation and Bayes checks) are not blocked (WAL), the writer logs
    the records it dropped, and recording resumes once the lock is gone."""
    send_direct(h)   # every state file exists before we lock them
    paths = [str(state_dir(h) / name) for name in STATE_FILES]
    wait_for(lambda: all(os.path.exists(p) for p in paths), 30, "state files created",
             lambda: str(os.listdir(state_dir(h))))
    since = len(h.milter.log_file_text())
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, *paths], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        started = time.monotonic()
        ids = send_direct(h, 3)
        entries = delivered_entries(h, ids)
        # Locks never stall the SMTP path: each verdict took well under the DNS deadline.
        assert time.monotonic() - started < 20
        for entry in entries:
            assert entry["action"] == "inbox", entry
            # WAL: a writer's lock does not stop the checks reading their snapshot.
            assert "REPUTATION_UNAVAILABLE" not in entry["symbols"], entry
            assert "BAYES_ERROR" not in entry["symbols"], entry
        # The writer gave up on its batch after its retries and said so.
        text = h.milter.wait_log("record(s) lost", timeout=30, since=since)
        assert "locked" in text[text.index("record(s) lost"):][:300]
    finally:
        assert locker.stdin is not None
        locker.stdin.close()
        locker.wait(30)
        assert locker.stdout is not None
        locker.stdout.close()
    assert_recorded_again(h)


def remount(h: Harness, mode: str) -> None:
    """Remount the state tmpfs; polls while the killed milter's workers still hold files."""
    def done() -> bool:
        return subprocess.run(["mount", "-o", f"remount,{mode}", str(state_dir(h))],
                              capture_output=True).returncode == 0
    wait_for(done, 30, f"remount {mode}")


def kill_milter(h: Harness) -> None:
    """SIGKILL (a clean stop waits ~5 s for libmilter's listener): the workers follow their
    parent, so every state file gets closed."""
    h.milter.stop(signal.SIGKILL)


def test_state_dir_read_only_mail_flows(h: Harness) -> None:
    """The milter starts on a read-only state filesystem (Linux refuses a remount ro while
    files are open for writing, so the milter is restarted around it, as after a disk error
    made the kernel remount it ro): it starts, mail flows with our header, REPUTATION_UNAVAILABLE
    and log lines say what could not be read or written, and after a restart on a writable disk
    verdicts are recorded again."""
    assert_recorded_again(h)
    kill_milter(h)
    remount(h, "ro")
    try:
        since = len(h.milter.log_file_text())
        h.milter.start()
        ids = send_direct(h, 3)
        entries = delivered_entries(h, ids)
        assert all(e["action"] in ("inbox", "junk") for e in entries), entries
        # Reads may still work (SQLite reads a WAL database on a read-only disk when its -shm
        # file survived); when they do not, the check says so instead of failing the message.
        unread = [e for e in entries if "REPUTATION_UNAVAILABLE" in e["symbols"]]
        if unread:
            assert "reputation: cannot read" in h.milter.log_file_text()[since:]
        # The writer names the database and SQLite's reason.
        text = h.milter.wait_log("record(s) lost", timeout=30, since=since)
        lost = text[text.index("state writer:"):]
        assert "history" in lost and ("readonly" in lost or "unable to open" in lost), lost
    finally:
        kill_milter(h)
        remount(h, "rw")
        h.milter.start()
    assert_recorded_again(h)


def test_state_disk_full_mail_flows(h: Harness) -> None:
    """The state filesystem is full: mail flows, "database or disk is full" is logged, and once
    space is freed verdicts are recorded again."""
    send_direct(h)
    filler = state_dir(h) / "filler"
    since = len(h.milter.log_file_text())
    with open(filler, "wb") as fh:
        chunk = b"\0" * (1 << 20)
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError:
            pass   # ENOSPC: the disk is full
    try:
        # A batch big enough that SQLite needs new pages (a tiny one may fit in free pages).
        ids = send_direct(h, 5)
        entries = delivered_entries(h, ids)
        assert all(e["action"] in ("inbox", "junk") for e in entries), entries
        text = h.milter.wait_log("record(s) lost", timeout=30, since=since)
        assert "full" in text, text[-2000:]
    finally:
        filler.unlink()
    assert_recorded_again(h)
