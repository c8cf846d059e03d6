"""The worker processes that run ``evaluate`` for the milter.

libmilter runs one thread per SMTP connection and all of them share one GIL, so the milter threads
only gather the message and apply the verdict; DKIM's RSA, tokenizing and model scoring run here,
in a pool of processes sized to the machine. Each worker builds its ``Engine`` once, from the config
path and the command-line overrides, and keeps it for every message it evaluates. Reload builds a
new pool from the re-read config and retires the old one after its messages finish.

Each worker has its own socket pair with the milter, and a milter thread that holds a worker
talks to it directly: one write of (envelope, message), one read of the verdict, waiting in the
kernel with the GIL released. concurrent.futures' process pool routes every task through a
feeder thread, a manager thread and futures, which cost the milter process ~2 ms of CPU per
message (measured: its threads held the GIL ~17% of the time at 73 msgs/s). A direct socket
also lets the pool replace one dead or hung worker instead of the whole pool: a worker that
overruns ``eval_timeout`` is killed and replaced, so it cannot hold a slot for ever.

Signals (see ../shared/PITFALLS.md, pymilter): the milter blocks HUP/TERM/INT/USR1 in its main
thread before it creates this pool (the pool's helper thread inherits the mask and so never steals
libmilter's signals). The forkserver and the resource tracker are started *before* that block, and
every worker resets its mask and handlers in the initializer: workers are stopped by their pool,
never by a terminal's Ctrl-C.
"""
from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import logging.handlers
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time
from typing import Any, Callable

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
    # What the forkserver preloaded is shared with it page by page until written to. A garbage
    # collection writes to every object it visits, so frozen objects (never collected) stay
    # shared: measured, a worker's PSS after 1,208 corpus messages 98 -> 73 MB (4 workers: the
    # milter's total 517 -> 393 MB), and flat after 3 such runs (~85 MB).
    gc.freeze()
    # A worker inherits whatever mask its parent had; it must die on TERM and ignore the
    # terminal's INT/HUP (the milter decides when work stops: it closes the worker's socket).
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
    _engine.warm_up()   # before "ready": the first messages get the fast paths too
    _generation = generation
    # The engine (rules, model, public suffix list) lives as long as the worker: keep the
    # collector from walking it again at every full collection.
    gc.freeze()
    for name, why in _engine.disabled.items():
        if why != "disabled in config":
            log.error("worker %d: check %s disabled: %s", os.getpid(), name, why)


# Frames on a worker's socket. Milter -> worker: lengths of the pickled envelope and of the raw
# message, then both. Worker -> milter: the length of a pickled reply, then the reply:
# ("ready", pid, generation, broken checks) once, then ("ok", Verdict) or ("error", text).
_REQUEST = struct.Struct(">IQ")
_REPLY = struct.Struct(">I")


def _send_reply(sock: socket.socket, reply: tuple[Any, ...]) -> None:
    data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_REPLY.pack(len(data)) + data)


