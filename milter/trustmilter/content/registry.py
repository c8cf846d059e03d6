"""Where models live and which one is in use.

A models directory holds one sub-directory per trained model (``model.skops``, ``card.json``,
``bayes.tsv.gz``) and a ``CURRENT`` file naming the promoted one. The shipped directory is
``models/`` of the source tree; an installation keeps its own (``model.dir``), and the Bayes
database the milter reads and ``learn`` writes is ``bayes.path``, seeded from the promoted
model's Bayes export the first time it is opened.
"""
from __future__ import annotations

import fcntl

import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from trustmilter.content.model import BAYES_EXPORT_FILE, ModelError, read_card, verify_file
from trustmilter.store.sqlite import DEFAULT_SNAPSHOT_AFTER, SQLiteTokenStore

log = logging.getLogger("trustmilter.content")

CURRENT_FILE = "CURRENT"
INSTALLED_MODELS = Path("/var/lib/trustmilter/models")
DEFAULT_BAYES_PATH = Path("/var/lib/trustmilter/bayes.sqlite")
SHIPPED_MODELS = Path(__file__).resolve().parents[3] / "models"


def models_dir(configured: str = "") -> Path:
    """The configured models directory, else the installed one, else the shipped one."""
    if configured:
        return Path(configured)
    if (INSTALLED_MODELS / CURRENT_FILE).exists():
        return INSTALLED_MODELS
    return SHIPPED_MODELS


def list_models(directory: Path) -> list[dict[str, Any]]:
    out = []
    current = current_name(directory)
    if not directory.is_dir():
        return out
    for sub in sorted(directory.iterdir()):
        if not (sub / "card.json").exists():
            continue
        try:
            card = read_card(sub)
        except ModelError as exc:
            out.append({"name": sub.name, "error": str(exc), "current": sub.name == current})
            continue
        metrics = card.get("metrics", {}).get("combined") or card.get("metrics", {}).get("model") or {}
        out.append({"name": sub.name, "created": card.get("created", ""), "current": sub.name == current,
                    "corpus": (card.get("corpus") or {}).get("description", ""),
                    "auc": metrics.get("auc"), "recall_at_fpr_0.1pct": metrics.get("recall_at_fpr_0.1pct")})
    return out


