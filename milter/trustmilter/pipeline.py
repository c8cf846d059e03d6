"""``evaluate(envelope, raw) -> Verdict``: the one call the milter, ``scan`` and the benchmarks
share. It is a function of (envelope, raw message, engine), where the engine holds config,
resolver and state, so worker processes can each build one and run it."""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from trustmilter import authresults, checks
from trustmilter.checks.base import CheckContext, CheckResult, ForcedAction
from trustmilter.checks.reputation import identities_from_results
from trustmilter.config import Config, load_config
from trustmilter.dns import Resolver, session_for
from trustmilter.message import ParsedMessage
from trustmilter.received import parse_networks
from trustmilter.scoring import decide
from trustmilter.types import Action, Envelope, Symbol, Verdict

log = logging.getLogger("trustmilter.pipeline")

# Order of the Authentication-Results pieces (readers expect spf/dkim before dmarc).
_AR_ORDER = ("spf", "dkim", "arc", "dmarc", "iprev")


@dataclass
class Engine:
    """Everything ``evaluate`` needs besides the message: built once per process."""

    config: Config
    resolver: Resolver
    checks: tuple[ModuleType, ...] = checks.ALL
    state: dict[str, Any] = field(default_factory=dict)
    trusted_networks: list[Any] = field(default_factory=list)
    trusted_relays: list[Any] = field(default_factory=list)
    disabled: dict[str, str] = field(default_factory=dict)   # check name -> why
    # Re-entrant: a factory may itself ask for another cached piece (reputation -> PSL).
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @classmethod
    def from_config(cls, config: Config | None = None) -> "Engine":
        config = config or load_config()
        engine = cls(config=config, resolver=Resolver.from_config(config.section("dns")))
        engine.trusted_networks = parse_networks(config.data["trusted_networks"])
        engine.trusted_relays = parse_networks(config.data["trusted_relays"])
        for module in engine.checks:
            section = config.data.get(module.NAME, {})
            if isinstance(section, dict) and section.get("enabled", True) is False:
                engine.disabled[module.NAME] = "disabled in config"
            setup = getattr(module, "setup", None)
            if setup is not None and module.NAME not in engine.disabled:
                try:
                    setup(engine)
                except Exception as exc:  # noqa: BLE001 - a bad check config disables it, loudly
                    log.error("check %s disabled: %s", module.NAME, exc)
                    engine.disabled[module.NAME] = str(exc)
        return engine

    def warm_up(self) -> None:
        """Load what a long-lived process wants in memory before its first message (each
        check's optional ``warm_up(engine)``). A failure is logged and the check runs as it
        would without: warming up is never a reason to refuse mail."""
        for module in self.checks:
            warm = getattr(module, "warm_up", None)
            if warm is None or module.NAME in self.disabled:
                continue
            try:
                warm(self)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                log.error("check %s: warm-up failed: %s", module.NAME, exc)

    def cached(self, key: str, factory: Callable[[], Any]) -> Any:
        """Per-engine state built once (a PSL, compiled rules, a model)."""
        with self._lock:
            if key not in self.state:
                self.state[key] = factory()
            return self.state[key]


_default_engine: Engine | None = None
_threads_lock = threading.Lock()


def default_engine() -> Engine:
    global _default_engine
    if _default_engine is None:
        _default_engine = Engine.from_config()
    return _default_engine


