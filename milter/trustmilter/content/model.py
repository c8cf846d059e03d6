"""The scikit-learn scorer: the mail tokens (the Bayes tokenizer's, hashed) plus structural
features that carry over from one decade's mail to the next (links against their text, hidden
text, image-only bodies, attachment types, sender facts) into a linear model with calibrated
probabilities.

Training reads the corpus once: each chunk of messages is vectorized and spilled to a temporary
directory as a sparse matrix, so corpora larger than memory train out of core
(``SGDClassifier.partial_fit`` over the chunks for several epochs); corpora that fit
(``in_memory_limit``) train a full-batch logistic regression, which is more accurate. A Platt
calibrator is fitted on out-of-fold decision values, so the probability means what it says.

A model lives in a directory: ``model.skops`` (skops, never pickle: loading executes no code
and refuses any type outside scikit-learn's linear models) and ``card.json`` (corpus, split,
date, feature settings, library versions, test-split metrics, and the SHA-256 of model.skops,
checked before loading so a tampered file is refused).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.utils import murmurhash3_32

from trustmilter.content.features import (ARCHIVE_EXTENSIONS, DANGEROUS_EXTENSIONS, FREEMAIL,
                                          SHORTENERS, MessageFeatures, brand_in_subdomain,
                                          letter_counts, lookalike_brand)
from trustmilter.content.tokenize import (_brand_named, _owns, has_money, is_urgent, money,
                                          subject_letter_counts, urgent, urgent_subject)
from trustmilter.errors import TrustmilterError

MODEL_FILE = "model.skops"
CARD_FILE = "card.json"
BAYES_EXPORT_FILE = "bayes.tsv.gz"
FORMAT_VERSION = 1
# The only types a model file may contain besides plain data (numpy arrays, dicts, lists).
ALLOWED_ESTIMATORS = frozenset({"sklearn.linear_model._logistic.LogisticRegression",
                                "sklearn.linear_model._stochastic_gradient.SGDClassifier"})


class ModelError(TrustmilterError):
    """A model directory is missing, malformed, tampered with, or holds unknown types."""


STRUCTURAL_FEATURES = (
    "links", "link_domains", "links_mismatched_frac", "link_mismatch", "link_ip_host",
    "link_lookalike", "link_shortener", "link_userinfo", "link_login_page", "images",
    "image_only", "hidden_text", "html_only", "has_plain", "text_length", "upper_ratio",
    "exclamations", "money", "urgent", "form", "password_field", "script", "attachments",
    "attachment_dangerous", "attachment_archive", "attachment_double_ext", "reply_to_differs",
    "from_freemail", "from_lookalike", "from_name_brand_mismatch", "list_headers",
    "received_hops", "tracking_pixel", "non_ascii_ratio", "subject_upper", "no_msgid_domain",
    "from_domain_linked",
)


@dataclass
class FeatureSettings:
    """How messages become vectors; recorded in the card so a model is always read the way it
    was trained."""

    hash_bits: int = 20                 # 2**20 hashed token columns
    # Scale of the dense structural block against the L2-normalized token block. Most structural
    # facts are tokens too; weighted higher, the block cost accuracy on the 2002 test split.
    structural_weight: float = 0.1
    token_prefixes_dropped: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"hash_bits": self.hash_bits, "structural_weight": self.structural_weight,
                "token_prefixes_dropped": list(self.token_prefixes_dropped),
                "structural_features": list(STRUCTURAL_FEATURES),
                "token_hashing": "sklearn FeatureHasher, binary, L2-normalized rows"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureSettings":
        if list(data.get("structural_features", STRUCTURAL_FEATURES)) != list(STRUCTURAL_FEATURES):
            raise ModelError("the model was trained with other structural features than this "
                             "version computes; retrain it")
        return cls(hash_bits=int(data["hash_bits"]), structural_weight=float(data["structural_weight"]),
                   token_prefixes_dropped=tuple(data.get("token_prefixes_dropped", ())))


_CAPS = {"links": 5.0, "link_domains": 4.0, "images": 4.0, "hidden_text": 8.0,
         "text_length": 10.0, "attachments": 3.0, "received_hops": 3.0}


def structural_vector(f: MessageFeatures) -> list[float]:
    """The structural features of one message, each scaled to about [0, 1]."""
    links = f.links
    n_links = len(links)
    mismatched = sum(1 for link in links if link.mismatched)
    text = f.text
    sample = text[:20000]
    letters, upper_letters, non_ascii_chars = letter_counts(sample[:5000])
    upper = upper_letters / letters if letters else 0.0
    non_ascii = (non_ascii_chars / min(len(sample), 5000)) if sample else 0.0
    subject_letters, subject_upper, _n = subject_letter_counts(f)
    subj_upper = subject_upper / subject_letters if subject_letters >= 8 else 0.0
    if len(text) <= 20000:      # the sample is the whole text: the tokenizer's answers hold
        money_named, urges = money(f), urgent(f)
    else:
        money_named = has_money(sample)
        urges = is_urgent(sample) or urgent_subject(f)
    brand = _brand_named(f.from_name) if f.from_name else ""
    values = {
        "links": math.log1p(n_links) / _CAPS["links"],
        "link_domains": math.log1p(len(f.link_domains)) / _CAPS["link_domains"],
        "links_mismatched_frac": mismatched / n_links if n_links else 0.0,
        "link_mismatch": float(mismatched > 0),
        "link_ip_host": float(any(link.is_ip for link in links)),
        "link_lookalike": float(any(lookalike_brand(link.domain) or brand_in_subdomain(link.host, link.domain)
                                    for link in links[:50] if link.domain)),
        "link_shortener": float(any(link.domain in SHORTENERS for link in links)),
        "link_userinfo": float(any(link.has_userinfo for link in links)),
        "link_login_page": float(any(("login" in link.url.lower() or "signin" in link.url.lower()
                                      or "verify" in link.url.lower()) for link in links[:50])),
        "images": math.log1p(f.images) / _CAPS["images"],
        "image_only": float(f.image_only),
        "hidden_text": math.log1p(len(f.hidden_text)) / _CAPS["hidden_text"],
        "html_only": float(f.html_present and not f.text_plain),
        "has_plain": float(bool(f.text_plain)),
        "text_length": math.log1p(len(text)) / _CAPS["text_length"],
        "upper_ratio": upper,
        "exclamations": min(1.0, sample.count("!") / 20.0),
        "money": float(money_named),
        "urgent": float(urges),
        "form": float(f.forms > 0),
        "password_field": float(f.password_inputs > 0),
        "script": float(f.scripts > 0),
        "attachments": math.log1p(len(f.attachments)) / _CAPS["attachments"],
        "attachment_dangerous": float(any(a.ext in DANGEROUS_EXTENSIONS for a in f.attachments)),
        "attachment_archive": float(any(a.ext in ARCHIVE_EXTENSIONS for a in f.attachments)),
        "attachment_double_ext": float(any(a.double_ext for a in f.attachments)),
        "reply_to_differs": float(any(rd != f.from_rd for rd in f.reply_to_rds)),
        "from_freemail": float(f.from_rd in FREEMAIL),
        "from_lookalike": float(bool(lookalike_brand(f.from_rd))),
        "from_name_brand_mismatch": float(bool(brand) and not _owns(brand, f.from_rd)),
        "list_headers": float("list-id" in f.header_names or "list-unsubscribe" in f.header_names),
        "received_hops": min(1.0, math.log1p(f.received_hops) / _CAPS["received_hops"]),
        "tracking_pixel": float(f.tracking_pixels > 0),
        "non_ascii_ratio": non_ascii,
        "subject_upper": subj_upper,
        "no_msgid_domain": float(not f.message_id_rd),
        "from_domain_linked": float(bool(f.from_rd) and f.from_rd in f.link_domains),
    }
    return [min(1.0, max(0.0, values[name])) for name in STRUCTURAL_FEATURES]


class Vectorizer:
    """Tokens + features -> one sparse row per message. Stateless (hashing), so training can
    run in chunks and scoring needs no vocabulary."""

    def __init__(self, settings: FeatureSettings) -> None:
        from sklearn.feature_extraction import FeatureHasher
        self.settings = settings
        self._hasher = FeatureHasher(n_features=2 ** settings.hash_bits, input_type="string",
                                     alternate_sign=False)
        self.width = 2 ** settings.hash_bits + len(STRUCTURAL_FEATURES)

    def _kept(self, tokens: Sequence[str]) -> Sequence[str]:
        dropped = self.settings.token_prefixes_dropped
        if not dropped:
            return tokens
        return [t for t in tokens if not t.startswith(dropped)]

    def transform(self, rows: Sequence[tuple[MessageFeatures, Sequence[str]]]) -> sp.csr_matrix:
        hashed = self._hasher.transform(self._kept(tokens) for _f, tokens in rows)
        hashed = sp.csr_matrix(hashed, dtype=np.float64)
        # L2-normalize token rows so a long message does not outvote a short one.
        norms = np.sqrt(np.asarray(hashed.multiply(hashed).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        hashed = sp.csr_matrix(sp.diags(1.0 / norms) @ hashed)
        structural = np.array([structural_vector(f) for f, _t in rows], dtype=np.float64)
        structural *= self.settings.structural_weight
        return sp.csr_matrix(sp.hstack([hashed, sp.csr_matrix(structural)], format="csr"))


@dataclass
class ContentModel:
    classifier: Any
    calibrator: Any
    settings: FeatureSettings
    card: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self) -> None:
        self.vectorizer = Vectorizer(self.settings)

    def decision(self, rows: Sequence[tuple[MessageFeatures, Sequence[str]]]) -> np.ndarray:
        return np.asarray(self.classifier.decision_function(self.vectorizer.transform(rows)))

    def probabilities(self, rows: Sequence[tuple[MessageFeatures, Sequence[str]]]) -> np.ndarray:
        d = self.decision(rows)
        return np.asarray(self.calibrator.predict_proba(d.reshape(-1, 1))[:, 1])

    def probability(self, features: MessageFeatures, tokens: Sequence[str]) -> float:
        """One message's calibrated probability, computed directly from the weights: the same
        number as ``probabilities`` (a unit test holds them equal) without scikit-learn's
        per-call validation, which costs more than the arithmetic for a single message."""
        fast = self._fast
        if fast is None:
            return float(self.probabilities([(features, tokens)])[0])
        _w, struct_weights, intercept, cal_a, cal_b, _n, _d = fast
        decision = intercept + self.token_term(tokens)
        structural = structural_vector(features)
        weight = self.settings.structural_weight
        decision += sum(float(w) * x * weight for w, x in zip(struct_weights, structural))
        z = cal_a * decision + cal_b
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def token_term(self, tokens: Sequence[str]) -> float:
        """The tokens' share of the decision value: the weights of their hashed columns over the
        L2 norm of the column counts (``probability``'s fast path)."""
        token_weights, _s, _i, _a, _b, n_features, dropped = self._fast
        if dropped:
            tokens = [t for t in tokens if not t.startswith(dropped)]
        if not tokens:
            return 0.0
        # FeatureHasher's column: |murmurhash3_32| mod n (abs(-2**31) taken as 2**31, which is
        # what its special case amounts to).
        columns = np.abs(np.fromiter(map(murmurhash3_32, tokens), dtype=np.int64, count=len(tokens)))
        columns %= n_features
        # Each column's weight times its count, summed one after the other in the order the
        # columns were first seen, as the loop over a dict of counts did (cumsum is sequential;
        # "0.0 +" turns a -0.0 total into the 0.0 that sum() gives), over the L2 norm of the
        # counts. Nearly always no two tokens share a column and every count is 1.
        ordered = np.sort(columns)
        if not (ordered[1:] == ordered[:-1]).any():
            total = 0.0 + float(np.cumsum(token_weights[columns].astype(np.float64))[-1])
            return total / math.sqrt(columns.size)
        unique, first, counts = np.unique(columns, return_index=True, return_counts=True)
        order = np.argsort(first)
        counts = counts[order]
        total = 0.0 + float(np.cumsum(token_weights[unique[order]].astype(np.float64) * counts)[-1])
        return total / math.sqrt(int(np.dot(counts, counts)))

    @property
    def _fast(self) -> tuple[Any, ...] | None:
        cached = self.__dict__.get("_fast_params")
        if cached is None:
            coef = np.asarray(getattr(self.classifier, "coef_", None))
            calibrator_coef = np.asarray(getattr(self.calibrator, "coef_", None))
            if coef.ndim != 2 or coef.shape[0] != 1 or calibrator_coef.shape != (1, 1):
                self.__dict__["_fast_params"] = False
                return None
            n_features = 2 ** self.settings.hash_bits
            weights = coef[0]
            cached = (weights[:n_features], [float(w) for w in weights[n_features:]],
                      float(np.asarray(self.classifier.intercept_).ravel()[0]),
                      float(calibrator_coef[0, 0]), float(np.asarray(self.calibrator.intercept_).ravel()[0]),
                      n_features, tuple(self.settings.token_prefixes_dropped))
            self.__dict__["_fast_params"] = cached
        return cached or None

    @property
    def name(self) -> str:
        return str(self.card.get("name") or (self.path.name if self.path else "unsaved"))

    # ---- saving and loading -----------------------------------------------------------------
    def save(self, directory: Path, card: dict[str, Any]) -> Path:
        import skops.io as sio
        directory.mkdir(parents=True, exist_ok=True)
        model_path = directory / MODEL_FILE
        # Deflate: the hashed weight vector is mostly zeros (buckets no training token hit).
        data = sio.dumps({"format": FORMAT_VERSION, "classifier": self.classifier,
                          "calibrator": self.calibrator},
                         compression=zipfile.ZIP_DEFLATED, compresslevel=9)
        tmp = model_path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, model_path)
        card = dict(card)
        card["format"] = FORMAT_VERSION
        card["features"] = self.settings.as_dict()
        files = dict(card.get("files", {}))
        files[MODEL_FILE] = {"sha256": sha256_file(model_path), "bytes": len(data)}
        card["files"] = files
        write_card(directory, card)
        self.card, self.path = card, directory
        return directory


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_card(directory: Path, card: dict[str, Any]) -> None:
    path = directory / CARD_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_card(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: no model card") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable model card: {exc}") from None
    if not isinstance(card, dict):
        raise ModelError(f"{path}: a model card is a JSON object")
    return card


