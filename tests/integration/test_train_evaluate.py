"""The analyst's loop end to end through the CLI on a small fixture corpus: train (Bayes + model,
card), evaluate (per scorer and combined, JSON, ROC plot, recorded in the card), learn (feedback,
idempotent, forget), models list/show/promote."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trustmilter.cli import main

SMALL = Path(__file__).resolve().parents[1] / "fixtures" / "corpus-small"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "local.yaml").write_text(
        f"state:\n  dir: {tmp_path / 'state'}\n"
        "bayes:\n"
        f"  path: {tmp_path / 'live.sqlite'}\n"
        "  min_spam: 10\n"
        "  min_ham: 10\n", encoding="utf-8")
    return tmp_path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_train_evaluate_learn_and_models(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = ["--config", str(workdir / "local.yaml"), "--models-dir", str(workdir / "models"), "--no-progress"]
    code, out = _run(capsys, "train", "--ham", str(SMALL / "train" / "ham"), "--spam", str(SMALL / "train" / "spam"),
                     "--name", "small-1", "--promote", "--json", "--corpus-description", "fixture corpus", *config)
    assert code == 0
    card = json.loads(out)
    assert card["corpus"]["counts"]["ham"] == 45 and card["corpus"]["counts"]["spam"] == 45
    assert card["bayes"]["nspam"] == 45 and card["bayes"]["nham"] == 45
    assert set(card["files"]) == {"model.skops", "bayes.tsv.gz"}
    assert card["libraries"]["scikit-learn"] and card["features"]["hash_bits"] == 20
    assert (workdir / "models" / "CURRENT").read_text().strip() == "small-1"

    # A second model of the same name is refused, not overwritten.
    assert main(["train", "--ham", str(SMALL / "train" / "ham"), "--spam", str(SMALL / "train" / "spam"),
                 "--name", "small-1", *config]) == 2
    capsys.readouterr()

    plot = workdir / "roc.png"
    code, out = _run(capsys, "evaluate", "--ham", str(SMALL / "eval" / "ham"), "--spam", str(SMALL / "eval" / "spam"),
                     "--json", "--plot", str(plot), "--record", "--per-message", str(workdir / "rows.csv"), *config)
    assert code == 0
    summary = json.loads(out)
    # 15 files + a 5-message mbox of ham; 20 spam.
    assert summary["messages"] == {"ham": 20, "spam": 20}
    for key in ("bayes_scorer", "model_scorer", "content", "combined"):
        m = summary[key]
        assert m["auc"] >= 0.95, (key, m)
        assert set(m["confusion"]) == {"ham_as_ham", "ham_as_spam", "spam_as_ham", "spam_as_spam"}
        assert sum(m["confusion"].values()) == 40
        assert 0.0 <= m["recall_at_fpr_0.1pct"] <= m["recall_at_fpr_1pct"] <= 1.0
    assert "offline" in summary["combined_setting"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((workdir / "rows.csv").read_text().splitlines()) == 41
    recorded = json.loads((workdir / "models" / "small-1" / "card.json").read_text())["metrics"]
    assert recorded["bayes"]["auc"] == summary["bayes_scorer"]["auc"]

    # Human-readable report too.
    code, out = _run(capsys, "evaluate", "--ham", str(SMALL / "eval" / "ham"), "--spam", str(SMALL / "eval" / "spam"), *config)
    assert code == 0 and "recall@FPR<=0.1%" in out and "combined" in out

    # learn: the live database is seeded from the promoted model, then takes feedback once.
    message = SMALL / "eval" / "spam" / "000.eml"
    code, out = _run(capsys, "learn", "--spam", str(message), "--json", *config)
    first = json.loads(out)
    assert (first["learned"], first["already_learned"], first["nspam"], first["nham"]) == (1, 0, 46, 45)
    # Reputation is corrected too where it can be: this saved message has no history entry and
    # none of our Authentication-Results, so it names no identity to correct.
    assert first["reputation"] == {"none": 1}
    code, out = _run(capsys, "learn", "--spam", str(message), "--json", *config)
    assert json.loads(out)["already_learned"] == 1 and json.loads(out)["nspam"] == 46
    code, out = _run(capsys, "learn", "--ham", str(message), "--json", *config)   # the user corrects it
    moved = json.loads(out)
    assert (moved["nspam"], moved["nham"]) == (45, 46)
    code, out = _run(capsys, "learn", "--forget", str(message), "--json", *config)
    assert json.loads(out)["unlearned"] == 1
    code, out = _run(capsys, "learn", "--forget", str(message), "--json", *config)
    assert json.loads(out)["not_learned"] == 1

    code, out = _run(capsys, "models", "list", "--json", *config)
    listed = json.loads(out)["models"]
    assert [(m["name"], m["current"]) for m in listed] == [("small-1", True)]
    assert listed[0]["auc"] == summary["combined"]["auc"]
    code, out = _run(capsys, "models", "show", *config)
    assert json.loads(out)["name"] == "small-1"
    assert main(["models", "promote", "no-such-model", *config]) == 2
    code, out = _run(capsys, "models", "promote", "small-1", "--bayes-db", str(workdir / "fresh.sqlite"), *config)
    assert code == 0 and "replaced" in out


def test_out_of_core_training(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(capsys, "train", "--ham", str(SMALL / "train" / "ham"), "--spam", str(SMALL / "train" / "spam"),
                     "--out", str(workdir / "ooc"), "--out-of-core", "--json", "--no-progress",
                     "--config", str(workdir / "local.yaml"))
    assert code == 0
    assert "SGDClassifier" in json.loads(out)["model"]["algorithm"]
