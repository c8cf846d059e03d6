"""The token store's in-memory snapshot: it answers exactly as the database does, only for the
totals and generation it was read with, is read again after a learn, and sends tokens whose
hashes collide to SQLite."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.bayes_items import items as _items
from tests.unit.test_bayes_freshness import (_fresh, _in_another_process, _wait_until,  # noqa: F401
                                             trained, wait_for_snapshot)
from trustmilter.store.sqlite import SQLiteTokenStore, _Snapshot

if TYPE_CHECKING:
    from trustmilter.pipeline import Engine


def _queries() -> list[list[str]]:
    messages = [t for _d, t, _l in _items("ham", "eval") + _items("spam", "eval") + _items("spam")]
    unknown = [f"never-seen-{i}" for i in range(50)]
    return messages + [messages[0] + unknown, messages[1] * 2, [], unknown,
                       sorted({t for m in messages for t in m})]


def test_the_snapshot_answers_as_the_database_does(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SQLiteTokenStore(trained, readonly=True, snapshot_after=3)
    plain = SQLiteTokenStore(trained, readonly=True, snapshot_after=0)
    queries = _queries()
    assert len(queries[-1]) > 900       # the SQLite path splits it over two IN lists
    for tokens in queries[:3]:          # from SQLite; the third starts the snapshot
        assert store.counts(tokens) == plain.counts(tokens)
    wait_for_snapshot(store)
    assert len(store._snapshot) == plain.token_count() > 0

    def no_sql(tokens: object) -> None:
        raise AssertionError("read from SQLite while the snapshot is current")
    monkeypatch.setattr(store, "_select", no_sql)
    for tokens in queries:
        assert store.counts(tokens) == plain.counts(tokens)


def test_a_learn_elsewhere_retires_the_snapshot_and_a_new_one_is_read(trained: Path) -> None:
    tokens = _items("spam", "eval")[0][1]
    store = SQLiteTokenStore(trained, readonly=True, recheck_seconds=0.2, snapshot_after=2)
    store.counts(tokens)
    store.counts(tokens)
    wait_for_snapshot(store)
    old = store._snapshot
    before = store.counts(tokens)
    committed = _in_another_process(trained, [("new-spam", tokens, "spam")])
    now_totals, now_counts = _fresh(trained, tokens)
    assert now_counts != before
    _wait_until(committed + 0.2)
    assert store.counts(tokens) == now_counts          # SQLite again: the snapshot is stale
    assert store._snapshot is None
    store.counts(tokens)                                # the second message reads a new one
    wait_for_snapshot(store)
    assert store._snapshot is not old and store._snapshot.state[:2] == now_totals
    assert store.counts(tokens) == now_counts


def test_this_process_learning_retires_its_snapshot_at_once(trained: Path) -> None:
    tokens = _items("spam", "eval")[0][1]
    store = SQLiteTokenStore(trained, recheck_seconds=3600, snapshot_after=1)
    before = store.counts(tokens)
    wait_for_snapshot(store)
    store.learn([("new-spam", tokens, "spam")])
    assert store._snapshot is None
    assert store.counts(tokens) == _fresh(trained, tokens)[1] != before


def test_tokens_whose_hashes_collide_are_read_from_sqlite(trained: Path) -> None:
    store = SQLiteTokenStore(trained, readonly=True, snapshot_after=0)
    tokens = _items("spam", "eval")[0][1]
    truth = _fresh(trained, tokens)[1]
    real = store.read_snapshot()
    known = [t for t in tokens if t in truth]
    a, b = known[0], known[1]
    # Pretend a and b hash alike: rows for both under a's hash.
    hashes = np.append(real.hashes, hash(a))
    spam = np.append(real.spam, 10**6)
    ham = np.append(real.ham, 10**6)
    collided = _Snapshot.build(real.state, hashes, spam, ham)
    assert hash(a) in collided.ambiguous and len(collided) == len(real) - 1
    found, ambiguous = collided.counts(tokens)
    assert ambiguous == [t for t in tokens if t == a] and a not in found
    assert found[b] == truth[b]
    store._snapshot = collided
    assert store.counts(tokens) == truth


def test_snapshot_after_comes_from_the_bayes_section(tmp_path: Path) -> None:
    from trustmilter.config import load_config
    from trustmilter.content.registry import open_bayes_store
    section = dict(load_config(None).section("bayes"), seed_from_model=False)
    default = open_bayes_store({**section, "path": str(tmp_path / "a.sqlite")})
    assert default.snapshot_after == section["snapshot_after"] > 0
    off = open_bayes_store({**section, "path": str(tmp_path / "a.sqlite"), "snapshot_after": 0})
    for _ in range(5):
        off.counts(["x"])
    assert off._snapshot is None and off._building is None


def _engine_on(path: Path, tmp_path: Path, **bayes: object) -> "Engine":
    from trustmilter.config import load_config
    from trustmilter.pipeline import Engine
    config = load_config(None, {"state": {"dir": str(tmp_path / "state")},
                                "bayes": {"path": str(path), **bayes}})
    return Engine.from_config(config)


def test_an_engine_warmed_up_answers_its_first_message_from_the_snapshot(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the milter's workers do before they say ready (bayes.snapshot_at_start)."""
    from trustmilter.content import features
    engine = _engine_on(trained, tmp_path)
    store = engine.state["content.bayes"].store
    assert store._snapshot is None
    monkeypatch.setattr(features, "_psl", {})
    engine.warm_up()
    assert set(features._psl) == {False, True}     # content analysis's lists, parsed too
    plain = SQLiteTokenStore(trained, readonly=True, snapshot_after=0)
    assert store.snapshot_tokens() == plain.token_count() > 0

    def no_sql(tokens: object) -> None:
        raise AssertionError("read from SQLite while the snapshot is current")
    monkeypatch.setattr(store, "_select", no_sql)
    for tokens in _queries():
        assert store.counts(tokens) == plain.counts(tokens)