def verify_file(directory: Path, card: dict[str, Any], name: str) -> Path:
    """The path of a file the card lists, after checking its SHA-256 against the card."""
    entry = (card.get("files") or {}).get(name)
    if not isinstance(entry, dict) or not entry.get("sha256"):
        raise ModelError(f"{directory}: the card records no digest for {name}")
    path = Path(directory) / name
    if not path.exists():
        raise ModelError(f"{path}: missing")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise ModelError(f"{path}: SHA-256 {actual[:16]}... differs from the card's "
                         f"{str(entry['sha256'])[:16]}...: the file was changed; refusing to load")
    return path


def load_model(directory: str | Path) -> ContentModel:
    """Load a model directory: card, digest check, then skops with no types trusted beyond
    scikit-learn's own defaults, and only the linear estimators we save."""
    import skops.io as sio
    directory = Path(directory)
    card = read_card(directory)
    if card.get("format") != FORMAT_VERSION:
        raise ModelError(f"{directory}: model format {card.get('format')!r}, expected {FORMAT_VERSION}")
    path = verify_file(directory, card, MODEL_FILE)
    data = path.read_bytes()
    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:  # noqa: BLE001 - a corrupt archive raises many things
        raise ModelError(f"{path}: not a skops file: {exc}") from None
    if untrusted:
        raise ModelError(f"{path}: refusing to load unknown types: {', '.join(untrusted)}")
    try:
        obj = sio.loads(data, trusted=[])
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{path}: cannot load: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_VERSION:
        raise ModelError(f"{path}: unexpected content")
    for key in ("classifier", "calibrator"):
        kind = f"{type(obj.get(key)).__module__}.{type(obj.get(key)).__qualname__}"
        if kind not in ALLOWED_ESTIMATORS:
            raise ModelError(f"{path}: {key} is a {kind}, not an allowed estimator")
    settings = FeatureSettings.from_dict(card.get("features") or {})
    return ContentModel(obj["classifier"], obj["calibrator"], settings, card, directory)