def _worker_main(sock: socket.socket, config_path: str | None, overrides: dict[str, Any],
                 generation: int, log_setup: dict[str, Any] | None, parent_pid: int) -> None:
    """A worker's life: build the engine, say ready, then evaluate what arrives until the milter
    closes the socket."""
    try:
        _init_worker(config_path, overrides, generation, log_setup, parent_pid)
    except Exception as exc:  # noqa: BLE001 - reported to the milter, which refuses to start
        try:
            _send_reply(sock, ("failed", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass   # the milter gave up on this pool already
        return
    assert _engine is not None
    broken = {name: why for name, why in _engine.disabled.items() if why != "disabled in config"}
    _send_reply(sock, ("ready", os.getpid(), _generation, broken))
    # Blocking reads through a buffer: read(n) fills one bytes object of the message's size.
    rfile = sock.makefile("rb", buffering=1 << 16)
    while True:
        header = rfile.read(_REQUEST.size)
        if len(header) < _REQUEST.size:
            return   # the milter closed the socket: retire
        env_len, raw_len = _REQUEST.unpack(header)
        envelope = pickle.loads(rfile.read(env_len))
        raw = rfile.read(raw_len)
        if len(raw) < raw_len:
            return
        try:
            reply: tuple[Any, ...] = ("ok", evaluate_in_worker(envelope, raw))
        except Exception as exc:  # noqa: BLE001 - a bug in evaluate must not kill the worker
            log.exception("queue_id=%s: evaluate failed", getattr(envelope, "queue_id", None))
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            _send_reply(sock, reply)
        except OSError:
            return   # the milter stopped waiting (deadline, retired pool): retire


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
class PoolClosed(RuntimeError):
    """The pool was retired (a reload swapped it): ask the current one."""


class WorkerLost(RuntimeError):
    """The worker died while it had the message (killed, out of memory): try another."""


class EvaluationTimeout(RuntimeError):
    """No verdict before the deadline (the worker was killed and is being replaced)."""


class EvaluationFailed(RuntimeError):
    """``evaluate`` raised in the worker (a bug): the text names the exception."""


class WorkerStartError(RuntimeError):
    """A worker could not build its engine (config or model error) or did not start in time."""


@dataclasses.dataclass(eq=False)   # identity: workers live in sets
class _Worker:
    process: Any                 # multiprocessing Process (started by the forkserver)
    sock: socket.socket          # our end of the worker's socket pair
    pid: int = 0
    timeout: float | None = None   # the socket's current timeout (set only when it changes)

    def settimeout(self, value: float) -> None:
        if value != self.timeout:
            self.sock.settimeout(value)
            self.timeout = value


class _Waiter:
    """A thread waiting for a free worker: the releasing thread hands the worker over and
    releases ``lock`` (first come, first served, which keeps tail latency down under load)."""

    __slots__ = ("lock", "worker")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.worker: _Worker | None = None


class WorkerPool:
    """``size`` worker processes, each holding an Engine built from one config."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, size: int,
                 config_path: str | None, overrides: dict[str, Any], generation: int = 1,
                 log_setup: dict[str, Any] | None = None) -> None:
        self.size = size
        self.generation = generation
        # Checks some worker of this pool had to disable (setup failed): name -> why.
        self.broken_checks: dict[str, str] = {}
        self._ctx = ctx
        self._args = (config_path, overrides, generation, log_setup, os.getpid())
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._workers: set[_Worker] = set()      # every live worker, idle or busy
        self._busy = 0
        self._closing = False
        self._drained = threading.Condition(self._lock)
        # The monitor thread notices a worker that dies while idle (a busy one is noticed by
        # the thread talking to it); a byte on this pipe makes it re-read the set of workers.
        self._wake_r, self._wake_w = os.pipe()
        self._monitor: threading.Thread | None = None

    # ----- starting workers -------------------------------------------------------------------
    def _start_process(self) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        process = self._ctx.Process(target=_worker_main, args=(theirs,) + self._args,
                                    name=f"trustmilter-worker-{self.generation}", daemon=True)
        process.start()
        theirs.close()
        return _Worker(process=process, sock=ours)

    def _await_ready(self, worker: _Worker, deadline: float) -> None:
        """Read the worker's first frame: ready (with its pid and broken checks) or failed."""
        try:
            reply = _read_reply(worker, deadline, 1.0, lambda: None)
        except (WorkerLost, EvaluationTimeout) as exc:
            self._discard(worker)
            raise WorkerStartError(f"a worker did not start: {exc}") from None
        if reply[0] != "ready":
            self._discard(worker)
            raise WorkerStartError(f"a worker could not build its engine: {reply[1]}")
        worker.pid = int(reply[1])
        self.broken_checks.update(reply[3])

    def warm_up(self, timeout: float = 120.0) -> list[int]:
        """Start every worker and wait until each has built its engine (models and rules can
        take seconds). Raises WorkerStartError when one could not (a config or model error) or
        when they take longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        started = [self._start_process() for _ in range(self.size)]
        try:
            for worker in started:
                self._await_ready(worker, deadline)
        except WorkerStartError:
            for worker in started:
                self._discard(worker)
            raise
        with self._lock:
            self._workers.update(started)
            self._idle.extend(started)
        self._monitor = threading.Thread(target=self._watch, name="worker-monitor", daemon=True)
        self._monitor.start()
        return sorted(w.pid for w in started)

    def _wake(self) -> None:
        with self._lock:    # never after shutdown closed the pipe (its fd may be reused)
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")

    def _watch(self) -> None:
        """Replace workers that die while idle: without this a dead idle worker would only be
        found when a message is sent to it, and the pool would run short meanwhile."""
        from multiprocessing.connection import wait
        while True:
            with self._lock:
                if self._closing:
                    break
                sentinels = {w.process.sentinel: w for w in self._workers}
            ready = wait(list(sentinels) + [self._wake_r])
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            for sentinel in ready:
                worker = sentinels.get(sentinel)  # type: ignore[call-overload]
                if worker is None:
                    continue
                with self._lock:
                    idle = worker in self._idle
                    if idle:
                        self._idle.remove(worker)
                        self._workers.discard(worker)
                    replace = idle and not self._closing
                if idle:
                    log.error("worker %d died while idle (exit code %s)", worker.pid,
                              worker.process.exitcode)
                    self._discard(worker)
                    if replace:
                        self._replace()
        os.close(self._wake_r)

    def _replace(self) -> None:
        """Start a worker in place of one that died or was killed (in a thread of its own: the
        message that found the dead worker goes on with another one meanwhile)."""
        def start() -> None:
            try:
                worker = self._start_process()
                self._await_ready(worker, time.monotonic() + 120.0)
            except Exception as exc:  # noqa: BLE001 - the pool runs on with one worker less
                log.error("could not replace a worker: %s: %s", type(exc).__name__, exc)
                return
            with self._lock:
                closing = self._closing
                if not closing:
                    self._workers.add(worker)
            if closing:
                self._discard(worker)
            else:
                log.info("worker %d started (replacement)", worker.pid)
                self._wake()
                self._release(worker, was_busy=False)
        threading.Thread(target=start, name="worker-replace", daemon=True).start()

    def _discard(self, worker: _Worker, kill: bool = False) -> None:
        """Close a worker's socket (it exits on end of file); SIGKILL it when it is hung."""
        with self._lock:
            self._workers.discard(worker)
        if kill and worker.process.pid:
            try:
                os.kill(worker.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            worker.sock.close()
        except OSError:
            pass

    # ----- lending workers to milter threads ---------------------------------------------------
    def _acquire(self, deadline: float, interval: float, on_wait: Callable[[], None]) -> _Worker:
        with self._lock:
            if self._closing:
                raise PoolClosed("pool retired")
            if self._idle and not self._waiters:
                self._busy += 1
                return self._idle.pop()
            waiter = _Waiter()
            self._waiters.append(waiter)
        while True:
            left = deadline - time.monotonic()
            if left > 0 and waiter.lock.acquire(timeout=min(interval, left)):
                break
            with self._lock:
                if waiter.worker is not None:      # handed over just now
                    break
                if left <= 0 or self._closing:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
                    if self._closing:
                        raise PoolClosed("pool retired")
                    raise EvaluationTimeout("no worker became free in time")
            on_wait()
        if waiter.worker is None:     # woken by shutdown
            raise PoolClosed("pool retired")
        return waiter.worker

    def _release(self, worker: _Worker, was_busy: bool = True) -> None:
        """Give a worker to the longest-waiting thread, or back to the idle list. ``was_busy``:
        the worker was lent (counted in ``_busy``), not a new replacement."""
        with self._lock:
            if worker in self._workers and not self._closing:
                if self._waiters:
                    waiter = self._waiters.popleft()
                    waiter.worker = worker
                    waiter.lock.release()
                    if not was_busy:
                        self._busy += 1
                    return
                self._idle.append(worker)
                if was_busy:
                    self._busy -= 1
                    self._drained.notify_all()
                return
            if was_busy:
                self._busy -= 1
                self._drained.notify_all()
        self._discard(worker)    # retired pool: the worker exits

    def evaluate(self, envelope: Envelope, raw: bytes, deadline: float,
                 interval: float = 10.0, on_wait: Callable[[], None] = lambda: None) -> Verdict:
        """The verdict of a worker, by ``deadline`` (time.monotonic()). ``on_wait`` is called
        every ``interval`` seconds while waiting (the milter tells the MTA it is alive).
        Raises PoolClosed, WorkerLost, EvaluationTimeout or EvaluationFailed."""
        env = pickle.dumps(envelope, protocol=pickle.HIGHEST_PROTOCOL)
        header = _REQUEST.pack(len(env), len(raw))
        worker = self._acquire(deadline, interval, on_wait)
        healthy = False
        try:
            worker.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                if len(raw) <= 1 << 16:
                    worker.sock.sendall(header + env + raw)   # one write for most mail
                else:
                    worker.sock.sendall(header + env)
                    worker.sock.sendall(raw)
            except socket.timeout:
                raise EvaluationTimeout("the worker did not take the message in time") from None
            except OSError as exc:
                raise WorkerLost(f"worker {worker.pid}: {exc}") from None
            reply = _read_reply(worker, deadline, interval, on_wait)
            healthy = True
        except WorkerLost:
            self._lose(worker, hung=False)
            raise
        finally:
            if healthy:
                self._release(worker)
            elif worker in self._workers:    # the deadline passed (or a bug): kill it
                self._lose(worker, hung=True)
        if reply[0] == "ok":
            verdict: Verdict = reply[1]
            return verdict
        raise EvaluationFailed(str(reply[1]))

    def _lose(self, worker: _Worker, hung: bool) -> None:
        """A worker that died, or is hung past the deadline: kill it, start another."""
        with self._lock:
            self._busy -= 1
            self._drained.notify_all()
            replace = not self._closing and worker in self._workers
        if hung:
            log.error("worker %d: no verdict by the deadline; killing it", worker.pid)
        else:
            worker.process.join(1.0)     # its exit code, for the log
            log.error("worker %d died (exit code %s)", worker.pid, worker.process.exitcode)
        self._discard(worker, kill=True)
        if replace:
            self._replace()

    # ----- stopping ---------------------------------------------------------------------------
    def pids(self) -> list[int]:
        with self._lock:
            return sorted(w.pid for w in self._workers)

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Retire the pool: threads waiting for a worker get PoolClosed (and ask the new pool);
        with ``wait``, messages being evaluated finish first. Workers exit when their socket
        closes."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            waiters, self._waiters = list(self._waiters), collections.deque()
            idle, self._idle = self._idle, []
        if self._monitor is not None:
            self._wake()                   # the monitor sees _closing and ends
        for waiter in waiters:
            waiter.lock.release()          # they see _closing and raise PoolClosed
        for worker in idle:
            self._discard(worker)
        if wait:
            with self._lock:
                self._drained.wait_for(lambda: self._busy <= 0, timeout)
        with self._lock:
            rest = list(self._workers)
        for worker in rest if wait else []:
            self._discard(worker)
        for worker in idle + (rest if wait else []):
            worker.process.join(5)
            if worker.process.is_alive():
                worker.process.kill()
        if self._monitor is not None:
            self._monitor.join(5)      # it closes the pipe's read end
        else:
            os.close(self._wake_r)
        with self._lock:
            os.close(self._wake_w)
            self._wake_w = -1


def _read_reply(worker: _Worker, deadline: float, interval: float,
                on_wait: Callable[[], None]) -> tuple[Any, ...]:
    """One reply frame from a worker, calling ``on_wait`` every ``interval`` seconds."""
    buf = bytearray()
    need = _REPLY.size
    length: int | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise EvaluationTimeout("no verdict by the deadline")
        worker.settimeout(min(interval, left))
        try:
            chunk = worker.sock.recv(max(1 << 16, need - len(buf)))
        except socket.timeout:
            on_wait()
            continue
        except OSError as exc:
            raise WorkerLost(f"worker {worker.pid}: {exc}") from None
        if not chunk:
            raise WorkerLost(f"worker {worker.pid} closed its socket")
        buf += chunk
        if length is None and len(buf) >= _REPLY.size:
            (length,) = _REPLY.unpack_from(buf)
            need = _REPLY.size + length
        if length is not None and len(buf) >= need:
            reply: tuple[Any, ...] = pickle.loads(memoryview(buf)[_REPLY.size:need])
            return reply


class PoolHolder:
    """The current pool, swapped on reload."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool
        self._lock = threading.Lock()

    @property
    def pool(self) -> WorkerPool:
        return self._pool

    def swap(self, new: WorkerPool) -> WorkerPool:
        with self._lock:
            old, self._pool = self._pool, new
        return old


__all__ = ["EvaluationFailed", "EvaluationTimeout", "PRELOAD", "PoolClosed", "PoolHolder",
           "WorkerLost", "WorkerPool", "WorkerStartError", "default_size", "evaluate_in_worker",
           "prepare_context", "relay_envelope", "setup_logging"]