@pytest.mark.parametrize("bayes", [{"snapshot_at_start": False}, {"snapshot_after": 0}])
def test_no_snapshot_at_start_when_the_config_says_so(trained: Path, tmp_path: Path,
                                                      bayes: dict[str, object]) -> None:
    engine = _engine_on(trained, tmp_path, **bayes)
    engine.warm_up()
    assert engine.state["content.bayes"].store.snapshot_tokens() == 0


def test_a_snapshot_that_cannot_be_read_leaves_sqlite_answering(
        trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = _engine_on(trained, tmp_path)
    store = engine.state["content.bayes"].store
    tokens = _items("spam", "eval")[0][1]
    truth = _fresh(trained, tokens)[1]
    # Another connection holds the database exclusively (WAL with locking_mode EXCLUSIVE shuts
    # every other connection out): the snapshot's read fails after the busy timeout. (The
    # store's own connection goes first, or the lock could not be taken; it reopens on use.)
    store.close()
    locker = sqlite3.connect(trained, isolation_level=None)
    locker.execute("PRAGMA locking_mode = EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    try:
        engine.warm_up()
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert store.snapshot_tokens() == 0
    assert "Bayes snapshot" in caplog.text and "not read" in caplog.text
    assert store.counts(tokens) == truth


_INT64 = st.integers(-2**63, 2**63 - 1)


@settings(max_examples=300, deadline=None)
@given(known=st.lists(_INT64 | st.sampled_from([-2**63, -1, 0, 2**63 - 1]), max_size=300),
       others=st.lists(_INT64 | st.sampled_from([-2**63, -1, 0, 2**63 - 1]), max_size=50))
def test_the_bucket_index_finds_exactly_the_hashes_a_plain_search_finds(
        known: list[int], others: list[int]) -> None:
    # Hashes at both ends of int64, in the first and the last bucket, empty buckets at either
    # end, duplicates in the database (left out as ambiguous) and in the query.
    hashes = np.array(known, dtype=np.int64)
    spam = np.arange(hashes.size, dtype=np.int32)
    snapshot = _Snapshot.build((1, 1, 0), hashes.copy(), spam, np.zeros_like(spam))
    wanted = np.array(known[::2] + others + known[:3], dtype=np.int64)
    where, pairs = snapshot.find(wanted)
    kept = {int(h): i for i, h in enumerate(snapshot.hashes.tolist())}
    expected = [i for i, h in enumerate(wanted.tolist()) if h in kept]
    assert where.tolist() == expected
    assert pairs.tolist() == [int(snapshot.pair[kept[wanted[i]]]) for i in expected]