# ---- training ---------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    in_memory_limit: int = 200000     # above this many messages, train out of core
    chunk_size: int = 2000
    C: float = 100.0                  # inverse regularization (full-batch logistic regression)
    sgd_alpha: float = 2e-6           # regularization (out-of-core SGD)
    epochs: int = 8
    calibration_folds: int = 4
    seed: int = 0


class ChunkSpill:
    """Vectorized training chunks on disk: the corpus is parsed once, then read again per
    epoch without holding it all in memory."""

    def __init__(self, vectorizer: Vectorizer, chunk_size: int) -> None:
        self.vectorizer = vectorizer
        self.chunk_size = chunk_size
        self._dir = tempfile.TemporaryDirectory(prefix="trustmilter-train-")
        self.chunks: list[tuple[Path, int]] = []
        self._rows: list[tuple[MessageFeatures, Sequence[str]]] = []
        self._labels: list[int] = []
        self._weights: list[float] = []

    def add(self, features: MessageFeatures, tokens: Sequence[str], is_spam: bool,
            weight: float = 1.0) -> None:
        self._rows.append((features, tokens))
        self._labels.append(int(is_spam))
        self._weights.append(weight)
        if len(self._rows) >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        X = self.vectorizer.transform(self._rows)
        path = Path(self._dir.name) / f"chunk{len(self.chunks):05d}.npz"
        sp.save_npz(path, X, compressed=False)
        np.save(path.with_suffix(".y.npy"), np.array(self._labels, dtype=np.int8))
        np.save(path.with_suffix(".w.npy"), np.array(self._weights, dtype=np.float64))
        self.chunks.append((path, len(self._rows)))
        self._rows, self._labels, self._weights = [], [], []

    @property
    def count(self) -> int:
        return sum(n for _p, n in self.chunks) + len(self._rows)

    def read(self, index: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        path, _n = self.chunks[index]
        return (sp.load_npz(path).tocsr(), np.load(path.with_suffix(".y.npy")),
                np.load(path.with_suffix(".w.npy")))

    def all(self) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        parts = [self.read(i) for i in range(len(self.chunks))]
        return (sp.vstack([p[0] for p in parts], format="csr"), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]))

    def close(self) -> None:
        self._dir.cleanup()


