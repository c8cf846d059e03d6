"""Bayes: the SpamBayes classifier over the SQLite token store. Learn/unlearn symmetry, idempotent
learning, moving a message between classes, the minimum before voting, export/import, the milter
reading while learn writes, and the check's symbols."""
from __future__ import annotations

import math
import sqlite3
import threading
from pathlib import Path

import pytest

from trustmilter.checks.bayes import band
from trustmilter.content.bayes import BayesClassifier, BayesSettings, chi2q
from trustmilter.pipeline import evaluate
from trustmilter.store.sqlite import SQLiteTokenStore, StoreError
from trustmilter.types import Envelope

from tests.bayes_items import SMALL, items as _items




def _snapshot(store: SQLiteTokenStore) -> tuple[tuple[int, int], list[tuple[str, int, int]]]:
    rows = store._conn().execute("SELECT token, spam, ham FROM tokens ORDER BY token").fetchall()
    store._state = None              # the totals are re-read at most once a second
    return store.totals(), rows


@pytest.fixture
def store(tmp_path: Path) -> SQLiteTokenStore:
    return SQLiteTokenStore(tmp_path / "bayes.sqlite")


def test_chi2q_matches_known_values() -> None:
    # P(chi2 >= x) for even degrees of freedom: exp(-x/2) * sum (x/2)^i / i!
    assert chi2q(0.0, 2) == 1.0
    assert chi2q(2.0, 2) == pytest.approx(math.exp(-1.0))
    assert chi2q(10.0, 10) == pytest.approx(0.44049, abs=1e-5)
    assert chi2q(1e6, 300) == pytest.approx(0.0, abs=1e-12)


def test_learn_unlearn_symmetry(store: SQLiteTokenStore) -> None:
    ham, spam = _items("ham"), _items("spam")
    store.learn(ham[:20])
    before = _snapshot(store)
    assert store.learn(spam[:15]) == (15, 0)
    assert store.totals() == (15, 20)
    assert store.unlearn((d, t) for d, t, _l in spam[:15]) == 15
    assert _snapshot(store) == before          # every count back where it was, no stray rows
    assert store.unlearn((d, t) for d, t, _l in spam[:15]) == 0   # nothing left to forget


def test_learning_twice_does_not_count_twice(store: SQLiteTokenStore) -> None:
    spam = _items("spam")[:10]
    assert store.learn(spam) == (10, 0)
    once = _snapshot(store)
    assert store.learn(spam) == (0, 10)
    assert _snapshot(store) == once
    # Duplicates inside one batch are skipped too.
    store2 = SQLiteTokenStore(":memory:")
    assert store2.learn(spam + spam) == (10, 10)


def test_relearning_as_the_other_class_moves_the_message(store: SQLiteTokenStore, tmp_path: Path) -> None:
    ham = _items("ham")[:10]
    message = _items("spam")[0]
    store.learn(ham + [message])
    store.learn([(message[0], message[1], "ham")])     # the user says: not spam after all
    assert store.totals() == (0, 11)
    direct = SQLiteTokenStore(tmp_path / "direct.sqlite")
    direct.learn(ham + [(message[0], message[1], "ham")])
    assert _snapshot(store) == _snapshot(direct)
    assert store.learned_label(message[0]) == "ham"


def test_does_not_vote_before_the_minimum(store: SQLiteTokenStore) -> None:
    store.learn(_items("ham")[:10] + _items("spam")[:4])
    classifier = BayesClassifier(store, BayesSettings(min_spam=5, min_ham=5))
    result = classifier.score_tokens(_items("spam", "eval")[0][1])
    assert result.probability is None and (result.nspam, result.nham) == (4, 10)
    store.learn(_items("spam")[4:6])
    assert classifier.score_tokens(_items("spam", "eval")[0][1]).probability is not None


def test_separates_ham_from_spam(store: SQLiteTokenStore) -> None:
    store.learn(_items("ham") + _items("spam"))
    classifier = BayesClassifier(store, BayesSettings(min_spam=10, min_ham=10))
    spam = [classifier.score_tokens(t).probability for _d, t, _l in _items("spam", "eval")]
    ham = [classifier.score_tokens(t).probability for _d, t, _l in _items("ham", "eval")]
    assert sum(p > 0.9 for p in spam) >= 0.8 * len(spam)
    assert sum(p < 0.1 for p in ham) >= 0.8 * len(ham)
    assert classifier.score_tokens([]).probability == 0.5     # no clues: unsure
    explained = classifier.score_tokens(_items("spam", "eval")[0][1], explain=3)
    assert len(explained.top) == 3 and explained.clues > 3


def test_export_import_round_trip(store: SQLiteTokenStore, tmp_path: Path) -> None:
    store.set_meta("tokenizer", "1")
    store.learn(_items("ham")[:12] + _items("spam")[:9])
    export = tmp_path / "bayes.tsv.gz"
    written = store.export(export)
    assert written == store.token_count()
    copy = SQLiteTokenStore(tmp_path / "copy.sqlite")
    assert copy.import_export(export) == written
    assert _snapshot(copy) == _snapshot(store)
    assert copy.meta("tokenizer") == "1"
    # learned digests travel with the export: learning the same message again is a no-op
    assert copy.learn(_items("spam")[:2]) == (0, 2)
    assert store.export(tmp_path / "min2.tsv.gz", min_count=2) < written
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(Exception):
        copy.import_export(bad)


