"""The analyst's commands: ``train``, ``learn``, ``evaluate`` and ``models list|show|promote``.

    trustmilter train --ham DIR --spam DIR [--name NAME] [--promote]
    trustmilter learn --spam PATH...            (or --ham; --forget to unlearn)
    trustmilter evaluate --ham DIR --spam DIR [--json] [--plot roc.png]
    trustmilter models list | show NAME | promote NAME
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from trustmilter.errors import TrustmilterError


def register_cli(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="local config file (YAML) over the shipped defaults")
    common.add_argument("--models-dir", help="models directory (default: model.dir, else the shipped models/)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")

    train = sub.add_parser("train", parents=[common],
                           help="train Bayes and the content model on ham and spam, write a model directory")
    train.add_argument("--ham", nargs="+", required=True, metavar="PATH", help="ham: files, directories, mbox, Maildir")
    train.add_argument("--spam", nargs="+", required=True, metavar="PATH", help="spam: files, directories, mbox, Maildir")
    train.add_argument("--name", help="model name (default: DATE-TIME)")
    train.add_argument("--out", help="write the model directory here instead of MODELS_DIR/NAME")
    train.add_argument("--corpus-description", default="", help="what the corpus is, for the model card")
    train.add_argument("--split-description", default="", help="how training/test were split, for the card")
    train.add_argument("--extra-ham", nargs="*", default=[], metavar="PATH",
                       help="more ham, weighted by --extra-weight (e.g. recent hand-written examples)")
    train.add_argument("--extra-spam", nargs="*", default=[], metavar="PATH",
                       help="more spam, weighted by --extra-weight")
    train.add_argument("--extra-weight", type=float, default=1.0, help="sample weight of --extra-* messages in the model")
    train.add_argument("--out-of-core", action="store_true", help="train with SGD over chunks on disk even if the corpus fits in memory")
    train.add_argument("--bayes-db", help="also replace this live Bayes database with the new one")
    train.add_argument("--bayes-min-count", type=int, default=1,
                       help="tokens seen fewer times are left out of the exported Bayes (smaller file)")
    train.add_argument("--promote", action="store_true", help="make the new model the one in use")
    train.add_argument("--json", action="store_true", help="print the card as JSON")
    train.set_defaults(func=cmd_train)

    learn = sub.add_parser("learn", parents=[common],
                           help="teach Bayes messages the user marked (as sa-learn; idempotent)")
    group = learn.add_mutually_exclusive_group(required=True)
    group.add_argument("--ham", action="store_true", help="the messages are ham")
    group.add_argument("--spam", action="store_true", help="the messages are spam")
    group.add_argument("--forget", action="store_true", help="unlearn the messages")
    learn.add_argument("paths", nargs="+", metavar="PATH")
    learn.add_argument("--bayes-db", help="Bayes database (default: bayes.path)")
    learn.add_argument("--no-reputation", action="store_true",
                       help="teach Bayes only; by default the reputation of the identities each "
                            "message was authenticated as is corrected too")
    learn.add_argument("--json", action="store_true")
    learn.set_defaults(func=cmd_learn)

    evaluate = sub.add_parser("evaluate", parents=[common],
                              help="score labelled mail: ROC AUC, error rates, recall at low FPR per scorer and combined")
    evaluate.add_argument("--ham", nargs="+", required=True, metavar="PATH")
    evaluate.add_argument("--spam", nargs="+", required=True, metavar="PATH")
    evaluate.add_argument("--model", help="model directory to evaluate (default: the promoted one)")
    evaluate.add_argument("--bayes-db", help="Bayes database to evaluate (default: the model's own Bayes export)")
    evaluate.add_argument("--live-bayes", action="store_true",
                          help="use the live Bayes database (bayes.path) instead of the model's export")
    evaluate.add_argument("--json", action="store_true", help="one JSON object for scripts")
    evaluate.add_argument("--plot", metavar="FILE.png", help="write the ROC curves")
    evaluate.add_argument("--record", nargs="?", const="test_split", metavar="NAME",
                          help="write the metrics into the model's card: as its test-split metrics, or "
                               "(with NAME) under evaluations.NAME")
    evaluate.add_argument("--per-message", metavar="FILE.csv", help="write every message's scores")
    evaluate.add_argument("--resolver", metavar="HOST[:PORT]",
                          help="run the authentication checks against this DNS resolver (default: no network)")
    evaluate.add_argument("--disable", action="append", default=[], metavar="CHECK",
                          help="leave a check out of the combined verdict (repeatable)")
    evaluate.set_defaults(func=cmd_evaluate)

    models = sub.add_parser("models", help="list, show or promote trained models")
    msub = models.add_subparsers(dest="models_command", required=True)
    mlist = msub.add_parser("list", parents=[common], help="the models and which is in use")
    mlist.add_argument("--json", action="store_true")
    show = msub.add_parser("show", parents=[common], help="a model's card")
    show.add_argument("name", nargs="?", help="model name (default: the one in use)")
    promote = msub.add_parser("promote", parents=[common], help="make a model the one in use (checks it loads)")
    promote.add_argument("name")
    promote.add_argument("--bayes-db", help="also replace this live Bayes database with the model's Bayes")
    models.set_defaults(func=cmd_models)


# ---- helpers ----------------------------------------------------------------------------------
def _config(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Any:
    from trustmilter.config import load_config
    return load_config(getattr(args, "config", None), overrides or None)


def _models_dir(args: argparse.Namespace, config: Any) -> Path:
    from trustmilter.content.registry import models_dir
    return models_dir(args.models_dir or str(config.section("model").get("dir") or ""))


def _progress(args: argparse.Namespace, total: int | None, desc: str) -> Any:
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="msg", disable=bool(args.no_progress) or None,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def _labelled(ham: list[str], spam: list[str]) -> Iterator[tuple[str, bytes, bool]]:
    """Ham and spam interleaved in proportion, so chunked (out-of-core) training sees both."""
    from trustmilter.sources import iter_messages
    ham_items = list(_paths_expanded(ham))
    spam_items = list(_paths_expanded(spam))
    total = len(ham_items) + len(spam_items)
    hi = si = 0
    for _ in range(total):
        take_spam = si < len(spam_items) and (hi >= len(ham_items) or si * len(ham_items) <= hi * len(spam_items))
        if take_spam:
            label, path = True, spam_items[si]
            si += 1
        else:
            label, path = False, ham_items[hi]
            hi += 1
        for name, raw in iter_messages([path]):
            yield name, raw, label


def _paths_expanded(paths: list[str]) -> Iterator[str]:
    """Message files under directories (so they can be counted and interleaved); mbox files
    and Maildirs stay whole."""
    import os
    from trustmilter.errors import MessageSourceError
    for item in paths:
        path = Path(item)
        if not path.exists():
            raise MessageSourceError(f"{item}: no such file or directory")
        if path.is_dir() and not ((path / "cur").is_dir() and (path / "new").is_dir()):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if not name.startswith(".") and not name.endswith(".json"):
                        yield str(Path(root) / name)
        else:
            yield str(path)


def _count(paths: list[str]) -> int:
    return sum(1 for _ in _paths_expanded(paths))


# ---- train ------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    import tempfile

    from trustmilter.content import analyze
    from trustmilter.content.bayes import TOKENIZER_VERSION, message_digest
    from trustmilter.content.features import Limits
    from trustmilter.content.model import (BAYES_EXPORT_FILE, ChunkSpill, FeatureSettings, TrainSettings,
                                           Vectorizer, fit, library_versions, sha256_file, write_card)
    from trustmilter.content.registry import promote
    from trustmilter.message import ParsedMessage
    from trustmilter.store.sqlite import SQLiteTokenStore

    config = _config(args)
    limits = Limits.from_config(config.data.get("content"))
    started = time.perf_counter()
    name = args.name or time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) if args.out else _models_dir(args, config) / name
    if (out_dir / "card.json").exists():
        raise TrustmilterError(f"{out_dir}: a model of that name exists")
    feature_settings = FeatureSettings()
    train_settings = TrainSettings()
    if args.out_of_core:
        train_settings.in_memory_limit = 0
    spill = ChunkSpill(Vectorizer(feature_settings), train_settings.chunk_size)
    total = _count(args.ham) + _count(args.spam) + _count(args.extra_ham) + _count(args.extra_spam)
    bar = _progress(args, total, "reading")
    tmp = tempfile.TemporaryDirectory(prefix="trustmilter-bayes-")
    store = SQLiteTokenStore(Path(tmp.name) / "bayes.sqlite")
    store.set_meta("tokenizer", TOKENIZER_VERSION)
    pending: list[tuple[str, list[str], str]] = []
    counts = {"ham": 0, "spam": 0, "extra_ham": 0, "extra_spam": 0, "duplicates": 0, "unreadable": 0}
    seen: set[str] = set()

    def feed(messages: Iterator[tuple[str, bytes, bool]], weight: float, extra: bool) -> None:
        for _label, raw, is_spam in messages:
            bar.update(1)
            message = ParsedMessage.parse(raw)
            digest = message_digest(message)
            if digest in seen:
                counts["duplicates"] += 1
                continue
            seen.add(digest)
            features, tokens = analyze(message, limits)
            spill.add(features, tokens, is_spam, weight)
            pending.append((digest, tokens, "spam" if is_spam else "ham"))
            key = ("extra_" if extra else "") + ("spam" if is_spam else "ham")
            counts[key] += 1
            if len(pending) >= 5000:
                store.learn(pending)
                pending.clear()

    try:
        feed(_labelled(args.ham, args.spam), 1.0, False)
        if args.extra_ham or args.extra_spam:
            feed(_labelled(args.extra_ham, args.extra_spam), args.extra_weight, True)
        store.learn(pending)
        pending.clear()
        bar.close()
        read_seconds = time.perf_counter() - started
        fit_bar = _progress(args, None, "fitting")

        def on_progress(done: int, of: int) -> None:
            fit_bar.total = of
            fit_bar.n = done
            fit_bar.refresh()

        model, notes = fit(spill, feature_settings, train_settings, on_progress)
        fit_bar.close()
        out_dir.mkdir(parents=True, exist_ok=True)
        export_path = out_dir / BAYES_EXPORT_FILE
        exported = store.export(export_path, min_count=args.bayes_min_count)
        nspam, nham = store.totals()
        card: dict[str, Any] = {
            "name": out_dir.name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "corpus": {"description": args.corpus_description,
                       "ham_paths": [str(p) for p in args.ham], "spam_paths": [str(p) for p in args.spam],
                       "extra_ham_paths": [str(p) for p in args.extra_ham],
                       "extra_spam_paths": [str(p) for p in args.extra_spam],
                       "extra_weight": args.extra_weight, "counts": counts},
            "split": args.split_description,
            "model": notes,
            "bayes": {"tokenizer": TOKENIZER_VERSION, "nspam": nspam, "nham": nham,
                      "tokens_exported": exported, "export_min_count": args.bayes_min_count},
            "content_limits": {"max_bytes": limits.max_bytes, "max_text_chars": limits.max_text_chars,
                               "max_parts": limits.max_parts},
            "libraries": library_versions(),
            "train_seconds": {"read_and_tokenize": round(read_seconds, 2)},
            "files": {BAYES_EXPORT_FILE: {"sha256": sha256_file(export_path),
                                          "bytes": export_path.stat().st_size}},
            "metrics": {},
        }
        model.save(out_dir, card)
        card = model.card
        card["train_seconds"]["total"] = round(time.perf_counter() - started, 2)
        write_card(out_dir, card)
        if args.bayes_db:
            live = SQLiteTokenStore(args.bayes_db)
            live.import_export(export_path)
            live.close()
        if args.promote:
            promote(out_dir.parent, out_dir.name)
    finally:
        store.close()
        tmp.cleanup()
        spill.close()
    if args.json:
        print(json.dumps(card, indent=2))
    else:
        print(f"trained {out_dir} in {card['train_seconds']['total']:.1f} s: "
              f"{counts['ham'] + counts['extra_ham']} ham, {counts['spam'] + counts['extra_spam']} spam"
              f"{', ' + str(counts['duplicates']) + ' duplicates skipped' if counts['duplicates'] else ''}; "
              f"Bayes {exported} tokens" + ("; promoted" if args.promote else ""))
    return 0


# ---- learn ------------------------------------------------------------------------------------
def cmd_learn(args: argparse.Namespace) -> int:
    from trustmilter.content import analyze
    from trustmilter.content.bayes import TOKENIZER_VERSION, message_digest
    from trustmilter.content.features import Limits
    from trustmilter.content.registry import bayes_section_for, open_bayes_store
    from trustmilter.message import ParsedMessage
    from trustmilter.sources import iter_messages

    overrides = {"bayes": {"path": args.bayes_db}} if args.bayes_db else None
    config = _config(args, overrides)
    limits = Limits.from_config(config.data.get("content"))
    model_section = dict(config.section("model"))
    if args.models_dir:
        model_section["dir"] = args.models_dir
    store = open_bayes_store(bayes_section_for(config), model_section)
    if store.meta("tokenizer") not in (None, "", TOKENIZER_VERSION):
        raise TrustmilterError(f"{store.path}: built with tokenizer {store.meta('tokenizer')}, this is "
                               f"{TOKENIZER_VERSION}; retrain with trustmilter train")
    store.set_meta("tokenizer", TOKENIZER_VERSION)
    label = "spam" if args.spam else "ham"
    feedback, reputation = _reputation_feedback(config, args)
    bar = _progress(args, _count(args.paths), "learning")
    items: list[tuple[str, list[str], str]] = []
    try:
        for _name, raw in iter_messages(list(_paths_expanded(args.paths))):
            message = ParsedMessage.parse(raw)
            _features, tokens = analyze(message, limits)
            items.append((message_digest(message), tokens, label))
            if feedback is not None:
                try:
                    correction = feedback.correct(raw, label)
                    reputation[correction.source] = reputation.get(correction.source, 0) + 1
                except Exception as exc:  # noqa: BLE001 - reputation must not stop Bayes learning
                    reputation["errors"] = reputation.get("errors", 0) + 1
                    reputation["last_error"] = f"{type(exc).__name__}: {exc}"[:200]
            bar.update(1)
    finally:
        bar.close()
        if feedback is not None:
            feedback.close()
    if args.forget:
        done = store.unlearn((d, t) for d, t, _l in items)
        result = {"unlearned": done, "not_learned": len(items) - done}
    else:
        learned, skipped = store.learn(items)
        result = {"learned": learned, "already_learned": skipped, "label": label}
    nspam, nham = store.totals()
    result.update({"nspam": nspam, "nham": nham, "database": store.path})
    if reputation:
        result["reputation"] = reputation
    store.close()
    if args.json:
        print(json.dumps(result))
    else:
        print(", ".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def _reputation_feedback(config: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The reputation correction for ``learn`` (store.feedback), or None when turned off, when
    forgetting (there is no "unsay" for reputation), or when it cannot open (said in the result)."""
    if args.no_reputation or args.forget:
        return None, {}
    section = config.data.get("reputation")
    if isinstance(section, dict) and section.get("enabled") is False:
        return None, {}
    try:
        from trustmilter.store.feedback import ReputationFeedback
        return ReputationFeedback(config), {}
    except Exception as exc:  # noqa: BLE001 - Bayes learning goes on without it
        return None, {"unavailable": f"{type(exc).__name__}: {exc}"[:200]}