def fit(spill: ChunkSpill, feature_settings: FeatureSettings,
        settings: TrainSettings | None = None, progress: Any = None) -> tuple[ContentModel, dict[str, Any]]:
    """Train on what the spill holds. Returns the model and notes for the card."""
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    settings = settings or TrainSettings()
    spill.flush()
    total = spill.count
    labels = np.concatenate([spill.read(i)[1] for i in range(len(spill.chunks))]) if spill.chunks else np.array([])
    if total == 0 or len(set(labels.tolist())) < 2:
        raise ModelError("training needs both ham and spam messages")
    started = time.perf_counter()
    rng = np.random.default_rng(settings.seed)
    notes: dict[str, Any] = {"messages": int(total), "spam": int(labels.sum()),
                             "ham": int(total - labels.sum())}
    if total <= settings.in_memory_limit:
        X, y, w = spill.all()

        def make() -> Any:
            # The dual solver: far more columns (2**20) than messages.
            return LogisticRegression(C=settings.C, solver="liblinear", dual=True, max_iter=5000)

        # Out-of-fold decision values for the calibrator, then the final fit on everything.
        folds = np.arange(total) % settings.calibration_folds
        rng.shuffle(folds)
        oof = np.zeros(total)
        for k in range(settings.calibration_folds):
            train_idx, held = folds != k, folds == k
            if len(set(y[train_idx].tolist())) < 2:
                continue
            model = make().fit(X[train_idx], y[train_idx], sample_weight=w[train_idx])
            oof[held] = model.decision_function(X[held])
            if progress:
                progress(k + 1, settings.calibration_folds + 1)
        classifier = make().fit(X, y, sample_weight=w)
        if progress:
            progress(settings.calibration_folds + 1, settings.calibration_folds + 1)
        calib_x, calib_y = oof, y
        notes["algorithm"] = (f"LogisticRegression(liblinear dual, C={settings.C}), "
                              f"full batch; Platt calibration on {settings.calibration_folds}-fold "
                              "out-of-fold decision values")
    else:
        classifier = SGDClassifier(loss="log_loss", alpha=settings.sgd_alpha, random_state=settings.seed,
                                   class_weight=None)
        # Every 10th chunk is held out for calibration; the rest are passed over epochs times.
        held_out = set(range(9, len(spill.chunks), 10)) or {len(spill.chunks) - 1}
        train_chunks = [i for i in range(len(spill.chunks)) if i not in held_out] or list(held_out)
        for epoch in range(settings.epochs):
            for i in rng.permutation(train_chunks):
                X, y, w = spill.read(int(i))
                classifier.partial_fit(X, y, classes=np.array([0, 1]), sample_weight=w)
            if progress:
                progress(epoch + 1, settings.epochs)
        xs, ys = [], []
        for i in sorted(held_out):
            X, y, _w = spill.read(i)
            xs.append(classifier.decision_function(X))
            ys.append(y)
        calib_x, calib_y = np.concatenate(xs), np.concatenate(ys)
        notes["algorithm"] = (f"SGDClassifier(log_loss, alpha={settings.sgd_alpha}) out of core, "
                              f"{settings.epochs} epochs over {len(train_chunks)} chunks; Platt "
                              f"calibration on {len(held_out)} held-out chunks")
    if len(set(calib_y.tolist())) < 2:
        raise ModelError("calibration needs both ham and spam messages")
    calibrator = LogisticRegression(C=1e4, solver="lbfgs").fit(calib_x.reshape(-1, 1), calib_y)
    # float32 weights: half the file, and scores differ from float64 by ~1e-7.
    classifier.coef_ = classifier.coef_.astype(np.float32)
    notes["fit_seconds"] = round(time.perf_counter() - started, 2)
    return ContentModel(classifier, calibrator, feature_settings), notes


def library_versions() -> dict[str, str]:
    import sklearn
    import skops
    return {"python": platform.python_version(), "scikit-learn": sklearn.__version__,
            "skops": skops.__version__, "numpy": np.__version__, "scipy": __import__("scipy").__version__}


def iter_batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
