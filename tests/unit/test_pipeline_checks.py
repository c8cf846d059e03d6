"""The pipeline's scheduling of checks: threaded checks overlap, a failing check becomes
<CHECK>_ERROR, one that overruns the deadline <CHECK>_TIMEOUT, dependants see their
dependencies' results, and the check threads are reused and survive a fork."""
from __future__ import annotations

import os
import threading
import time
import types
from typing import Any, Callable

import pytest

from trustmilter import pipeline
from trustmilter.checks.base import CheckResult
from trustmilter.types import Symbol


class _Ctx:
    def __init__(self) -> None:
        self.results: dict[str, CheckResult] = {}

    def symbol(self, name: str, reason: str = "") -> Symbol:
        return Symbol(name, 0.0, reason)


class _Engine:
    def __init__(self, checks: list[types.ModuleType]) -> None:
        self.checks = checks
        self.disabled: dict[str, str] = {}


def _check(name: str, run: Callable[[Any], CheckResult], *, inline: bool = False,
           depends: tuple[str, ...] = ()) -> types.ModuleType:
    module = types.ModuleType(name)
    module.NAME, module.DEPENDS, module.INLINE, module.run = name, depends, inline, run
    return module


def _run(checks: list[types.ModuleType], deadline: float = 5.0
         ) -> tuple[dict[str, CheckResult], list[Symbol], dict[str, float], _Ctx]:
    ctx, symbols, timings = _Ctx(), [], {}
    done = pipeline._run_checks(ctx, _Engine(checks), timings, symbols, deadline)  # type: ignore[arg-type]
    return done, symbols, timings, ctx


def test_threaded_checks_overlap_and_dependants_see_their_results() -> None:
    def slow(tag: str) -> Callable[[Any], CheckResult]:
        def run(ctx: Any) -> CheckResult:
            time.sleep(0.3)
            return CheckResult(symbols=[Symbol(tag, 1.0)])
        return run
    seen: dict[str, Any] = {}

    def dependant(ctx: Any) -> CheckResult:
        seen.update(ctx.results)
        return CheckResult()
    checks = [_check(f"dns{i}", slow(f"S{i}")) for i in range(6)]
    checks += [_check("local", lambda ctx: CheckResult(), inline=True),
               _check("after", dependant, depends=("dns0", "dns5"))]
    started = time.monotonic()
    done, symbols, timings, _ctx = _run(checks)
    assert time.monotonic() - started < 1.2        # six 0.3 s waits overlapped, not 1.8 s
    assert set(done) == {f"dns{i}" for i in range(6)} | {"local", "after"}
    assert {"dns0", "dns5"} <= set(seen)
    assert seen["dns0"].symbols == [Symbol("S0", 1.0)]
    assert set(timings) == set(done) and not symbols


@pytest.mark.parametrize("inline", [False, True])
def test_a_failing_check_becomes_an_error_symbol(inline: bool, caplog: pytest.LogCaptureFixture) -> None:
    def broken(ctx: Any) -> CheckResult:
        raise ValueError("no such thing")
    done, _symbols, _timings, _ctx = _run([_check("broken", broken, inline=inline),
                                           _check("fine", lambda ctx: CheckResult())])
    assert [s.name for s in done["broken"].symbols] == ["BROKEN_ERROR"]
    assert "ValueError: no such thing" in done["broken"].symbols[0].reason
    assert "fine" in done
    assert "check broken failed" in caplog.text and "no such thing" in caplog.text


def test_a_check_past_the_deadline_times_out_and_the_message_goes_on() -> None:
    release = threading.Event()

    def stuck(ctx: Any) -> CheckResult:
        release.wait(30)
        return CheckResult(symbols=[Symbol("LATE", 1.0)])
    try:
        started = time.monotonic()
        done, symbols, _timings, ctx = _run(
            [_check("stuck", stuck), _check("later", lambda c: CheckResult(), depends=("stuck",)),
             _check("quick", lambda c: CheckResult(symbols=[Symbol("Q", 1.0)]))], deadline=0.2)
        took = time.monotonic() - started
    finally:
        release.set()
    assert 2.2 <= took < 4.0                        # the deadline plus the 2 s grace
    assert [s.name for s in symbols] == ["STUCK_TIMEOUT"]
    assert done["stuck"].symbols == [] and done["later"].symbols == []
    assert done["quick"].symbols == [Symbol("Q", 1.0)]
    time.sleep(0.1)
    assert "stuck" not in ctx.results              # its late result reaches nobody


def test_idle_check_threads_are_reused() -> None:
    threads = pipeline.CheckThreads(limit=64)
    for _round in range(5):
        finished = threading.Semaphore(0)
        for _ in range(8):
            threads.submit(finished.release)
        for _ in range(8):
            assert finished.acquire(timeout=10)
        time.sleep(0.05)                            # let them go back to waiting
    assert threads._threads <= 8


def test_the_thread_ceiling_holds_and_queued_tasks_still_run() -> None:
    threads = pipeline.CheckThreads(limit=2)
    gate, finished = threading.Event(), threading.Semaphore(0)

    def task() -> None:
        gate.wait(10)
        finished.release()
    for _ in range(6):
        threads.submit(task)
    assert threads._threads == 2
    gate.set()
    for _ in range(6):
        assert finished.acquire(timeout=10)


def test_check_threads_work_in_a_forked_child() -> None:
    threads = pipeline.CheckThreads()
    ran = threading.Event()
    threads.submit(ran.set)
    assert ran.wait(10)
    pid = os.fork()
    if pid == 0:     # the child: the parent's thread is not here; a new one must start
        child_ran = threading.Event()
        threads.submit(child_ran.set)
        os._exit(0 if child_ran.wait(10) else 1)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("decision, in_main", [(True, True), (False, False), (None, False)])
def test_runs_inline_decides_per_message(decision: bool | None, in_main: bool) -> None:
    where: list[threading.Thread] = []

    def run(ctx: Any) -> CheckResult:
        where.append(threading.current_thread())
        return CheckResult()
    module = _check("maybe", run)

    def runs_inline(ctx: Any) -> bool:
        if decision is None:
            raise RuntimeError("cannot tell")       # then it runs in a thread, as always
        return decision
    module.runs_inline = runs_inline
    done, _symbols, _timings, _ctx = _run([module])
    assert "maybe" in done and done["maybe"].symbols == []
    assert (where[0] is threading.main_thread()) == in_main


def test_dkim_and_arc_run_inline_only_without_their_headers() -> None:
    from trustmilter.checks import arc, dkim
    from trustmilter.message import ParsedMessage
    plain = ParsedMessage.parse(b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n")
    signed = ParsedMessage.parse(b"dkim-Signature: v=1; d=example.org\r\nFrom: a@example.org\r\n\r\nb\r\n")
    sealed = ParsedMessage.parse(b"ARC-Authentication-Results: i=1; mx.example\r\nFrom: a@example.org\r\n\r\nb\r\n")
    ctx = types.SimpleNamespace
    assert dkim.runs_inline(ctx(message=plain)) and arc.runs_inline(ctx(message=plain))
    assert not dkim.runs_inline(ctx(message=signed)) and arc.runs_inline(ctx(message=signed))
    assert dkim.runs_inline(ctx(message=sealed)) and not arc.runs_inline(ctx(message=sealed))
