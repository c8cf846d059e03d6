"""The Bayes token store in SQLite (through sqlite-utils for the schema): WAL so the milter reads
while ``trustmilter learn`` writes, a busy timeout so a held lock costs an error symbol rather
than a stalled milter, one connection per thread and process (SQLite connections must not cross
threads or a fork), and one query per message for its tokens (their list as one JSON
parameter) until the snapshot below answers.

Every transaction that changes counts bumps ``generation`` in ``meta``; a reader re-reads
generation and totals at most once every ``recheck_seconds`` (the totals always were that
stale) and its snapshot answers only while both are what it was read with. So a ``learn``
committed in another process is seen by every reader from at most ``recheck_seconds`` after its
commit on; one in this process at once. A writer that does not know ``generation`` (an older
trustmilter) still changes the totals, which retires the snapshot too. No schema change: a
database without a ``generation`` row reads as generation 0 and gets the row with its first
learn.

The snapshot: after ``snapshot_after`` messages scored from SQLite (or before the first, for
the milter's workers: ``load_snapshot``), a process reads every token once (one read
transaction, with the totals and generation it belongs to) into numpy arrays: the tokens'
64-bit ``hash()`` sorted, and the number of each one's (spam, ham) count pair (12 bytes a
token: 4.8 MB for the shipped 397k tokens, which share 3.5k pairs; 2 MB more for the bucket
index), and looks a message's
tokens up through a bucket index instead of a query; Bayes then scores by pair
(``pair_rows``). Lookup and scoring: 0.15 instead of ~1.0 ms CPU per message of the corpus test
split, after ~0.5-0.8 s to read 400k tokens. It answers only while (nspam, nham, generation)
is what it was read with; after a change the SQLite path answers again and, after another
``snapshot_after`` messages, a new snapshot is read in the background. Tokens are known by
their hash alone there, as SpamAssassin (40 bits) and rspamd (64 bits) store them: a token the
database does not know matches one it does with probability (tokens known) / 2**64, 2e-14 for
400k. Tokens of the database whose hashes collide are left out and read from SQLite. ``hash()``
of a string is salted per interpreter, so each process (or its fork parent) builds its own.
"""
from __future__ import annotations

import gzip
import json
import os
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import sqlite_utils

from trustmilter.errors import TrustmilterError
from trustmilter.store import Label

SCHEMA_VERSION = 1
EXPORT_MAGIC = "#trustmilter-bayes-export"
_IN_CHUNK = 900   # parameters per IN (...) query; well under SQLite's limit on any build
# IN lists are padded with NULLs (which match nothing) to a multiple of this: a few dozen query
# texts instead of one per token count, so sqlite3's statement cache (128 per connection) keeps
# them prepared instead of parsing a 300-parameter query for most messages.
_IN_STEP = 32
DEFAULT_RECHECK_SECONDS = 1.0
DEFAULT_SNAPSHOT_AFTER = 1000
_SNAPSHOT_FETCH = 20_000   # rows per fetch while reading a snapshot (bounds its transient memory)
# Reads map the database file (PRAGMA mmap_size) instead of copying its pages into each
# connection's page cache: the worker processes share one copy in the OS page cache (~10 MB of
# private memory less per worker for 400k tokens) and a lookup costs less. Address space only;
# a bigger file is mapped up to this and read the ordinary way beyond it.
MMAP_BYTES = 256 * 1024 * 1024


class StoreError(TrustmilterError):
    """The token store cannot be opened or has the wrong format."""


