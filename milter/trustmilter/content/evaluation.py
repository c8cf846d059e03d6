"""``trustmilter evaluate``: score labelled mail with Bayes, the model and the whole pipeline
(the combined verdict), and report ROC AUC, error rates at the configured thresholds, spam
recall at FPR <= 0.1 % and <= 1 %, and the confusion matrix of each.

The combined verdict is ``pipeline.evaluate`` with every check present, but without network:
the client IP is unknown (so IP checks report none) and every DNS query fails at once as a
temperror (so SPF, DKIM, DMARC and the lists add their no-information scores). Saved mail has
no live sender to check; a site measuring its own traffic passes ``--resolver`` and the
envelope facts are then taken from the Received headers as ``scan`` does.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from trustmilter.dns import Answer, Resolver
from trustmilter.errors import DNSTempError, TrustmilterError


class OfflineResolver(Resolver):
    """A resolver with no network: every lookup is a temperror, at once."""

    def __init__(self) -> None:
        super().__init__(server="127.0.0.1", timeout=0.01, cache_size=0)
        self.server = "offline"

    def query(self, name: str, rdtype: str, timeout: float | None = None) -> Answer:  # noqa: ARG002
        raise DNSTempError("offline evaluation: no DNS")


def recall_at_fpr(ham: Sequence[float], spam: Sequence[float], max_fpr: float) -> tuple[float, float]:
    """Best spam recall with a threshold whose ham false-positive rate is <= max_fpr, a message
    counting as spam when its score is strictly above the threshold (the peers' method)."""
    allowed = math.floor(max_fpr * len(ham) + 1e-9)
    ordered = sorted(ham, reverse=True)
    threshold = ordered[allowed] if allowed < len(ordered) else -math.inf
    return (sum(1 for s in spam if s > threshold) / len(spam) if spam else 0.0), threshold


def metrics(ham: Sequence[float], spam: Sequence[float], threshold: float) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score
    fp = sum(1 for s in ham if s >= threshold)
    fn = sum(1 for s in spam if s < threshold)
    out: dict[str, Any] = {"ham": len(ham), "spam": len(spam), "threshold": threshold}
    if ham and spam:
        out["auc"] = round(float(roc_auc_score([0] * len(ham) + [1] * len(spam), list(ham) + list(spam))), 5)
    r01, t01 = recall_at_fpr(ham, spam, 0.001)
    r1, t1 = recall_at_fpr(ham, spam, 0.01)
    out.update({
        "fpr": round(fp / len(ham), 5) if ham else None, "fnr": round(fn / len(spam), 5) if spam else None,
        "recall_at_fpr_0.1pct": round(r01, 4), "threshold_fpr_0.1pct": t01,
        "recall_at_fpr_1pct": round(r1, 4), "threshold_fpr_1pct": t1,
        "confusion": {"ham_as_ham": len(ham) - fp, "ham_as_spam": fp, "spam_as_ham": fn, "spam_as_spam": len(spam) - fn},
    })
    return out


def _envelope(raw: bytes, offline: bool, engine: Any) -> Any:
    from trustmilter.message import ParsedMessage
    from trustmilter.scan import EnvelopeOptions, infer_envelope
    from trustmilter.types import Envelope
    msg = ParsedMessage.parse(raw)
    if not offline:
        return infer_envelope(msg, EnvelopeOptions(), engine)
    return_path = (msg.get("Return-Path") or "").strip().strip("<>").strip()
    mail_from = return_path or (msg.from_addresses[0] if msg.from_addresses else "")
    return Envelope(client_ip=None, mail_from=mail_from,
                    assumptions=("offline evaluation: client IP unknown, DNS unavailable",))


def evaluate_corpus(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from trustmilter.config import load_config
    from trustmilter.content import analyze
    from trustmilter.content.bayes import BayesClassifier, BayesSettings
    from trustmilter.content.cli import _labelled, _count
    from trustmilter.content.features import Limits
    from trustmilter.content.model import load_model
    from trustmilter.content.registry import bayes_export_of, resolve_model_path
    from trustmilter.message import ParsedMessage
    from trustmilter.pipeline import Engine, evaluate
    from trustmilter.store.sqlite import SQLiteTokenStore
    from trustmilter.types import Action

    base = load_config(args.config)
    model_section = dict(base.section("model"))
    if args.models_dir:
        model_section["dir"] = args.models_dir
    model_path = Path(args.model) if args.model else resolve_model_path(model_section)
    tmp = tempfile.TemporaryDirectory(prefix="trustmilter-eval-")
    if args.bayes_db:
        bayes_path = Path(args.bayes_db)
        bayes_source = str(bayes_path)
    elif args.live_bayes:
        from trustmilter.content.registry import bayes_section_for
        bayes_path = Path(bayes_section_for(base)["path"])
        bayes_source = str(bayes_path)
    else:
        export = bayes_export_of(model_path)
        if export is None:
            raise TrustmilterError(f"{model_path}: no Bayes export; pass --bayes-db")
        bayes_path = Path(tmp.name) / "bayes.sqlite"
        SQLiteTokenStore(bayes_path).import_export(export)
        bayes_source = f"{export} (the model's own Bayes)"
    overrides: dict[str, Any] = {"model": {"path": str(model_path)},
                                 "bayes": {"path": str(bayes_path), "seed_from_model": False}}
    if args.resolver:
        overrides["dns"] = {"server": args.resolver}
    for name in getattr(args, "disable", None) or ():
        if name in ("bayes", "model"):
            raise TrustmilterError("evaluate needs the bayes and model checks")
        overrides[name] = {"enabled": False}
    config = load_config(args.config, overrides)
    engine = Engine.from_config(config)
    offline = not args.resolver
    if offline:
        engine.resolver = OfflineResolver()
    for name in ("bayes", "model"):
        if name in engine.disabled:
            raise TrustmilterError(f"the {name} check could not start: {engine.disabled[name]}")
    limits = Limits.from_config(config.data.get("content"))
    model = load_model(model_path)
    classifier = BayesClassifier(SQLiteTokenStore(bayes_path, readonly=True),
                                 BayesSettings.from_config(config.section("bayes")))
    total = _count(args.ham) + _count(args.spam)
    bar = tqdm(total=total, desc="evaluating", unit="msg", disable=bool(args.no_progress) or None,
               file=sys.stderr, leave=False)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name, raw, is_spam in _labelled(args.ham, args.spam):
        message = ParsedMessage.parse(raw)
        features, tokens = analyze(message, limits)
        bayes = classifier.score_tokens(tokens)
        p_model = model.probability(features, tokens)
        verdict = evaluate(_envelope(raw, offline, engine), raw, engine)
        rows.append({"file": name, "label": "spam" if is_spam else "ham",
                     "bayes": bayes.probability if bayes.probability is not None else 0.5,
                     "model": p_model, "score": verdict.score,
                     "content": round(sum(s.score for s in verdict.symbols
                                          if s.name.startswith(("BAYES_", "ML_"))), 3),
                     "junked": verdict.action is not Action.INBOX, "action": verdict.action.value,
                     "symbols": " ".join(s.name for s in verdict.symbols if s.score)})
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - started

    def split(key: str) -> tuple[list[float], list[float]]:
        return ([float(r[key]) for r in rows if r["label"] == "ham"],
                [float(r[key]) for r in rows if r["label"] == "spam"])

    summary: dict[str, Any] = {
        "model": str(model_path), "bayes": bayes_source,
        "messages": {"ham": sum(r["label"] == "ham" for r in rows), "spam": sum(r["label"] == "spam" for r in rows)},
        "evaluated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(elapsed, 2),
        "combined_setting": ("pipeline.evaluate, all checks, offline: client IP unknown, every DNS "
                             "query a temperror" if offline else f"pipeline.evaluate with resolver {args.resolver}"),
    }
    summary["bayes_scorer"] = metrics(*split("bayes"), float(config.section("bayes")["spam_probability"]))
    summary["model_scorer"] = metrics(*split("model"), float(config.section("model")["spam_probability"]))
    # Bayes and the model together, as the verdict scores them (their symbols' sum), without the
    # other checks: what content scoring contributes on its own.
    summary["content"] = metrics(*split("content"), float(config.section("actions")["junk"]))
    combined = metrics(*split("score"), float(config.section("actions")["junk"]))
    # The verdict's action (forced actions included) decides what was junked.
    ham_junked = sum(1 for r in rows if r["label"] == "ham" and r["junked"])
    spam_missed = sum(1 for r in rows if r["label"] == "spam" and not r["junked"])
    combined["fpr"] = round(ham_junked / max(1, combined["ham"]), 5)
    combined["fnr"] = round(spam_missed / max(1, combined["spam"]), 5)
    combined["confusion"] = {"ham_as_ham": combined["ham"] - ham_junked, "ham_as_spam": ham_junked,
                             "spam_as_ham": spam_missed, "spam_as_spam": combined["spam"] - spam_missed}
    summary["combined"] = combined
    summary["worst_ham"] = sorted(({"file": r["file"], "score": r["score"], "bayes": round(r["bayes"], 4),
                                    "model": round(r["model"], 4), "symbols": r["symbols"]}
                                   for r in rows if r["label"] == "ham"), key=lambda r: -r["score"])[:5]
    if args.per_message:
        with open(args.per_message, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()) if rows else ["file"])
            writer.writeheader()
            writer.writerows(rows)
    if args.record:
        from trustmilter.content.model import read_card, write_card
        card = read_card(model_path)
        recorded = {"evaluated": summary["evaluated"], "setting": summary["combined_setting"],
                    "ham_paths": [str(p) for p in args.ham], "spam_paths": [str(p) for p in args.spam],
                    "disabled_checks": list(getattr(args, "disable", None) or ()),
                    "messages": summary["messages"], "bayes": summary["bayes_scorer"],
                    "model": summary["model_scorer"], "content": summary["content"],
                    "combined": summary["combined"]}
        if args.record == "test_split":
            card["metrics"] = recorded
        else:
            card.setdefault("evaluations", {})[args.record] = recorded
        write_card(model_path, card)
    tmp.cleanup()
    return {"summary": summary, "rows": rows}


def format_report(summary: dict[str, Any]) -> str:
    lines = [f"model: {summary['model']}", f"bayes: {summary['bayes']}",
             f"messages: {summary['messages']['ham']} ham, {summary['messages']['spam']} spam "
             f"({summary['seconds']} s)", f"combined verdict: {summary['combined_setting']}", ""]
    header = f"{'':<10}{'AUC':>8}{'FPR':>8}{'FNR':>8}{'recall@FPR<=0.1%':>18}{'recall@FPR<=1%':>16}  threshold"
    lines.append(header)
    for key, label in (("bayes_scorer", "bayes"), ("model_scorer", "model"), ("content", "content"),
                       ("combined", "combined")):
        m = summary[key]
        lines.append(f"{label:<10}{m.get('auc', float('nan')):>8.4f}{100 * m['fpr']:>7.2f}%{100 * m['fnr']:>7.2f}%"
                     f"{100 * m['recall_at_fpr_0.1pct']:>17.1f}%{100 * m['recall_at_fpr_1pct']:>15.1f}%  {m['threshold']:g}")
    lines.append("")
    lines.append("content = the Bayes and model symbols' scores summed; combined = the whole verdict")
    lines.append("confusion (ham as ham / ham as spam / spam as ham / spam as spam):")
    for key, label in (("bayes_scorer", "bayes"), ("model_scorer", "model"), ("content", "content"),
                       ("combined", "combined")):
        c = summary[key]["confusion"]
        lines.append(f"  {label:<9} {c['ham_as_ham']} / {c['ham_as_spam']} / {c['spam_as_ham']} / {c['spam_as_spam']}")
    if summary.get("worst_ham"):
        lines.append("")
        lines.append("highest-scoring ham:")
        for r in summary["worst_ham"][:3]:
            lines.append(f"  {r['score']:>6.2f}  {r['file']}  ({r['symbols']})")
    return "\n".join(lines)


def plot_roc(report: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve
    rows = report["rows"]
    y = [1 if r["label"] == "spam" else 0 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    for key, label in (("bayes", "Bayes"), ("model", "model"), ("score", "combined verdict")):
        fpr, tpr, _ = roc_curve(y, [float(r[key]) for r in rows])
        auc = report["summary"]["combined" if key == "score" else f"{key}_scorer"].get("auc")
        ax.plot([max(f, 1e-4) for f in fpr], tpr, label=f"{label} (AUC {auc})")
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(0.5, 1.005)
    ax.axvline(0.001, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate (ham junked), log scale")
    ax.set_ylabel("spam caught")
    ax.set_title("trustmilter content scoring: ROC")
    ax.legend(loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