class CheckThreads:
    """Threads for the checks that wait on DNS: they overlap the waits. Leaner than a
    ThreadPoolExecutor, which this replaced (a Future with its Condition per check, a waiter
    installed on every running Future at every wait): a task is a callable on one queue, and
    each message reads its results from its own queue. Measured with 9 threaded and 4 inline
    no-op checks: ~290 -> ~160 us of CPU per message (the futex calls of the hand-offs stay,
    ~75 per message). Threads start when no idle one can take a task; the ceiling is high
    so that checks abandoned at a deadline (still waiting on a dead DNS server) cannot starve
    new messages. Daemon threads: such a check must not hold up a process that exits."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._threads = self._idle = self._queued = 0
        self._pid = os.getpid()

    def submit(self, task: Callable[[], None]) -> None:
        with self._lock:
            if self._pid != os.getpid():     # forked: the parent's threads are not here
                self._reset()
            self._queued += 1
            start = self._queued > self._idle and self._threads < self.limit
            if start:
                self._threads += 1
        if start:
            threading.Thread(target=self._run, name=f"check-{self._threads}", daemon=True).start()
        self._tasks.put(task)

    def _run(self) -> None:
        tasks = self._tasks
        while True:
            with self._lock:
                self._idle += 1
            task = tasks.get()
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            task()


_threads: CheckThreads | None = None


def _check_threads() -> CheckThreads:
    # Created lazily so that a milter process can block signals before any thread exists (see
    # PITFALLS: libmilter signals).
    global _threads
    with _threads_lock:
        if _threads is None:
            _threads = CheckThreads()
        return _threads


def evaluate(envelope: Envelope, raw: bytes, engine: Engine | None = None,
             message: ParsedMessage | None = None) -> Verdict:
    """Run every check on one message and decide what happens to it."""
    engine = engine or default_engine()
    started = time.perf_counter()
    config = engine.config
    # Callers that already parsed the message to build the envelope hand it over.
    message = message if message is not None else ParsedMessage.parse(raw)
    deadline = float(config.section("dns")["deadline"])
    session = session_for(engine.resolver, deadline)
    ctx = CheckContext(envelope=envelope, message=message, dns=session, config=config,
                       engine=engine)
    timings: dict[str, float] = {}
    symbols: list[Symbol] = []
    results = _run_checks(ctx, engine, timings, symbols, deadline)

    ar_pieces: list[Any] = []
    forced: list[ForcedAction] = []
    for name in _AR_ORDER:
        if name in results:
            ar_pieces.extend(results[name].authres)
    for name, result in results.items():
        symbols.extend(result.symbols)
        if result.forced is not None:
            forced.append(result.forced)
    symbols.sort(key=lambda s: (-abs(s.score), s.name))
    decision = decide(symbols, forced, config)
    ar_value = authresults.build(config.authserv_id, ar_pieces)
    elapsed = (time.perf_counter() - started) * 1000
    verdict = Verdict(
        action=decision.action, score=decision.score, symbols=symbols,
        authentication_results=ar_value, reason=decision.reason,
        smtp_code=decision.smtp_code, smtp_xcode=decision.smtp_xcode,
        timings_ms=timings, elapsed_ms=elapsed, assumptions=envelope.assumptions,
        identities=identities_from_results(results, envelope), intended=decision.intended,
    )
    verdict.add_headers = _spam_headers(verdict, decision.intended, config)
    if verdict.action is Action.JUNK and config.section("actions")["subject_tag"]:
        verdict.subject_tag = str(config.section("actions")["subject_tag"])
    return verdict


def _run_checks(ctx: CheckContext, engine: Engine, timings: dict[str, float],
                symbols: list[Symbol], deadline: float) -> dict[str, CheckResult]:
    pending = [m for m in engine.checks if m.NAME not in engine.disabled]
    done: dict[str, CheckResult] = {}
    running: dict[str, ModuleType] = {}
    # What the threads finished, in order: (module, result, exception). A check that overruns
    # the deadline posts here after this message is decided; nobody reads it then.
    finished: queue.SimpleQueue[tuple[ModuleType, CheckResult | None, BaseException | None]] = \
        queue.SimpleQueue()
    threads = _check_threads()
    # Checks whose own DNS work is bounded by the session deadline get a little grace on top.
    hard_stop = time.monotonic() + deadline + 2.0

    disabled = engine.disabled

    def ready() -> list[ModuleType]:
        # Called after every finished check: most checks depend on none, and go at the first call.
        out = [m for m in pending
               if not m.DEPENDS or all(dep in done or dep in disabled for dep in m.DEPENDS)]
        for module in out:
            pending.remove(module)
        return out

    def finish(module: ModuleType, result: CheckResult | None, exc: BaseException | None) -> None:
        if exc is not None or result is None:
            # A failing check is a symbol, not a lost message.
            log.error("check %s failed", module.NAME, exc_info=exc)
            result = CheckResult(symbols=[ctx.symbol(
                f"{module.NAME.upper()}_ERROR", f"{type(exc).__name__}: {exc}"[:200])])
        running.pop(module.NAME, None)
        done[module.NAME] = result
        ctx.results[module.NAME] = result

    def in_thread(module: ModuleType) -> Callable[[], None]:
        def task() -> None:
            try:
                result = _timed(module, ctx, timings)
            except BaseException as exc:  # noqa: BLE001 - reported by finish()
                finished.put((module, None, exc))
            else:
                finished.put((module, result, None))
        return task

    inline: list[ModuleType] = []
    while True:
        # Checks that wait on DNS go to threads first, so their waits overlap; checks marked
        # INLINE (local CPU work only: content, rules, SQLite reads) then run in this thread
        # meanwhile, one at a time, which saves a thread hand-off and a wake-up each. Between
        # two, finished threads are collected so that their dependants (DMARC) start at once.
        while running:
            try:
                finish(*finished.get_nowait())
            except queue.Empty:
                break
        for module in ready():
            if getattr(module, "INLINE", False) or _runs_inline(module, ctx):
                inline.append(module)
            else:
                running[module.NAME] = module
                threads.submit(in_thread(module))
        if inline:
            module = inline.pop(0)
            try:
                result = _timed(module, ctx, timings)
            except Exception as exc:  # noqa: BLE001
                finish(module, None, exc)
            else:
                finish(module, result, None)
            continue   # its result may make more checks ready
        if not running:
            break
        try:
            finish(*finished.get(timeout=max(0.0, hard_stop - time.monotonic())))
        except queue.Empty:
            for module in running.values():
                symbols.append(ctx.symbol(f"{module.NAME.upper()}_TIMEOUT",
                                          f"{module.NAME} did not finish within the deadline"))
                log.error("check %s timed out", module.NAME)
                done[module.NAME] = CheckResult()
            running.clear()
            break
    for module in pending:  # dependencies never finished
        done[module.NAME] = CheckResult()
    return done


def _runs_inline(module: ModuleType, ctx: CheckContext) -> bool:
    """A threaded check with nothing to look up in this message runs in this thread: waking a
    check thread costs ~30 us of CPU (measured on a 2-core VM), a no-op check far less."""
    decide = getattr(module, "runs_inline", None)
    if decide is None:
        return False
    try:
        return bool(decide(ctx))
    except Exception:  # noqa: BLE001 - then it runs as always, in a thread
        return False


def _timed(module: ModuleType, ctx: CheckContext, timings: dict[str, float]) -> CheckResult:
    t0 = time.perf_counter()
    try:
        return module.run(ctx)
    finally:
        timings[module.NAME] = round((time.perf_counter() - t0) * 1000, 3)


def _spam_headers(verdict: Verdict, intended: Action, config: Config) -> list[tuple[str, str]]:
    """SpamAssassin-compatible headers, so existing Sieve scripts work unchanged."""
    is_spam = intended is not Action.INBOX
    tests = ",".join(f"{s.name}={s.score:g}" for s in verdict.symbols if s.score != 0)
    status = (f"{'Yes' if is_spam else 'No'}, score={verdict.score:.2f} "
              f"required={float(config.section('actions')['junk']):.1f} tests={tests or 'none'}")
    headers = [("X-Spam-Score", f"{verdict.score:.2f}"), ("X-Spam-Status", status)]
    if verdict.action is Action.JUNK:
        headers.insert(0, ("X-Spam-Flag", "YES"))
    if config.section("actions")["shadow"] and intended is not verdict.action:
        headers.append(("X-Trustmilter-Shadow-Action", intended.value))
    return headers