class SQLiteTokenStore:
    """Token counts in one SQLite file. ``readonly`` opens it for scoring only."""

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 200, readonly: bool = False,
                 create: bool = True,
                 recheck_seconds: float = DEFAULT_RECHECK_SECONDS,
                 snapshot_after: int = DEFAULT_SNAPSHOT_AFTER) -> None:
        self.path = str(path)
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.readonly = readonly
        self.recheck_seconds = float(recheck_seconds)
        self._local = threading.local()
        # (when read, (nspam, nham, generation)); None = read it on the next call.
        self._state: tuple[float, tuple[int, int, int]] | None = None
        # The snapshot (see the module's docstring); messages scored from SQLite since it was
        # last (re)built or went stale; the pid of the process whose thread is building one.
        # (A ":memory:" database is one per connection: another one could not read it.)
        self.snapshot_after = max(0, int(snapshot_after)) if self.path != ":memory:" else 0
        self._snapshot: _Snapshot | None = None
        self._since_snapshot = 0
        self._building: int | None = None
        if self.path != ":memory:" and not os.path.exists(self.path):
            if readonly or not create:
                raise StoreError(f"{self.path}: no Bayes database")
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            if not readonly and create:
                # Tokens are words of users' mail: 0600 before SQLite creates the file with the
                # umask (its -wal and -shm files take the database file's mode).
                from trustmilter.store.db import _create_private_file
                _create_private_file(Path(self.path))
        if not readonly:
            self._init_schema()
        else:
            self._check_schema()

    # ---- connections ------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        if self.readonly:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False)
        else:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
        conn.execute("PRAGMA synchronous = NORMAL")   # durable enough in WAL, much faster
        conn.execute("PRAGMA cache_size = -16000")     # 16 MB page cache per connection
        conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
        try:    # built into SQLite from 3.38 on, an option before
            conn.execute("SELECT key FROM json_each('[]')").fetchall()
            self._local.json_each = True
        except sqlite3.OperationalError:
            self._local.json_each = False
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _init_schema(self) -> None:
        db = sqlite_utils.Database(self._conn())
        if self.path != ":memory:":
            db.enable_wal()
        if "tokens" not in db.table_names():
            db.execute("CREATE TABLE IF NOT EXISTS tokens (token TEXT PRIMARY KEY, "
                       "spam INTEGER NOT NULL DEFAULT 0, ham INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID")
        if "learned" not in db.table_names():
            db["learned"].create({"digest": str, "label": str, "learned_at": float}, pk="digest",
                                 if_not_exists=True)
        if "meta" not in db.table_names():
            db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
            db["meta"].insert_all([{"key": "schema", "value": str(SCHEMA_VERSION)},
                                   {"key": "nspam", "value": "0"}, {"key": "nham", "value": "0"}],
                                  replace=True)
        self._check_schema()

    def _check_schema(self) -> None:
        try:
            row = self._conn().execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a trustmilter Bayes database ({exc})") from None
        if row is None or int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: Bayes schema {row[0] if row else '?'}, expected {SCHEMA_VERSION}")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local = threading.local()

    # ---- reads ------------------------------------------------------------------------------
    def _current(self) -> tuple[int, int, int]:
        """(nspam, nham, generation), re-read at most every ``recheck_seconds``: they change only
        when someone learns (see the module's docstring)."""
        now = time.monotonic()
        state = self._state
        if state is not None and now - state[0] < self.recheck_seconds:
            return state[1]
        rows = dict(self._conn().execute(
            "SELECT key, value FROM meta WHERE key IN ('nspam', 'nham', 'generation')").fetchall())
        current = (int(rows.get("nspam", 0)), int(rows.get("nham", 0)),
                   int(rows.get("generation", 0)))
        self._state = (now, current)
        return current

    def _changed(self) -> None:
        """This process wrote: read the totals and tokens afresh from the next call on."""
        self._state = None
        self._snapshot = None

    def totals(self) -> tuple[int, int]:
        nspam, nham, _generation = self._current()
        return nspam, nham

    def counts(self, tokens: Sequence[str]) -> dict[str, tuple[int, int]]:
        state = self._current()
        snapshot = self._snapshot
        if snapshot is not None:
            if snapshot.state == state:
                found, ambiguous = snapshot.counts(tokens)
                if ambiguous:
                    found.update(self._select(ambiguous))
                return found
            self._snapshot = None      # stale: someone learned
        if self.snapshot_after:
            self._since_snapshot += 1
            if self._since_snapshot >= self.snapshot_after and self._building != os.getpid():
                self._start_snapshot()
        return self._select(tokens)

    def pair_rows(self, tokens: list[str]) -> "PairRows | None":
        """The snapshot's answer for distinct ``tokens``, by count pair (see ``_Snapshot``):
        None when no current snapshot can answer alone (there is none, it is stale, or a
        token's hash is ambiguous in it); then ``counts`` answers."""
        state = self._current()
        snapshot = self._snapshot
        if snapshot is None or snapshot.state != state:
            return None
        if snapshot.ambiguous and any(hash(t) in snapshot.ambiguous for t in tokens):
            return None
        where, pairs = snapshot.rows(tokens)
        return PairRows(snapshot, where, pairs)

    # ---- the snapshot -------------------------------------------------------------------------
    def snapshot_tokens(self) -> int:
        """Tokens the current snapshot holds (0: none)."""
        snapshot = self._snapshot
        return len(snapshot) if snapshot is not None else 0

    def load_snapshot(self) -> bool:
        """Read the snapshot now, in this thread: for a long-lived process before its first
        message (the milter's workers), which would otherwise score ``snapshot_after`` messages
        from SQLite first (~3 times the CPU per lookup). False when there is none to read
        (``snapshot_after`` is 0, an in-memory database) or it could not be read (logged; the
        SQLite path answers)."""
        if not self.snapshot_after:
            return False
        self._start_snapshot(wait=True)
        return self._snapshot is not None

    def _start_snapshot(self, *, wait: bool = False) -> None:
        """Read a snapshot: in a background thread, or with ``wait`` in this one."""
        self._building = os.getpid()
        self._since_snapshot = 0
        if wait:
            self._build_snapshot()
        else:
            threading.Thread(target=self._build_snapshot, name="bayes-snapshot",
                             daemon=True).start()

    def _build_snapshot(self) -> None:
        try:
            snapshot = self.read_snapshot()
        except (sqlite3.Error, MemoryError) as exc:
            # The SQLite path keeps answering; a next try comes after snapshot_after messages.
            import logging
            logging.getLogger("trustmilter.bayes").warning(
                "Bayes snapshot of %s not read (%s); reading tokens from SQLite", self.path, exc)
        else:
            self._snapshot = snapshot
        finally:
            self._building = None

    def read_snapshot(self) -> "_Snapshot":
        """Every token's counts, and the totals and generation they belong to, read in one
        transaction (a ``learn`` committing meanwhile is not half seen)."""
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
            conn.execute("BEGIN")
            try:
                rows = dict(conn.execute("SELECT key, value FROM meta WHERE key IN "
                                         "('nspam', 'nham', 'generation')").fetchall())
                state = (int(rows.get("nspam", 0)), int(rows.get("nham", 0)),
                         int(rows.get("generation", 0)))
                size, low, high = conn.execute(
                    "SELECT count(*), min(min(spam), min(ham)), max(max(spam), max(ham)) "
                    "FROM tokens").fetchone()
                # Counts fit 32 bits in any real database: half the memory.
                count_type = np.int32 if -2**31 <= (low or 0) and (high or 0) < 2**31 else np.int64
                hashes = np.empty(size, dtype=np.int64)
                spam = np.empty(size, dtype=count_type)
                ham = np.empty(size, dtype=count_type)
                cursor = conn.execute("SELECT token, spam, ham FROM tokens")
                at = 0
                while rows_ := cursor.fetchmany(_SNAPSHOT_FETCH):
                    tokens, spams, hams = zip(*rows_)
                    end = at + len(rows_)
                    hashes[at:end] = np.fromiter(map(hash, tokens), dtype=np.int64, count=len(tokens))
                    spam[at:end] = spams
                    ham[at:end] = hams
                    at = end
            finally:
                conn.execute("COMMIT")
        finally:
            conn.close()
        return _Snapshot.build(state, hashes[:at], spam[:at], ham[:at])

    def _select(self, tokens: Sequence[str]) -> dict[str, tuple[int, int]]:
        conn = self._conn()
        tokens = list(tokens)
        if self._local.json_each and tokens:
            # One JSON array parameter: no ephemeral index for an IN list to build, and rows
            # name their token by position (an int) instead of a new string: ~20% less per
            # token. ensure_ascii=False leaves only \", \\ and control characters escaped; a
            # \u escape (a control character: json_each cuts a string at \u0000) goes the IN
            # way, as does a token that merely contains a backslash and a u.
            text = json.dumps(tokens, ensure_ascii=False)
            if "\\u" not in text:
                return {tokens[i]: (spam, ham) for i, spam, ham in conn.execute(_JSON_QUERY, (text,))}
        out: dict[str, tuple[int, int]] = {}
        for start in range(0, len(tokens), _IN_CHUNK):
            chunk = tokens[start:start + _IN_CHUNK]
            size = -(-len(chunk) // _IN_STEP) * _IN_STEP
            for token, spam, ham in conn.execute(_in_query(size), chunk + [None] * (size - len(chunk))):
                out[token] = (spam, ham)
        return out

    def learned_label(self, digest: str) -> Label | None:
        row = self._conn().execute("SELECT label FROM learned WHERE digest = ?", (digest,)).fetchone()
        return row[0] if row else None

    def meta(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def token_count(self) -> int:
        return int(self._conn().execute("SELECT count(*) FROM tokens").fetchone()[0])

    # ---- writes -----------------------------------------------------------------------------
    def set_meta(self, key: str, value: str) -> None:
        self._conn().execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO "
                             "UPDATE SET value = excluded.value", (key, value))

    def learn(self, items: Iterable[tuple[str, Sequence[str], Label]]) -> tuple[int, int]:
        """See ``TokenStore.learn``. Counts are summed in memory and written in one
        transaction, so a 5000-message training run is one short write."""
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only")
        conn = self._conn()
        learned = skipped = 0
        delta: Counter[tuple[str, int]] = Counter()    # (token, 0=spam / 1=ham) -> change
        nspam = nham = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            known = {}
            for digest, tokens, label in items:
                if label not in ("spam", "ham"):
                    raise ValueError(f"label must be spam or ham, not {label!r}")
                previous = known.get(digest)
                if previous is None:
                    row = conn.execute("SELECT label FROM learned WHERE digest = ?", (digest,)).fetchone()
                    previous = row[0] if row else ""
                if previous == label:
                    skipped += 1
                    continue
                unique = set(tokens)
                if previous:   # learned as the other class before: move it over
                    col = 0 if previous == "spam" else 1
                    for token in unique:
                        delta[(token, col)] -= 1
                    if previous == "spam":
                        nspam -= 1
                    else:
                        nham -= 1
                col = 0 if label == "spam" else 1
                for token in unique:
                    delta[(token, col)] += 1
                if label == "spam":
                    nspam += 1
                else:
                    nham += 1
                known[digest] = label
                learned += 1
            now = time.time()
            conn.executemany("INSERT INTO learned(digest, label, learned_at) VALUES (?, ?, ?) "
                             "ON CONFLICT(digest) DO UPDATE SET label = excluded.label, "
                             "learned_at = excluded.learned_at",
                             [(d, lab, now) for d, lab in known.items()])
            self._apply(conn, delta)
            self._bump_totals(conn, nspam, nham)
            if learned:
                self._bump_generation(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._changed()
        return learned, skipped

    def unlearn(self, items: Iterable[tuple[str, Sequence[str]]]) -> int:
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only")
        conn = self._conn()
        delta: Counter[tuple[str, int]] = Counter()
        nspam = nham = done = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for digest, tokens in items:
                row = conn.execute("SELECT label FROM learned WHERE digest = ?", (digest,)).fetchone()
                if row is None:
                    continue
                col = 0 if row[0] == "spam" else 1
                for token in set(tokens):
                    delta[(token, col)] -= 1
                if col == 0:
                    nspam -= 1
                else:
                    nham -= 1
                conn.execute("DELETE FROM learned WHERE digest = ?", (digest,))
                done += 1
            self._apply(conn, delta)
            self._bump_totals(conn, nspam, nham)
            if done:
                self._bump_generation(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._changed()
        return done

    @staticmethod
    def _apply(conn: sqlite3.Connection, delta: Counter[tuple[str, int]]) -> None:
        merged: dict[str, list[int]] = {}
        for (token, col), change in delta.items():
            if change:
                merged.setdefault(token, [0, 0])[col] += change
        conn.executemany(
            "INSERT INTO tokens(token, spam, ham) VALUES (?, max(?, 0), max(?, 0)) "
            "ON CONFLICT(token) DO UPDATE SET spam = max(spam + ?, 0), ham = max(ham + ?, 0)",
            [(t, s, h, s, h) for t, (s, h) in merged.items()])
        if any(s < 0 or h < 0 for s, h in merged.values()):
            conn.execute("DELETE FROM tokens WHERE spam <= 0 AND ham <= 0")

    @staticmethod
    def _bump_generation(conn: sqlite3.Connection) -> None:
        # In the writing transaction: readers that see the new counts see the new generation.
        conn.execute("INSERT INTO meta(key, value) VALUES ('generation', '1') ON CONFLICT(key) DO "
                     "UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)")

    @staticmethod
    def _bump_totals(conn: sqlite3.Connection, nspam: int, nham: int) -> None:
        conn.execute("UPDATE meta SET value = CAST(max(CAST(value AS INTEGER) + ?, 0) AS TEXT) "
                     "WHERE key = 'nspam'", (nspam,))
        conn.execute("UPDATE meta SET value = CAST(max(CAST(value AS INTEGER) + ?, 0) AS TEXT) "
                     "WHERE key = 'nham'", (nham,))

    # ---- export / import (the shipped database is a compact export) -------------------------
    def export(self, path: str | Path, *, min_count: int = 1) -> int:
        """Write a gzip'd text export: a header line with the totals, then one
        ``token<TAB>spam<TAB>ham`` line per token seen at least ``min_count`` times, then the
        learned digests (so learning a shipped message again is still a no-op)."""
        conn = self._conn()
        nspam, nham = self.totals()
        written = 0
        tmp = f"{path}.tmp"
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=9) as out:
            tokenizer = self.meta("tokenizer") or ""
            out.write(f"{EXPORT_MAGIC} v{SCHEMA_VERSION} nspam={nspam} nham={nham} tokenizer={tokenizer}\n")
            for token, spam, ham in conn.execute(
                    "SELECT token, spam, ham FROM tokens WHERE spam + ham >= ? ORDER BY token", (min_count,)):
                if "\t" in token or "\n" in token:
                    continue
                out.write(f"{token}\t{spam}\t{ham}\n")
                written += 1
            out.write("#learned\n")
            for digest, label in conn.execute("SELECT digest, label FROM learned ORDER BY digest"):
                out.write(f"{digest}\t{label}\n")
        os.replace(tmp, path)
        return written

    def import_export(self, path: str | Path) -> int:
        """Replace this store's content with an export's. Returns the token count."""
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only")
        conn = self._conn()
        with gzip.open(path, "rt", encoding="utf-8") as src:
            header = src.readline().split()
            if not header or header[0] != EXPORT_MAGIC:
                raise StoreError(f"{path}: not a trustmilter Bayes export")
            fields = dict(item.split("=", 1) for item in header[2:] if "=" in item)
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM tokens")
                conn.execute("DELETE FROM learned")
                count = 0
                rows = _export_rows(src)
                conn.executemany("INSERT INTO tokens(token, spam, ham) VALUES (?, ?, ?)", rows)
                count = conn.execute("SELECT count(*) FROM tokens").fetchone()[0]
                now = time.time()
                conn.executemany("INSERT OR REPLACE INTO learned(digest, label, learned_at) VALUES (?, ?, ?)",
                                 ((d, lab, now) for d, lab in _learned_rows(src)))
                conn.execute("UPDATE meta SET value = ? WHERE key = 'nspam'", (fields.get("nspam", "0"),))
                conn.execute("UPDATE meta SET value = ? WHERE key = 'nham'", (fields.get("nham", "0"),))
                conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('tokenizer', ?)",
                             (fields.get("tokenizer", ""),))
                self._bump_generation(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        self._changed()
        return int(count)


_JSON_QUERY = ("SELECT j.key, t.spam, t.ham FROM json_each(?) AS j "
               "JOIN tokens AS t ON t.token = j.value")
_in_queries: dict[int, str] = {}


def _in_query(size: int) -> str:
    query = _in_queries.get(size)
    if query is None:
        query = _in_queries[size] = (
            "SELECT token, spam, ham FROM tokens WHERE token IN (" + ",".join("?" * size) + ")")
    return query


def _export_rows(src: Iterator[str]) -> Iterator[tuple[str, int, int]]:
    for line in src:
        if line.startswith("#learned"):
            return
        token, spam, ham = line.rstrip("\n").split("\t")
        yield token, int(spam), int(ham)


def _learned_rows(src: Iterator[str]) -> Iterator[tuple[str, str]]:
    for line in src:
        digest, label = line.rstrip("\n").split("\t")
        yield digest, label


class PairRows(NamedTuple):
    """Which tokens a snapshot knows and the count pair of each: ``snapshot.pair_spam[pairs]``
    and ``snapshot.pair_ham[pairs]`` are the counts of ``tokens[where]``."""

    snapshot: "_Snapshot"
    where: np.ndarray
    pairs: np.ndarray


class _Snapshot:
    """Token counts by 64-bit hash, as of one (nspam, nham, generation). A token's counts are
    one of a few distinct (spam, ham) pairs (3.5k for the shipped 397k tokens): each token
    holds the number of its pair (4 bytes instead of 8), and Bayes works out each pair's clue
    once per snapshot (``pair_rows``) instead of once per token of every message.

    Lookup goes through a bucket index on the hashes' top ``bits`` bits (~2 tokens a bucket:
    ``starts`` is 2 MB for 397k tokens), then a few halving steps inside the bucket. A plain
    ``searchsorted`` over the 3 MB of hashes costs ~19 dependent reads a token, and between two
    messages the rest of the pipeline evicts them from the CPU caches."""

    __slots__ = ("state", "hashes", "pair", "pair_spam", "pair_ham", "ambiguous", "bits",
                 "starts", "steps")

    def __init__(self, state: tuple[int, int, int], hashes: np.ndarray, pair: np.ndarray,
                 pair_spam: np.ndarray, pair_ham: np.ndarray, ambiguous: frozenset[int]) -> None:
        self.state, self.hashes, self.pair = state, hashes, pair
        self.pair_spam, self.pair_ham = pair_spam, pair_ham
        self.ambiguous = ambiguous
        # hashes is sorted as signed int64; an arithmetic shift keeps that order, so bucket b
        # holds hashes[starts[b]:starts[b + 1]].
        self.bits = min(24, max(1, int(np.ceil(np.log2(max(hashes.size, 2) / 2)))))
        buckets = np.bincount(self._bucket(hashes), minlength=1 << self.bits)
        self.starts = np.zeros(buckets.size + 1, dtype=np.intp)
        np.cumsum(buckets, out=self.starts[1:])
        self.steps = max(0, int(buckets.max(initial=0)) - 1).bit_length()   # halvings to 1

    def _bucket(self, hashes: np.ndarray) -> np.ndarray:
        return (hashes >> (64 - self.bits)) + (1 << (self.bits - 1))

    @classmethod
    def build(cls, state: tuple[int, int, int], hashes: np.ndarray, spam: np.ndarray,
              ham: np.ndarray) -> "_Snapshot":
        # Sorted in place and gathered once: ~1.7 times the snapshot's size at the peak.
        order = np.argsort(hashes, kind="stable")
        hashes.sort(kind="stable")
        spam, ham = spam[order], ham[order]
        del order
        ambiguous: frozenset[int] = frozenset()
        same = hashes[1:] == hashes[:-1]
        if same.any():     # two tokens of the database share a hash: both go to SQLite
            collided = np.unique(hashes[1:][same])
            keep = ~np.isin(hashes, collided)
            hashes, spam, ham = hashes[keep], spam[keep], ham[keep]
            ambiguous = frozenset(collided.tolist())
        if spam.dtype == np.int32:   # one int64 key per pair: 15 times faster than axis=0
            key = (spam.astype(np.int64) << 32) + (ham.astype(np.int64) + 2**31)
            pairs, pair = np.unique(key, return_inverse=True)
            pair_spam, pair_ham = pairs >> 32, (pairs & 0xFFFFFFFF) - 2**31
        else:
            both, pair = np.unique(np.stack((spam, ham), axis=1), axis=0, return_inverse=True)
            pair_spam, pair_ham = both[:, 0].copy(), both[:, 1].copy()
        return cls(state, hashes, pair.astype(np.int32).reshape(-1), pair_spam, pair_ham,
                   ambiguous)

    def __len__(self) -> int:
        return int(self.hashes.size)

    @property
    def spam(self) -> np.ndarray:
        return self.pair_spam[self.pair]

    @property
    def ham(self) -> np.ndarray:
        return self.pair_ham[self.pair]

    def rows(self, tokens: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``tokens`` of the tokens found, ascending; their pair numbers)."""
        return self.find(np.fromiter(map(hash, tokens), dtype=np.int64, count=len(tokens)))

    def find(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``wanted`` (int64 hashes) of those found, ascending; their pairs)."""
        hashes = self.hashes
        if not wanted.size or not hashes.size:
            empty = np.empty(0, dtype=np.intp)
            return empty, empty
        bucket = self._bucket(wanted)
        base, end = self.starts[bucket], self.starts[bucket + 1]
        size = end - base
        last = hashes.size - 1
        np.minimum(base, last, out=base)      # an empty last bucket starts past the end
        # Branch-free lower bound inside each bucket, every token at once: halve the range
        # while it holds more than one hash (a range of 1 or 0 no longer moves).
        for _ in range(self.steps):
            half = size >> 1
            probe = base + half
            base = np.where(hashes[probe] < wanted, probe, base)
            size -= half
        at = base + (hashes[base] < wanted)
        where = np.flatnonzero((at < end) & (hashes[np.minimum(at, last)] == wanted))
        return where, self.pair[at[where]]

    def counts(self, tokens: Sequence[str]) -> tuple[dict[str, tuple[int, int]], list[str]]:
        """(counts of the tokens found, tokens whose hash is ambiguous here)."""
        tokens = tokens if isinstance(tokens, list) else list(tokens)
        where, pairs = self.rows(tokens)
        found = dict(zip(map(tokens.__getitem__, where.tolist()),
                         zip(self.pair_spam[pairs].tolist(), self.pair_ham[pairs].tolist())))
        if self.ambiguous:
            return found, [t for t in tokens if hash(t) in self.ambiguous]
        return found, []
