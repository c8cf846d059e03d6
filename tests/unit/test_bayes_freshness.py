"""How fresh a reader's token counts are: a learn committed by another process (a real one, on a
real SQLite file in WAL) is seen by a reader answering from its in-memory snapshot once
``recheck_seconds`` have passed, also when the totals did not move; one in this process at once."""
from __future__ import annotations

import multiprocessing
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from trustmilter.store.sqlite import DEFAULT_RECHECK_SECONDS, SQLiteTokenStore

from tests.bayes_items import items as _items


def _fresh(path: Path, tokens: list[str]) -> tuple[tuple[int, int], dict[str, tuple[int, int]]]:
    """What the database holds now, read from SQLite itself."""
    store = SQLiteTokenStore(path, readonly=True, snapshot_after=0)
    try:
        return store.totals(), store.counts(tokens)
    finally:
        store.close()


def _other_process(path: str, learn: list[tuple[str, list[str], str]],
                   unlearn: list[tuple[str, list[str]]], done: Any) -> None:
    store = SQLiteTokenStore(path)
    store.learn(learn)
    if unlearn:
        store.unlearn(unlearn)
    store.close()
    done.put("ok")


def _in_another_process(path: Path, learn: list[tuple[str, list[str], str]],
                        unlearn: list[tuple[str, list[str]]] | None = None) -> float:
    """Run learn (then unlearn) in a separate process; returns the monotonic time it was done."""
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Queue()
    proc = ctx.Process(target=_other_process, args=(str(path), learn, unlearn or [], done))
    proc.start()
    assert done.get(timeout=120) == "ok"
    proc.join(30)
    return time.monotonic()


def _wait_until(moment: float) -> None:
    while time.monotonic() < moment:
        time.sleep(max(0.0, moment - time.monotonic()) + 0.01)


def wait_for_snapshot(store: SQLiteTokenStore, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while store._snapshot is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store._snapshot is not None, "no snapshot was read"


def _snapshotted(path: Path, **kw: Any) -> SQLiteTokenStore:
    """A reader answering from its snapshot, read before its first message (as the milter's
    workers do; the background read is tested in test_bayes_snapshot)."""
    store = SQLiteTokenStore(path, **kw)
    assert store.load_snapshot()
    return store


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    path = tmp_path / "bayes.sqlite"
    store = SQLiteTokenStore(path)
    store.learn(_items("ham") + _items("spam"))
    store.close()
    return path


def test_a_learn_in_another_process_is_seen_after_the_recheck_interval(trained: Path) -> None:
    tokens = _items("spam", "eval")[0][1]
    reader = _snapshotted(trained, readonly=True)                   # the default interval
    pinned = _snapshotted(trained, readonly=True, recheck_seconds=3600)
    before = reader.counts(tokens)
    assert pinned.counts(tokens) == before and reader.totals() == pinned.totals()
    committed = _in_another_process(trained, [("new-spam", tokens, "spam")])
    now_totals, now_counts = _fresh(trained, tokens)
    assert now_counts != before
    # The snapshot is really what answers: a reader that does not look again keeps the old counts.
    assert pinned.counts(tokens) == before
    _wait_until(committed + DEFAULT_RECHECK_SECONDS)
    assert reader.counts(tokens) == now_counts
    assert reader.totals() == now_totals


def test_a_change_that_leaves_the_totals_alone_is_seen_too(trained: Path) -> None:
    """Learn one spam and unlearn another: same totals, other counts. The generation says so."""
    tokens = _items("spam", "eval")[0][1]
    digest, old_tokens, _label = _items("spam")[0]
    reader = _snapshotted(trained, readonly=True, recheck_seconds=0.2)
    before_totals, before = reader.totals(), reader.counts(tokens)
    committed = _in_another_process(trained, [("new-spam", tokens, "spam")], [(digest, old_tokens)])
    now_totals, now_counts = _fresh(trained, tokens)
    assert now_totals == before_totals and now_counts != before
    _wait_until(committed + 0.2)
    assert reader.counts(tokens) == now_counts


def test_a_writer_that_knows_no_generation_still_retires_the_snapshot(trained: Path) -> None:
    """An older trustmilter learning into the same file moves the totals but not the generation."""
    tokens = _items("spam", "eval")[0][1]
    reader = _snapshotted(trained, readonly=True, recheck_seconds=0.2)
    before = reader.counts(tokens)
    conn = sqlite3.connect(trained, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE tokens SET spam = spam + 1 WHERE token = ?", (next(iter(before)),))
    conn.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'nspam'")
    conn.execute("COMMIT")
    committed = time.monotonic()
    conn.close()
    _wait_until(committed + 0.2)
    assert reader.counts(tokens) == _fresh(trained, tokens)[1] != before


def test_this_process_sees_its_own_learn_at_once(trained: Path) -> None:
    tokens = _items("spam", "eval")[0][1]
    store = _snapshotted(trained, recheck_seconds=3600)
    before_totals, before = store.totals(), store.counts(tokens)
    store.learn([("new-spam", tokens, "spam")])
    assert store.counts(tokens) == _fresh(trained, tokens)[1] != before
    assert store.totals() == (before_totals[0] + 1, before_totals[1])
    store.unlearn([("new-spam", tokens)])
    assert store.counts(tokens) == before and store.totals() == before_totals


def test_generation_is_bumped_by_every_change_and_absent_in_older_databases(trained: Path,
                                                                           tmp_path: Path) -> None:
    store = SQLiteTokenStore(trained)
    # A database written before the generation existed has no row: it reads as 0.
    store._conn().execute("DELETE FROM meta WHERE key = 'generation'")
    assert store.meta("generation") is None
    tokens = _items("spam", "eval")[0][1]
    store.learn([("new-spam", tokens, "spam")])
    assert store.meta("generation") == "1"
    store.learn([("new-spam", tokens, "spam")])         # already learned: nothing changed
    assert store.meta("generation") == "1"
    store.unlearn([("new-spam", tokens)])
    assert store.meta("generation") == "2"
    export = tmp_path / "export.gz"
    store.export(export)
    store.import_export(export)
    assert store.meta("generation") == "3"
