"""The scikit-learn content model: safe loading (digest, no unknown types), the fast single-message
path equal to scikit-learn's, out-of-core training, the check's ML_SPAM/ML_HAM strength, and the
shipped model on the hand-written modern holdout."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from trustmilter.checks.model import strength
from trustmilter.content import analyze
from trustmilter.content.features import Limits
from trustmilter.content.model import (CARD_FILE, MODEL_FILE, ChunkSpill, FeatureSettings, ModelError,
                                       TrainSettings, Vectorizer, fit, load_model, sha256_file, write_card)
from trustmilter.content.registry import SHIPPED_MODELS, current_model_path, list_models, promote
from trustmilter.message import ParsedMessage
from trustmilter.pipeline import evaluate
from trustmilter.types import Envelope

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SMALL = FIXTURES / "corpus-small"
HOLDOUT = FIXTURES / "modern" / "holdout"


def _rows(directory: Path) -> list[tuple]:  # type: ignore[type-arg]
    return [analyze(ParsedMessage.parse(p.read_bytes()), Limits()) for p in sorted(directory.glob("*.eml"))]


@pytest.fixture(scope="module")
def shipped() -> Path:
    path = current_model_path(SHIPPED_MODELS)
    assert path is not None, "models/CURRENT must name a shipped model"
    return path


@pytest.fixture
def model_copy(shipped: Path, tmp_path: Path) -> Path:
    target = tmp_path / "m"
    shutil.copytree(shipped, target)
    return target


def test_shipped_model_loads_with_a_complete_card(shipped: Path) -> None:
    model = load_model(shipped)
    card = model.card
    for key in ("created", "corpus", "split", "features", "libraries", "model", "bayes", "files", "metrics"):
        assert card.get(key), key
    assert card["libraries"]["scikit-learn"] and card["metrics"]["combined"]["auc"] > 0.99
    assert card["features"]["structural_features"]


def test_tampered_model_file_is_refused(model_copy: Path) -> None:
    data = bytearray((model_copy / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (model_copy / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        load_model(model_copy)
    with pytest.raises(ModelError):
        promote(model_copy.parent, model_copy.name)
    assert not (model_copy.parent / "CURRENT").exists()


def _replace_model(directory: Path, obj: object) -> None:
    import skops.io as sio
    (directory / MODEL_FILE).write_bytes(sio.dumps(obj))
    card = json.loads((directory / CARD_FILE).read_text())
    card["files"][MODEL_FILE]["sha256"] = sha256_file(directory / MODEL_FILE)   # digest matches
    write_card(directory, card)


def test_unknown_types_are_refused_even_with_a_matching_digest(model_copy: Path) -> None:
    from sklearn.preprocessing import FunctionTransformer
    _replace_model(model_copy, {"format": 1, "classifier": FunctionTransformer(func=eval), "calibrator": None})
    with pytest.raises(ModelError, match="unknown types"):
        load_model(model_copy)


def test_only_the_linear_estimators_are_accepted(model_copy: Path) -> None:
    # Trusted by skops, but not what we save: refused all the same.
    from sklearn.naive_bayes import MultinomialNB
    X, y = np.array([[0.0], [1.0]]), np.array([0, 1])
    _replace_model(model_copy, {"format": 1, "classifier": MultinomialNB().fit(X, y),
                                "calibrator": MultinomialNB().fit(X, y)})
    with pytest.raises(ModelError, match="not an allowed estimator"):
        load_model(model_copy)


def test_not_a_skops_file(model_copy: Path) -> None:
    with zipfile.ZipFile(model_copy / MODEL_FILE, "w") as z:
        z.writestr("schema.json", "{}")
    _card = json.loads((model_copy / CARD_FILE).read_text())
    _card["files"][MODEL_FILE]["sha256"] = sha256_file(model_copy / MODEL_FILE)
    write_card(model_copy, _card)
    with pytest.raises(ModelError):
        load_model(model_copy)
    (model_copy / CARD_FILE).unlink()
    with pytest.raises(ModelError, match="no model card"):
        load_model(model_copy)


def test_fast_path_equals_scikit_learn(shipped: Path) -> None:
    model = load_model(shipped)
    rows = _rows(SMALL / "eval" / "spam") + _rows(SMALL / "eval" / "ham") + _rows(HOLDOUT / "ham")
    fast = np.array([model.probability(f, t) for f, t in rows])
    slow = model.probabilities(rows)
    assert np.max(np.abs(fast - slow)) < 1e-9


def test_shipped_model_on_the_modern_holdout(shipped: Path) -> None:
    """Hand-written 2020s mail the model never trained on: credential phishing, parcel and
    invoice scams, crypto lures, gift-card fraud against newsletters, notifications, lists."""
    model = load_model(shipped)
    spam = [model.probability(f, t) for f, t in _rows(HOLDOUT / "spam")]
    ham = [model.probability(f, t) for f, t in _rows(HOLDOUT / "ham")]
    assert len(spam) >= 10 and len(ham) >= 10
    assert min(spam) > max(ham) - 0.35          # nearly separable: no spam far below the worst ham
    assert sum(p >= 0.5 for p in spam) >= 0.9 * len(spam)
    assert sum(p < 0.5 for p in ham) >= 0.8 * len(ham)


def _train(in_memory_limit: int) -> tuple:  # type: ignore[type-arg]
    settings = FeatureSettings(hash_bits=16)
    spill = ChunkSpill(Vectorizer(settings), chunk_size=16)
    ham, spam = _rows(SMALL / "train" / "ham"), _rows(SMALL / "train" / "spam")
    for i in range(max(len(ham), len(spam))):
        for rows, is_spam in ((ham, False), (spam, True)):
            if i < len(rows):
                spill.add(rows[i][0], rows[i][1], is_spam)
    try:
        return fit(spill, settings, TrainSettings(in_memory_limit=in_memory_limit, epochs=5, calibration_folds=3))
    finally:
        spill.close()


@pytest.mark.parametrize("in_memory_limit", [10 ** 6, 0], ids=["in-memory", "out-of-core"])
def test_training_paths_separate_the_eval_split(in_memory_limit: int, tmp_path: Path) -> None:
    model, notes = _train(in_memory_limit)
    assert ("SGDClassifier" in notes["algorithm"]) == (in_memory_limit == 0)
    model.save(tmp_path / "m", {"name": "m"})
    loaded = load_model(tmp_path / "m")
    spam = [loaded.probability(f, t) for f, t in _rows(SMALL / "eval" / "spam")]
    ham = [loaded.probability(f, t) for f, t in _rows(SMALL / "eval" / "ham")]
    assert sum(p > 0.5 for p in spam) >= 0.9 * len(spam)
    assert sum(p < 0.5 for p in ham) >= 0.9 * len(ham)


def test_training_needs_both_classes() -> None:
    spill = ChunkSpill(Vectorizer(FeatureSettings(hash_bits=12)), chunk_size=8)
    for f, t in _rows(SMALL / "train" / "ham")[:5]:
        spill.add(f, t, False)
    with pytest.raises(ModelError):
        fit(spill, FeatureSettings(hash_bits=12))
    spill.close()


def test_strength_scales_with_log_odds() -> None:
    assert strength(0.5, 0.5, 0.999) == (True, 0.0)
    assert strength(0.999, 0.5, 0.999) == (True, 1.0)
    assert strength(0.9999, 0.5, 0.999) == (True, 1.0)
    side, s = strength(0.9, 0.5, 0.999)
    assert side and 0.3 < s < 0.35                 # logit(0.9)/logit(0.999) = 0.318
    assert strength(0.001, 0.5, 0.999) == (False, 1.0)
    side, s = strength(0.2, 0.5, 0.999)
    assert not side and 0.19 < s < 0.21


def test_check_adds_ml_symbols_scaled_by_strength(make_engine, shipped: Path) -> None:
    from trustmilter import checks
    engine = make_engine({**{m.NAME: {"enabled": False} for m in checks.ALL if m.NAME != "model"},
                          "model": {"path": str(shipped)}})
    spam = evaluate(Envelope(), (HOLDOUT / "spam" / "09-bank-account-locked-lookalike.eml").read_bytes(), engine)
    [symbol] = spam.symbols
    assert symbol.name == "ML_SPAM" and 0 < symbol.score <= engine.config.score("ML_SPAM")
    assert "strength" in symbol.reason
    ham = evaluate(Envelope(), (HOLDOUT / "ham" / "04-lkml-patch.eml").read_bytes(), engine)
    assert ham.symbol_names() == ["ML_HAM"] and ham.symbols[0].score < 0


def test_a_model_that_cannot_load_disables_the_check(make_engine, model_copy: Path) -> None:
    (model_copy / MODEL_FILE).write_bytes(b"tampered")
    engine = make_engine({"model": {"path": str(model_copy)}})
    assert "model" in engine.disabled and "SHA-256" in engine.disabled["model"]


def test_registry_lists_and_promotes(model_copy: Path) -> None:
    directory = model_copy.parent
    assert [row["name"] for row in list_models(directory)] == ["m"]
    promote(directory, "m")
    assert (directory / "CURRENT").read_text().strip() == "m"
    assert current_model_path(directory) == model_copy
    assert list_models(directory)[0]["current"] is True