def test_not_a_bayes_database(tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE x (y)").connection.commit()
    with pytest.raises(StoreError):
        SQLiteTokenStore(other, readonly=True)
    with pytest.raises(StoreError):
        SQLiteTokenStore(tmp_path / "missing.sqlite", readonly=True)


def test_readers_go_on_while_a_learner_writes(tmp_path: Path) -> None:
    path = tmp_path / "bayes.sqlite"
    writer = SQLiteTokenStore(path)
    writer.learn(_items("ham")[:10] + _items("spam")[:10])
    reader = SQLiteTokenStore(path, readonly=True, busy_timeout_ms=50, snapshot_after=0)  # reads SQLite
    tokens = _items("spam", "eval")[0][1]
    before = reader.counts(tokens)
    # Hold the write lock (an open learn transaction) and read from other threads meanwhile.
    conn = writer._conn()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE tokens SET spam = spam + 100")
    seen: list[dict[str, tuple[int, int]]] = []
    thread = threading.Thread(target=lambda: seen.append(reader.counts(tokens)))
    thread.start()
    thread.join(5)
    conn.execute("ROLLBACK")
    assert seen == [before]          # WAL: the reader saw the last committed state, unblocked
    # A second writer waits busy_timeout_ms and then fails instead of hanging.
    conn.execute("BEGIN IMMEDIATE")
    other = SQLiteTokenStore(path, busy_timeout_ms=50)
    with pytest.raises(sqlite3.OperationalError):
        other.learn(_items("ham")[10:12])
    conn.execute("ROLLBACK")


def test_bands() -> None:
    assert [band(p) for p in (0.0, 0.009, 0.01, 0.2, 0.5, 0.7, 0.9, 0.97, 0.995, 1.0)] == [
        "BAYES_00", "BAYES_00", "BAYES_05", "BAYES_40", "BAYES_50", "BAYES_60", "BAYES_80", "BAYES_95",
        "BAYES_99", "BAYES_99"]


def _engine(make_engine, tmp_path: Path, **bayes):  # type: ignore[no-untyped-def]
    from trustmilter import checks
    overrides = {m.NAME: {"enabled": False} for m in checks.ALL if m.NAME not in ("bayes",)}
    overrides["bayes"] = {"path": str(tmp_path / "bayes.sqlite"), "seed_from_model": False,
                          "min_spam": 10, "min_ham": 10, **bayes}
    return make_engine(overrides)


def test_check_symbols_in_the_verdict(make_engine, tmp_path: Path) -> None:
    store = SQLiteTokenStore(tmp_path / "bayes.sqlite")
    store.learn(_items("ham") + _items("spam"))
    engine = _engine(make_engine, tmp_path)
    spam = (SMALL / "eval" / "spam" / "000.eml").read_bytes()
    verdict = evaluate(Envelope(), spam, engine)
    names = verdict.symbol_names()
    assert any(n in ("BAYES_99", "BAYES_95") for n in names), names
    symbol = next(s for s in verdict.symbols if s.name.startswith("BAYES_9"))
    assert symbol.score == engine.config.score(symbol.name) and "clues" in symbol.reason
    ham = (SMALL / "eval" / "ham" / "000.eml").read_bytes()
    assert "BAYES_00" in evaluate(Envelope(), ham, engine).symbol_names()


def test_check_is_silent_until_trained_and_an_unreadable_store_is_a_symbol(make_engine, tmp_path: Path) -> None:
    engine = _engine(make_engine, tmp_path)
    raw = (SMALL / "eval" / "spam" / "000.eml").read_bytes()
    assert not [n for n in evaluate(Envelope(), raw, engine).symbol_names() if n.startswith("BAYES")]
    (tmp_path / "bayes.sqlite").unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"bayes.sqlite{suffix}").unlink(missing_ok=True)
    (tmp_path / "bayes.sqlite").mkdir()        # the file turned into something unreadable
    store = engine.state["content.bayes"].store
    store.close()
    store._state = None              # the totals are re-read at most once a second
    assert "BAYES_ERROR" in evaluate(Envelope(), raw, engine).symbol_names()


def test_a_new_or_empty_database_is_seeded_from_the_promoted_model(tmp_path: Path) -> None:
    from trustmilter.content.registry import SHIPPED_MODELS, open_bayes_store
    model = {"dir": str(SHIPPED_MODELS)}
    fresh = open_bayes_store({"path": str(tmp_path / "new.sqlite")}, model)
    nspam, nham = fresh.totals()
    assert nspam > 1000 and nham > 3000 and fresh.meta("tokenizer")
    empty = SQLiteTokenStore(tmp_path / "empty.sqlite")          # created before any model existed
    empty.close()
    assert open_bayes_store({"path": str(tmp_path / "empty.sqlite")}, model).totals() == (nspam, nham)
    learned = SQLiteTokenStore(tmp_path / "learned.sqlite")
    learned.learn(_items("ham")[:3])
    learned.close()
    assert open_bayes_store({"path": str(tmp_path / "learned.sqlite")}, model).totals() == (0, 3)
    unseeded = open_bayes_store({"path": str(tmp_path / "none.sqlite"), "seed_from_model": False}, model)
    assert unseeded.totals() == (0, 0)