def current_name(directory: Path) -> str | None:
    try:
        name = (directory / CURRENT_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return name or None


def current_model_path(directory: Path) -> Path | None:
    name = current_name(directory)
    if name is None:
        return None
    path = directory / name
    return path if path.is_dir() else None


def resolve_model_path(section: dict[str, Any]) -> Path:
    """The model the ``model`` check loads: ``model.path`` if set, else the promoted one."""
    if section.get("path"):
        return Path(str(section["path"]))
    directory = models_dir(str(section.get("dir") or ""))
    path = current_model_path(directory)
    if path is None:
        raise ModelError(f"{directory}: no promoted model (trustmilter models promote NAME)")
    return path


def promote(directory: Path, name: str) -> Path:
    """Make ``name`` the model in use, after checking it loads."""
    from trustmilter.content.model import load_model
    path = directory / name
    if not path.is_dir():
        raise ModelError(f"{path}: no such model")
    load_model(path)   # refuses tampered or unknown content before it goes live
    tmp = directory / (CURRENT_FILE + ".tmp")
    tmp.write_text(name + "\n", encoding="utf-8")
    os.replace(tmp, directory / CURRENT_FILE)
    return path


def bayes_export_of(model_path: Path) -> Path | None:
    card = read_card(model_path)
    if BAYES_EXPORT_FILE not in (card.get("files") or {}):
        return None
    return verify_file(model_path, card, BAYES_EXPORT_FILE)


def bayes_section_for(config: Any) -> dict[str, Any]:
    """The ``bayes`` section with ``path`` resolved: empty = ``bayes.sqlite`` in ``state.dir``
    (beside reputation and history)."""
    section = dict(config.section("bayes"))
    if not section.get("path"):
        state_dir = config.get("state.dir") or str(DEFAULT_BAYES_PATH.parent)
        section["path"] = str(Path(str(state_dir)) / "bayes.sqlite")
    return section


def open_bayes_store(bayes_section: dict[str, Any], model_section: dict[str, Any] | None = None,
                     *, readonly: bool = False) -> SQLiteTokenStore:
    """The Bayes token store. A database that does not exist yet is created and seeded from the
    promoted model's Bayes export (``bayes.seed_from_model``), so a fresh install scores out of
    the box. When its directory cannot be written (a read-only checkout, no permission) the
    seed goes to a private temporary file instead and a warning says so: scoring works,
    learning would not persist."""
    path = Path(str(bayes_section.get("path") or DEFAULT_BAYES_PATH))
    if readonly:
        return _open_bayes_store(path, bayes_section, model_section, readonly=True)
    # Several worker processes start at once: without a lock two of them would create and seed
    # the same new database, and one would lose to "database is locked" and run without Bayes.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        return _open_bayes_store(path, bayes_section, model_section, readonly=False)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        return _open_bayes_store(path, bayes_section, model_section, readonly=False)
    finally:
        os.close(lock_fd)   # releases the lock


def _open_bayes_store(path: Path, bayes_section: dict[str, Any],
                      model_section: dict[str, Any] | None, *, readonly: bool
                      ) -> SQLiteTokenStore:
    busy = int(bayes_section.get("busy_timeout_ms", 200))
    snapshot_after = int(bayes_section.get("snapshot_after", DEFAULT_SNAPSHOT_AFTER))
    seed = bool(bayes_section.get("seed_from_model", True))
    if path.exists():
        store = SQLiteTokenStore(path, busy_timeout_ms=busy, readonly=readonly,
                                 snapshot_after=snapshot_after)
        if seed and not readonly and store.totals() == (0, 0) and store.token_count() == 0:
            # Created before any model was there to seed it (or by a test run): nothing was
            # learned into it, so seeding loses nothing.
            export = _seed_export(model_section)
            if export is not None:
                store.import_export(export)
                log.info("seeded the empty %s from %s", path, export)
        return store
    if not seed:
        if readonly:
            raise ModelError(f"{path}: no Bayes database (run trustmilter train or learn)")
        return SQLiteTokenStore(path, busy_timeout_ms=busy,
                                 snapshot_after=snapshot_after)
    export = _seed_export(model_section)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        store = SQLiteTokenStore(path, busy_timeout_ms=busy,
                                 snapshot_after=snapshot_after)
    except OSError as exc:
        tmpdir = tempfile.mkdtemp(prefix="trustmilter-bayes-")
        log.warning("cannot create %s (%s); using a private copy in %s", path, exc.strerror, tmpdir)
        store = SQLiteTokenStore(Path(tmpdir) / "bayes.sqlite", busy_timeout_ms=busy,
                                 snapshot_after=snapshot_after)
    if export is not None:
        count = store.import_export(export)
        log.info("seeded %s with %d tokens from %s", store.path, count, export)
    return store


def _seed_export(model_section: dict[str, Any] | None) -> Path | None:
    try:
        return bayes_export_of(resolve_model_path(model_section or {}))
    except ModelError as exc:
        log.warning("no Bayes export to seed from: %s", exc)
        return None


_models: dict[tuple[str, int, int], Any] = {}
_models_lock = threading.Lock()


def shared_model(path: Path) -> Any:
    """``load_model(path)``, once per process for the same files: engines (one per worker, one
    per reload, many in tests) share the read-only model instead of each loading its own. A
    changed file (other size or time) is loaded, and checked, afresh."""
    from trustmilter.content.model import MODEL_FILE, load_model
    try:
        stat = (Path(path) / MODEL_FILE).stat()
    except OSError:
        return load_model(path)      # raises the proper ModelError
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            model = load_model(path)
            _models.clear()          # keep one: an old model is garbage once replaced
            _models[key] = model
        return model
