"""The worker processes that run ``evaluate`` for the milter.

libmilter runs one thread per SMTP connection and all of them share one GIL, so the milter threads
only gather the message and apply the verdict; DKIM's RSA, tokenizing and model scoring run here,
in a pool of processes sized to the machine. Each worker builds its ``Engine`` once, from the config
path and the command-line overrides, and keeps it for every message it evaluates. Reload builds a
new pool from the re-read config and retires the old one after its messages finish.

Signals (see ../shared/PITFALLS.md, pymilter): the milter blocks HUP/TERM/INT/USR1 in its main
thread before it creates this pool (the pool's helper thread inherits the mask and so never steals
libmilter's signals). The forkserver and the resource tracker are started *before* that block, and
every worker resets its mask and handlers in the initializer: workers are stopped by their pool,
never by a terminal's Ctrl-C.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import logging.handlers
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import select
import signal
import threading
import time
from typing import Any

from trustmilter.config import load_config
from trustmilter.message import ParsedMessage
from trustmilter.pipeline import Engine, evaluate
from trustmilter.received import first_untrusted_hop, in_networks
from trustmilter.types import Envelope, Verdict

log = logging.getLogger("trustmilter.workers")

# Imported once in the forkserver, so each worker forks with them loaded (fast start).
# The heavy libraries (numpy, scikit-learn, skops) too: forked workers then share their pages
# instead of each loading its own copy (~140 MB per process).
PRELOAD = ["trustmilter.workers", "trustmilter.pipeline", "trustmilter.checks",
           "trustmilter.content.model", "sklearn.linear_model", "skops.io"]


def default_size(configured: int) -> int:
    """Workers for ``milter.workers``: the configured number, or for 0 twice the CPUs this process
    may use (evaluate spends part of its time waiting on DNS; two per core keeps them busy)."""
    if configured > 0:
        return configured
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(2, 2 * cpus)


def prepare_context() -> multiprocessing.context.BaseContext:
    """The forkserver context, with the forkserver and resource tracker already running. Call it
    before blocking signals: both inherit the signal mask of the process that starts them."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    multiprocessing.resource_tracker.ensure_running()
    multiprocessing.forkserver.ensure_running()
    return ctx


def setup_logging(log_file: str = "", level: int = logging.INFO) -> None:
    """Log lines to ``log_file`` (reopened when logrotate moves it) or to stderr (the journal under
    systemd). The milter and its workers log the same way, so one file holds everything."""
    handler: logging.Handler
    if log_file:
        handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        "%(asctime)s trustmilter[%(process)d]: %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)


# ---- inside a worker ---------------------------------------------------------------------------
_engine: Engine | None = None
_generation = 0


def _exit_with(parent_pid: int) -> None:
    """Exit when the milter process is gone, however it died. A SIGKILLed milter cannot stop its
    pool, and a worker blocked on the task queue never sees EOF (every worker holds the queue's
    write end), so without this the workers, the forkserver and the resource tracker would live
    on as orphans."""
    try:
        fd = os.pidfd_open(parent_pid)   # readable once that process has exited
    except ProcessLookupError:
        os._exit(70)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        select.select([fd], [], [])
    else:  # pragma: no cover - kernels before 5.3
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                break
    os._exit(70)


def _init_worker(config_path: str | None, overrides: dict[str, Any], generation: int,
                 log_setup: dict[str, Any] | None, parent_pid: int) -> None:
    global _engine, _generation
    # A worker inherits whatever mask its parent had; it must die on TERM from its pool and
    # ignore the terminal's INT/HUP (the milter decides when work stops).
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent_pid,), name="parent-watch",
                     daemon=True).start()
    if log_setup is not None:
        setup_logging(**log_setup)
    _engine = Engine.from_config(load_config(config_path, overrides))
    _generation = generation
    for name, why in _engine.disabled.items():
        if why != "disabled in config":
            log.error("worker %d: check %s disabled: %s", os.getpid(), name, why)


def _ping(delay: float) -> tuple[int, int, dict[str, str]]:
    """Warm-up task: proves this worker built its engine, and says which checks it had to
    disable because their setup failed (a missing model, a broken rule file). Sleeps so that
    concurrent pings spread over the workers instead of all landing on the first one ready."""
    time.sleep(delay)
    assert _engine is not None
    broken = {name: why for name, why in _engine.disabled.items() if why != "disabled in config"}
    return os.getpid(), _generation, broken


