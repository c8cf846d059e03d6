"""The token store's per-process read cache: it answers exactly as the database does, stays within
its bound, and a learn committed by another process (a real one, on a real SQLite file in WAL) is
seen by a cached reader once ``recheck_seconds`` have passed, also when the totals did not move."""
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
    """What the database holds now, read without any cache."""
    store = SQLiteTokenStore(path, readonly=True, cache_tokens=0)
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


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    path = tmp_path / "bayes.sqlite"
    store = SQLiteTokenStore(path)
    store.learn(_items("ham") + _items("spam"))
    store.close()
    return path


def test_cached_counts_are_the_databases(trained: Path) -> None:
    messages = [t for _d, t, _l in _items("ham", "eval") + _items("spam", "eval") + _items("spam")]
    unknown = [f"never-seen-{i}" for i in range(50)]
    queries = messages + [messages[0] + unknown, messages[1] * 2, [], unknown,
                          sorted({t for m in messages for t in m})]     # > 900: two IN chunks
    bound = 200
    cached = SQLiteTokenStore(trained, readonly=True, cache_tokens=bound, snapshot_after=0)
    plain = SQLiteTokenStore(trained, readonly=True, cache_tokens=0)
    longest = 0
    for _round in range(3):          # the second and third rounds are served partly from cache
        for tokens in queries:
            assert cached.counts(tokens) == plain.counts(tokens)
            # Within the bound, give or take the tokens of the two calls that last crossed it.
            longest = max(longest, len(tokens))
            assert len(cached._hot) + len(cached._cold) <= bound + 2 * longest
    assert cached._hot or cached._cold
    assert len(queries[-1]) > 900


def test_a_learn_in_another_process_is_seen_after_the_recheck_interval(trained: Path) -> None:
    tokens = _items("spam", "eval")[0][1]
    reader = SQLiteTokenStore(trained, readonly=True)               # the default interval
    pinned = SQLiteTokenStore(trained, readonly=True, recheck_seconds=3600)
    before = reader.counts(tokens)
    assert pinned.counts(tokens) == before and reader.totals() == pinned.totals()
    committed = _in_another_process(trained, [("new-spam", tokens, "spam")])
    now_totals, now_counts = _fresh(trained, tokens)
    assert now_counts != before
    # The cache is really what answers: a reader that does not look again keeps the old counts.
    assert pinned.counts(tokens) == before
    _wait_until(committed + DEFAULT_RECHECK_SECONDS)
    assert reader.counts(tokens) == now_counts
    assert reader.totals() == now_totals


def test_a_change_that_leaves_the_totals_alone_is_seen_too(trained: Path) -> None:
    """Learn one spam and unlearn another: same totals, other counts. The generation says so."""
    tokens = _items("spam", "eval")[0][1]
    digest, old_tokens, _label = _items("spam")[0]
    reader = SQLiteTokenStore(trained, readonly=True, recheck_seconds=0.2)
    before_totals, before = reader.totals(), reader.counts(tokens)
    committed = _in_another_process(trained, [("new-spam", tokens, "spam")], [(digest, old_tokens)])
    now_totals, now_counts = _fresh(trained, tokens)
    assert now_totals == before_totals and now_counts != before
    _wait_until(committed + 0.2)
    assert reader.counts(tokens) == now_counts


def test_a_writer_that_knows_no_generation_still_drops_the_cache(trained: Path) -> None:
    """An older trustmilter learning into the same file moves the totals but not the generation."""
    tokens = _items("spam", "eval")[0][1]
    reader = SQLiteTokenStore(trained, readonly=True, recheck_seconds=0.2)
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
    store = SQLiteTokenStore(trained, recheck_seconds=3600)
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



def test_the_cache_size_comes_from_the_bayes_section(tmp_path: Path) -> None:
    from trustmilter.config import load_config
    from trustmilter.content.registry import open_bayes_store
    section = dict(load_config(None).section("bayes"), seed_from_model=False)
    default = open_bayes_store({**section, "path": str(tmp_path / "a.sqlite")})
    assert default.cache_tokens == section["cache_tokens"] > 0
    off = open_bayes_store({**section, "path": str(tmp_path / "a.sqlite"), "cache_tokens": 0})
    assert off.cache_tokens == 0
    off.counts(["x"])
    assert not off._hot and not off._cold
