"""After the milter has acted on a verdict: history, reputation and the quarantine index, written
by ONE thread per process so no SQLite writer ever waits on another in the same process and the
milter never waits on SQLite at all.

``StateRecorder.record(envelope, verdict, subject=..., message_id=...)`` only puts a small job on
a bounded queue and returns at once. The recorder thread writes jobs in batches, one short
transaction per database and batch; a database locked longer than its busy timeout is retried a
few times, then that batch is dropped with an error line (the verdicts were already acted on; the
hold queue keeps a quarantined message whatever happens to its index entry). A full queue drops
the job with a log line instead of blocking the MTA. The same thread prunes old history and
reputation once per ``state.prune_interval_s``.

Reputation counts the verdict the message would have had without reputation's own symbols, so
reputation cannot feed on itself (a bad name would otherwise only ever get worse), and in shadow
mode it counts the intended action, not the inbox delivery shadow mode made of it.
"""
from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from trustmilter.dnslists import ThrottledLog
from trustmilter.message import decode_words
from trustmilter.received import parse_networks
from trustmilter.scoring import threshold_action
from trustmilter.store.db import StateError, is_locked
from trustmilter.store.history import HistoryEntry, HistoryStore
from trustmilter.store.quarantine import QuarantineEntry, QuarantineIndex
from trustmilter.store.reputation import (ReputationStore, bucket_for, identities_from_authres,
                                          identity_keys, key_builder_for_config,
                                          normalise_identities)
from trustmilter.types import Action, Envelope, Verdict

if TYPE_CHECKING:
    from trustmilter.config import Config

log = logging.getLogger("trustmilter.state")
_throttled = ThrottledLog(log)
SHADOW_HEADER = "X-Trustmilter-Shadow-Action"
_RETRIES = (0.2, 0.5, 1.0)


def intended_action(verdict: Verdict) -> Action:
    """What the verdict meant before shadow mode turned it into inbox."""
    intended = getattr(verdict, "intended", None)
    if isinstance(intended, Action):
        return intended
    for name, value in verdict.add_headers:
        if name.lower() == SHADOW_HEADER.lower():
            try:
                return Action(value.strip())
            except ValueError:
                break
    return verdict.action


def reputation_action(verdict: Verdict, config: "Config") -> Action:
    """The action reputation counts: the intended one, minus reputation's own contribution
    when the action came from the score (a forced action, from DMARC or a rule, stands)."""
    intended = intended_action(verdict)
    own = sum(s.score for s in verdict.symbols if s.name.startswith("REPUTATION_"))
    if own == 0 or intended is not threshold_action(verdict.score, config):
        return intended
    return threshold_action(verdict.score - own, config)


@dataclass
class Job:
    """Everything the writer needs, copied out of the milter's objects."""

    history: HistoryEntry
    reputation_keys: list[str] = field(default_factory=list)
    reputation_bucket: str | None = None
    quarantine: QuarantineEntry | None = None