def relay_envelope(envelope: Envelope, message: ParsedMessage, engine: Engine) -> Envelope:
    """Behind a trusted relay the SMTP client we saw is that relay: the client for SPF, iprev and
    DNSBLs is the first Received hop added by a host outside trusted_networks + trusted_relays."""
    hop = first_untrusted_hop(message, engine.trusted_networks + engine.trusted_relays)
    relay = envelope.client_ip
    if hop is None or hop.ip is None:
        return dataclasses.replace(
            envelope, client_ip=None, client_name=None,
            assumptions=envelope.assumptions + (
                f"received from trusted relay {relay}; no untrusted Received hop found: "
                "IP checks skipped",))
    return dataclasses.replace(
        envelope, client_ip=hop.ip, client_name=None, helo=hop.helo,
        assumptions=envelope.assumptions + (
            f"received from trusted relay {relay}; client {hop.ip} HELO {hop.helo} taken from "
            "the first untrusted Received header",))


def evaluate_in_worker(envelope: Envelope, raw: bytes) -> Verdict:
    engine = _engine
    if engine is None:  # pragma: no cover - the initializer always runs first
        raise RuntimeError("worker engine not initialised")
    if envelope.client_ip and engine.trusted_relays and in_networks(envelope.client_ip,
                                                                     engine.trusted_relays):
        message = ParsedMessage.parse(raw)
        return evaluate(relay_envelope(envelope, message, engine), raw, engine, message)
    return evaluate(envelope, raw, engine)


# ---- in the milter process ----------------------------------------------------------------------
class WorkerPool:
    """A ProcessPoolExecutor whose workers each hold an Engine built from one config."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, size: int,
                 config_path: str | None, overrides: dict[str, Any], generation: int = 1,
                 log_setup: dict[str, Any] | None = None) -> None:
        self.size = size
        self.generation = generation
        # Checks some worker of this pool had to disable (setup failed): name -> why.
        self.broken_checks: dict[str, str] = {}
        self._executor = cf.ProcessPoolExecutor(
            max_workers=size, mp_context=ctx, initializer=_init_worker,
            initargs=(config_path, overrides, generation, log_setup, os.getpid()))

    def warm_up(self, timeout: float = 120.0) -> list[int]:
        """Start every worker and wait until each has built its engine (models and rules can
        take seconds). Raises ``cf.process.BrokenProcessPool`` when a worker could not (a config
        or model error), TimeoutError when they take longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        pids: set[int] = set()
        while len(pids) < self.size:
            # Each ping keeps its worker busy briefly, so a batch spreads over the free workers;
            # a worker still loading picks up pings of a later batch.
            futures = [self._executor.submit(_ping, 0.2) for _ in range(self.size)]
            for future in futures:
                pid, _gen, broken = future.result(timeout=max(0.1, deadline - time.monotonic()))
                pids.add(pid)
                self.broken_checks.update(broken)
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(pids)} of {self.size} workers ready")
        return sorted(pids)

    def submit(self, envelope: Envelope, raw: bytes) -> "cf.Future[Verdict]":
        return self._executor.submit(evaluate_in_worker, envelope, raw)

    def shutdown(self, wait: bool = True) -> None:
        """Let queued and running messages finish (wait=True), then stop the workers."""
        self._executor.shutdown(wait=wait, cancel_futures=False)


class PoolHolder:
    """The current pool, swapped on reload and rebuilt when a worker died (BrokenProcessPool)."""

    def __init__(self, pool: WorkerPool, factory: Any) -> None:
        self._pool = pool
        self._factory = factory          # generation -> WorkerPool (not yet warmed)
        self._lock = threading.Lock()

    @property
    def pool(self) -> WorkerPool:
        return self._pool

    def swap(self, new: WorkerPool) -> WorkerPool:
        with self._lock:
            old, self._pool = self._pool, new
        return old

    def replace_broken(self, broken: WorkerPool) -> None:
        """A worker died (killed, out of memory): the executor refuses all work from then on.
        Build a new pool once, whichever thread notices first."""
        with self._lock:
            if self._pool is not broken:
                return
            log.error("a worker process died; starting a new pool of %d workers", broken.size)
            self._pool = self._factory(broken.generation + 1)
            # Same config, same checks: what the broken pool could not set up, nor can this one.
            self._pool.broken_checks = dict(broken.broken_checks)
        broken.shutdown(wait=False)


__all__ = ["PRELOAD", "PoolHolder", "WorkerPool", "default_size", "evaluate_in_worker",
           "prepare_context", "relay_envelope", "setup_logging"]