# ---- evaluate ---------------------------------------------------------------------------------
def cmd_evaluate(args: argparse.Namespace) -> int:
    from trustmilter.content.evaluation import evaluate_corpus, format_report, plot_roc

    report = evaluate_corpus(args)
    if args.plot:
        plot_roc(report, args.plot)
    if args.json:
        print(json.dumps(report["summary"], indent=2))
    else:
        print(format_report(report["summary"]))
    return 0


# ---- models -----------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> int:
    from trustmilter.content.model import read_card
    from trustmilter.content.registry import current_name, list_models, promote
    from trustmilter.store.sqlite import SQLiteTokenStore

    config = _config(args)
    directory = _models_dir(args, config)
    if args.models_command == "list":
        rows = list_models(directory)
        if args.json:
            print(json.dumps({"dir": str(directory), "models": rows}, indent=2))
            return 0
        if not rows:
            print(f"{directory}: no models")
            return 0
        print(f"models in {directory}:")
        for row in rows:
            mark = "*" if row.get("current") else " "
            auc = row.get("auc")
            recall = row.get("recall_at_fpr_0.1pct")
            extra = (f"AUC {auc:.4f}" if isinstance(auc, (int, float)) else "not evaluated")
            if isinstance(recall, (int, float)):
                extra += f", recall {100 * recall:.1f}% at FPR<=0.1%"
            print(f" {mark} {row['name']:<32} {row.get('created', ''):<22} {row.get('error') or extra}")
        return 0
    if args.models_command == "show":
        name = args.name or current_name(directory)
        if not name:
            raise TrustmilterError(f"{directory}: no model in use; name one")
        print(json.dumps(read_card(directory / name), indent=2))
        return 0
    path = promote(directory, args.name)
    print(f"promoted {path}")
    if args.bayes_db:
        from trustmilter.content.registry import bayes_export_of
        export = bayes_export_of(path)
        if export is None:
            raise TrustmilterError(f"{path}: the model has no Bayes export")
        store = SQLiteTokenStore(args.bayes_db)
        count = store.import_export(export)
        store.close()
        print(f"replaced {args.bayes_db} with {count} tokens from {export}")
    return 0
