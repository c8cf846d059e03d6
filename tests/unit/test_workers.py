"""The milter's worker pool with real worker processes: each evaluates over its own socket,
threads queue first come first served, a dead or hung worker is replaced (not the whole pool),
and a retired pool lets messages in flight finish."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from trustmilter.types import Envelope
from trustmilter.workers import (EvaluationTimeout, PoolClosed, WorkerPool, WorkerStartError,
                                 prepare_context)

RAW = b"From: a@good.test\r\nSubject: x\r\n\r\nhi\r\n"
ENV = Envelope(client_ip="192.0.2.10", helo="mail.good.test", mail_from="a@good.test",
               rcpt_to=("u@dest.test",))


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not after {timeout:g}s")


@pytest.fixture
def config(dns_server: Any, tmp_path: Path) -> Path:
    dns_server.add("good.test", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    path = tmp_path / "c.yaml"
    path.write_text(f"authserv_id: mx.test.example\ndns: {{server: '{dns_server.address}', "
                    f"timeout: 0.5, deadline: 3.0, cache_size: 0}}\n"
                    f"state: {{dir: '{tmp_path / 'state'}'}}\n")
    return path


@pytest.fixture
def pool(config: Path) -> Iterator[WorkerPool]:
    pool = WorkerPool(prepare_context(), 2, str(config), {})
    pool.warm_up()
    yield pool
    pool.shutdown()


def test_many_threads_share_two_workers_every_one_gets_its_verdict(pool: WorkerPool) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def one(n: int) -> None:
        env = Envelope(client_ip="192.0.2.10", helo="mail.good.test",
                       mail_from=f"a{n}@good.test", rcpt_to=("u@dest.test",))
        try:
            verdict = pool.evaluate(env, RAW, time.monotonic() + 60)
            results.append(verdict.authentication_results)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len(results) == 24
    # Each thread got the verdict of its own message, not a neighbour's.
    assert {r.split("smtp.mailfrom=")[1].split(";")[0].split()[0] for r in results} == {
        f"a{n}@good.test" for n in range(24)}


def test_a_hung_worker_is_killed_at_the_deadline_and_replaced(pool: WorkerPool) -> None:
    before = set(pool.pids())
    for pid in before:
        os.kill(pid, signal.SIGSTOP)   # both hung: whichever gets the message never answers
    waited: list[float] = []
    t0 = time.monotonic()
    with pytest.raises(EvaluationTimeout):
        pool.evaluate(ENV, RAW, time.monotonic() + 1.0, interval=0.2,
                      on_wait=lambda: waited.append(time.monotonic()))
    assert time.monotonic() - t0 < 5
    assert waited, "the caller was not told to send progress while waiting"
    for pid in before:
        os.kill(pid, signal.SIGCONT)
    # The one that had the message was killed and replaced; the pool is whole again.
    wait_until(lambda: len(set(pool.pids()) - before) == 1 and len(pool.pids()) == 2, 60,
               "a replacement worker")
    verdict = pool.evaluate(ENV, RAW, time.monotonic() + 30)
    assert "spf=pass" in verdict.authentication_results


def test_a_worker_killed_while_idle_is_replaced(pool: WorkerPool) -> None:
    before = pool.pids()
    os.kill(before[0], signal.SIGKILL)
    wait_until(lambda: before[0] not in pool.pids() and len(pool.pids()) == 2, 60,
               "the dead worker replaced")
    for _ in range(4):   # every worker the pool lends out answers
        assert pool.evaluate(ENV, RAW, time.monotonic() + 30).authentication_results


def test_retired_pool_finishes_in_flight_and_sends_waiters_away(config: Path,
                                                                 dns_server: Any) -> None:
    pool = WorkerPool(prepare_context(), 1, str(config), {})
    pool.warm_up()
    dns_server.on("good.test", "delay:1.0")   # the first message stays in flight a while
    outcome: dict[str, Any] = {}

    def first() -> None:
        outcome["first"] = pool.evaluate(ENV, RAW, time.monotonic() + 30)

    def second() -> None:
        try:
            pool.evaluate(ENV, RAW, time.monotonic() + 30)
            outcome["second"] = "evaluated"
        except PoolClosed:
            outcome["second"] = "closed"

    t1 = threading.Thread(target=first)
    t1.start()
    time.sleep(0.3)
    t2 = threading.Thread(target=second)   # no free worker: it waits
    t2.start()
    time.sleep(0.2)
    pool.shutdown(wait=True)
    t1.join(30)
    t2.join(30)
    assert outcome["second"] == "closed"
    assert outcome["first"].authentication_results.startswith("mx.test.example;")
    with pytest.raises(PoolClosed):
        pool.evaluate(ENV, RAW, time.monotonic() + 5)


def test_a_worker_that_cannot_build_its_engine_stops_the_pool_start(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("dns: {server: 'not an address:xx'}\n")
    pool = WorkerPool(prepare_context(), 2, str(config), {})
    with pytest.raises(WorkerStartError):
        pool.warm_up(timeout=60)
    pool.shutdown(wait=False)


def test_workers_read_the_bayes_snapshot_before_they_say_ready(config: Path,
                                                                tmp_path: Path) -> None:
    log_file = tmp_path / "workers.log"
    pool = WorkerPool(prepare_context(), 2, str(config), {},
                      log_setup={"log_file": str(log_file)})
    try:
        pids = pool.warm_up()
        text = log_file.read_text()
        for pid in pids:
            assert f"trustmilter[{pid}]: INFO Bayes snapshot of" in text
    finally:
        pool.shutdown()
    quiet = WorkerPool(prepare_context(), 1, str(config), {"bayes": {"snapshot_at_start": False}},
                       log_setup={"log_file": str(tmp_path / "quiet.log")})
    try:
        quiet.warm_up()
        assert "Bayes snapshot" not in (tmp_path / "quiet.log").read_text()
    finally:
        quiet.shutdown()