class StateRecorder:
    """Build once per milter process (after signals are blocked: the thread inherits the mask);
    ``record`` after acting on each verdict; ``close`` at shutdown."""

    def __init__(self, config: "Config", *, clock: Callable[[], float] = time.time,
                 org_domain: Callable[[str], str | None] | None = None) -> None:
        self.config = config
        self.clock = clock
        state = config.section("state")
        self.history = (HistoryStore.from_config(config, clock=clock)
                        if config.section("history")["enabled"] else None)
        self.reputation = (ReputationStore.from_config(config, clock=clock)
                           if config.section("reputation")["enabled"] else None)
        self.quarantine = QuarantineIndex.from_config(config, clock=clock)
        self.batch_size = int(state["batch_size"])
        self.prune_interval = float(state["prune_interval_s"])
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=int(state["queue_size"]))
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._idle = threading.Condition()
        self._pending = 0
        self._last_prune = 0.0
        self.dropped = 0
        self.written = 0
        if org_domain is None:
            self._keys = key_builder_for_config(config)
        else:
            from trustmilter.store.reputation import skip_ip_for
            skip = skip_ip_for(parse_networks(config.data["trusted_networks"])
                               + parse_networks(config.data["trusted_relays"]))
            self._keys = lambda ids: identity_keys(ids, org_domain, skip)

    # ---- the milter side (never blocks) -----------------------------------------------------
    def job_for(self, envelope: Envelope, verdict: Verdict, *, subject: str = "",
                message_id: str = "", when: float | None = None) -> Job:
        when = self.clock() if when is None else when
        intended = intended_action(verdict)
        # The verdict's own Authentication-Results value was built by the pipeline from the
        # check outcomes: the same facts as Verdict.identities, for pipelines not filling it.
        identities = normalise_identities(verdict.identities) if verdict.identities else \
            identities_from_authres(verdict.authentication_results)
        if envelope.client_ip and "ip" not in identities:
            identities = normalise_identities({**identities, "ip": envelope.client_ip})
        symbols = [[s.name, round(s.score, 3)] for s in verdict.symbols]
        subject = decode_words(subject or "")
        entry = HistoryEntry(
            time=when, action=verdict.action.value, score=round(verdict.score, 3),
            queue_id=envelope.queue_id or "", message_id=(message_id or "").strip(),
            client_ip=envelope.client_ip or "", helo=envelope.helo or "",
            mail_from=envelope.mail_from, rcpt=list(envelope.rcpt_to), identities=identities,
            intended=intended.value, symbols=symbols, timings=dict(verdict.timings_ms),
            elapsed_ms=round(verdict.elapsed_ms, 2))
        job = Job(history=entry)
        if not envelope.auth_user:
            job.reputation_bucket = bucket_for(reputation_action(verdict, self.config))
            if job.reputation_bucket is not None:
                job.reputation_keys = self._keys(identities)
        if verdict.action is Action.QUARANTINE:
            if not envelope.queue_id:
                log.warning("quarantined message without a queue id ({i} macro): indexed "
                            "without one; find it with postqueue -p")
            job.quarantine = QuarantineEntry(
                queue_id=envelope.queue_id or "", time=when, sender=envelope.mail_from,
                recipients=list(envelope.rcpt_to), subject=subject[:500],
                score=round(verdict.score, 3), symbols=symbols, reason=verdict.reason[:500],
                message_id=entry.message_id, client_ip=entry.client_ip)
        return job

    def record(self, envelope: Envelope, verdict: Verdict, *, subject: str = "",
               message_id: str = "", when: float | None = None) -> bool:
        """Queue the verdict's records; False when the queue was full and they were dropped."""
        try:
            job = self.job_for(envelope, verdict, subject=subject, message_id=message_id,
                               when=when)
        except Exception:  # noqa: BLE001 - recording must never break the milter
            log.exception("could not prepare the state records of queue id %s", envelope.queue_id)
            return False
        self._ensure_thread()
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
            self.dropped += 1
            _throttled.warning("queue-full", "state writer queue full (%d): verdict of queue id %s "
                               "not recorded (disk or lock trouble?)", self._queue.maxsize,
                               envelope.queue_id)
            return False
        return True

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="state-writer",
                                                daemon=True)
                self._thread.start()

    def start(self) -> None:
        self._ensure_thread()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        for store in (self.history, self.reputation, self.quarantine):
            if store is not None:
                store.close()

    # ---- the writer thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < self.batch_size:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                self.write(batch)
                self._maybe_prune()
            except Exception:  # noqa: BLE001 - the writer thread must survive anything
                log.exception("state writer: batch of %d lost", len(batch))
            finally:
                with self._idle:
                    self._pending -= len(batch)
                    self._idle.notify_all()
            if stop:
                return

    def write(self, batch: list[Job]) -> None:
        """Write a batch now (the thread's work; callable directly when no thread is wanted)."""
        if self.quarantine is not None:
            held = [j.quarantine for j in batch if j.quarantine is not None]
            if held:
                # First: an index entry is what an admin releases a held message by.
                self._retrying("quarantine index", lambda: self.quarantine.add_many(held), len(held))
        if self.history is not None:
            self._retrying("history", lambda: self.history.add_many(j.history for j in batch),
                           len(batch))
        if self.reputation is not None:
            items = [(j.reputation_keys, j.reputation_bucket, j.history.time) for j in batch
                     if j.reputation_bucket and j.reputation_keys]
            if items:
                self._retrying("reputation", lambda: self.reputation.record(items), len(items))
        self.written += len(batch)

    def _retrying(self, what: str, fn: Callable[[], Any], count: int) -> None:
        for attempt, pause in enumerate((*_RETRIES, None)):
            try:
                fn()
                return
            except (sqlite3.Error, StateError) as exc:
                if pause is not None and (is_locked(exc) or isinstance(exc, StateError)):
                    time.sleep(pause)
                    continue
                log.error("state writer: %s: %d record(s) lost after %d attempt(s): %s", what,
                          count, attempt + 1, exc)
                return

    def _maybe_prune(self) -> None:
        now = self.clock()
        if now - self._last_prune < self.prune_interval:
            return
        self._last_prune = now
        for name, store in (("history", self.history), ("reputation", self.reputation),
                            ("quarantine index", self.quarantine)):
            if store is None:
                continue
            try:
                removed = store.prune(now)
                if removed:
                    log.info("pruned %d old %s record(s)", removed, name)
            except (sqlite3.Error, StateError) as exc:
                log.warning("pruning %s failed (retried later): %s", name, exc)
