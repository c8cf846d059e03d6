"""Reputation: what our verdicts said about each authenticated identity and each client network,
with time decay.

Keys (never an unauthenticated From):
  dkim:<d=>          a DKIM signature that passed
  spf:<domain>       the SPF-passed MAIL FROM domain (the HELO name for the null sender)
  dmarc:<domain>     a From domain that passed DMARC (aligned)
  org:<domain>       the registered domain of any of those (for "new sender domain")
  ip:<address>       the client IPv4 address (/32)
  net:<prefix>       its /24 (IPv4) or /64 (IPv6)

Each key holds decayed counts of ham (inbox), junk, quarantine and reject verdicts, first and
last seen, and how many corrections ``learn`` made. Counts halve every ``half_life_days``:
stored values are as of ``updated`` and are decayed to "now" when read or updated, so no
background job touches every row. A correction from ``learn`` takes back the verdict it
corrects (when known) and adds ``correction_weight`` to the label's side: a person's judgement
outweighs one automatic verdict.

Writers: one per process (the milter's recorder thread, ``trustmilter learn``,
``trustmilter reputation forget``); each write is one short transaction. Readers (the
reputation check in every worker) use a short busy timeout.
"""
from __future__ import annotations

import functools
import ipaddress
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import sqlite_utils

from trustmilter.store.db import Database, StateError, db_path
from trustmilter.received import in_networks, parse_ip, parse_networks
from trustmilter.types import Action

if TYPE_CHECKING:
    from trustmilter.config import Config

SCHEMA_VERSION = 1
BUCKETS = ("ham", "junk", "quarantine", "reject")
DOMAIN_KINDS = ("dmarc", "dkim", "spf")          # most to least specific about the From
_ACTION_BUCKET = {Action.INBOX: "ham", Action.JUNK: "junk", Action.QUARANTINE: "quarantine",
                  Action.REJECT: "reject"}        # tempfail: no verdict on the sender yet
_DAY = 86400.0


def bucket_for(action: Action) -> str | None:
    return _ACTION_BUCKET.get(action)


def decay(value: float, since: float, now: float, half_life_s: float) -> float:
    """``value`` recorded at ``since``, halved every ``half_life_s`` until ``now``."""
    if value == 0 or now <= since or half_life_s <= 0:
        return value
    return value * math.pow(0.5, (now - since) / half_life_s)


# ---- identities ----------------------------------------------------------------------------------
def normalise_identities(raw: dict[str, Any] | None) -> dict[str, Any]:
    """{"dkim": [...], "spf": [...], "dmarc": [...], "ip": "..."} lower-cased, deduplicated."""
    raw = raw or {}
    out: dict[str, Any] = {}
    for kind in DOMAIN_KINDS:
        values = raw.get(kind) or []
        if not values:
            continue
        if isinstance(values, str):
            values = [values]
        names = sorted({str(v).strip().rstrip(".").lower() for v in values if str(v).strip()})
        if names:
            out[kind] = names
    addr = parse_ip(raw.get("ip"))
    if addr is not None:
        out["ip"] = str(addr)
    return out


def identities_from_authres(value: str, authserv_id: str | None = None) -> dict[str, Any]:
    """Identities from one of our Authentication-Results header values: dkim=pass header.d,
    spf=pass smtp.mailfrom (or smtp.helo for the null sender), dmarc=pass header.from,
    iprev policy.iprev. ``authserv_id`` given: a header naming another server gives nothing
    (only ours can be trusted; the milter removes forgeries of ours)."""
    from trustmilter import authresults
    try:
        header = authresults.parse(value)
    except Exception:  # noqa: BLE001 - authres raises several types on bad input
        return {}
    if authserv_id is not None and str(header.authserv_id).lower() != authserv_id.lower():
        return {}
    found: dict[str, Any] = {"dkim": [], "spf": [], "dmarc": []}
    for result in header.results:
        method = str(result.method).lower()
        status = str(result.result).lower()
        props = {f"{p.type}.{p.name}".lower(): str(p.value) for p in result.properties}
        if method == "iprev" and props.get("policy.iprev"):
            found["ip"] = props["policy.iprev"]
        if status != "pass":
            continue
        if method == "dkim" and props.get("header.d"):
            found["dkim"].append(props["header.d"])
        elif method == "spf":
            identity = props.get("smtp.mailfrom") or props.get("smtp.helo") or ""
            domain = identity.rsplit("@", 1)[-1]
            if domain:
                found["spf"].append(domain)
        elif method == "dmarc" and props.get("header.from"):
            found["dmarc"].append(props["header.from"])
    return normalise_identities(found)


def identity_keys(identities: dict[str, Any], org_domain: Callable[[str], str | None] | None = None,
                  skip_ip: Callable[[str], bool] | None = None) -> list[str]:
    """Reputation keys of a message's identities (see the module docstring), most specific
    first. ``skip_ip``: True for addresses that say nothing about a sender (ours, private)."""
    ids = normalise_identities(identities)
    keys: list[str] = []
    orgs: dict[str, None] = {}
    for kind in DOMAIN_KINDS:
        for domain in ids.get(kind, []):
            keys.append(f"{kind}:{domain}")
            org = org_domain(domain) if org_domain else domain
            if org:
                orgs.setdefault(org.lower(), None)
    keys.extend(f"org:{org}" for org in orgs)
    ip = ids.get("ip")
    if ip and not (skip_ip and skip_ip(ip)):
        keys.extend(ip_keys(ip))
    return list(dict.fromkeys(keys))


def skip_ip_for(trusted: list[Any]) -> Callable[[str], bool]:
    """Addresses that say nothing about a sender: not global (private, loopback, documentation)
    or one of our trusted networks/relays. Memoised: ``is_global`` tests the address against
    a dozen reserved networks, and the same clients come back."""

    @functools.lru_cache(maxsize=4096)
    def skip(ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return True
        return not addr.is_global or in_networks(ip, trusted)
    return skip


def key_builder_for_config(config: "Config") -> Callable[[dict[str, Any]], list[str]]:
    """identities -> keys, as the check computes them (same PSL, same trusted networks), for
    processes without an engine (the milter's recorder, ``learn``)."""
    from trustmilter import psl
    orgs = psl.OrgDomains.load(str(config.get("dmarc.psl_file") or "") or None)
    skip = skip_ip_for(parse_networks(config.data["trusted_networks"])
                       + parse_networks(config.data["trusted_relays"]))
    return lambda ids: identity_keys(ids, orgs.registrable_domain, skip)


def ip_keys(ip: str) -> list[str]:
    return list(_ip_keys(ip))


@functools.lru_cache(maxsize=4096)   # a network object per message was most of the check's cost
def _ip_keys(ip: str) -> tuple[str, ...]:
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return (f"ip:{addr}", f"net:{ipaddress.ip_network(f'{addr}/24', strict=False)}")
    return (f"net:{ipaddress.ip_network(f'{addr}/64', strict=False)}",)


def expand_key(text: str) -> list[str]:
    """What an admin typed for ``reputation show/forget``: a full key ("dkim:example.com"),
    a domain (all its domain kinds), an IPv4 address (its ip: key) or a network ("net:" key)."""
    text = text.strip()
    kind, sep, rest = text.partition(":")
    if sep and kind in DOMAIN_KINDS + ("org", "ip", "net"):
        return [f"{kind}:{rest.strip().lower()}"]
    try:
        addr = ipaddress.ip_address(text)
        if addr.version == 4:
            return [f"ip:{addr}"]
        return [f"net:{ipaddress.ip_network(f'{addr}/64', strict=False)}"]
    except ValueError:
        pass
    try:
        net = ipaddress.ip_network(text, strict=False)
        return [f"net:{net}"]
    except ValueError:
        pass
    domain = text.rstrip(".").lower()
    return [f"{k}:{domain}" for k in DOMAIN_KINDS + ("org",)]


# ---- stats ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stats:
    key: str
    ham: float
    junk: float
    quarantine: float
    reject: float
    first_seen: float
    last_seen: float
    messages: int
    corrections: int

    @property
    def kind(self) -> str:
        return self.key.split(":", 1)[0]

    @property
    def spam(self) -> float:
        return self.junk + self.quarantine + self.reject

    @property
    def total(self) -> float:
        return self.ham + self.spam

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "ham": round(self.ham, 3), "junk": round(self.junk, 3),
                "quarantine": round(self.quarantine, 3), "reject": round(self.reject, 3),
                "first_seen": self.first_seen, "last_seen": self.last_seen,
                "messages": self.messages, "corrections": self.corrections}


@dataclass(frozen=True)
class Judgement:
    """How a key's history reads under the configured thresholds."""

    good: bool
    bad: bool
    reason: str


@dataclass(frozen=True)
class Policy:
    half_life_days: float = 30.0
    min_messages: float = 5.0
    good_ratio: float = 0.9
    bad_ratio: float = 0.5
    good_after_days: float = 2.0
    new_domain_hours: float = 24.0
    learning_days: float = 7.0
    correction_weight: float = 3.0
    retention_days: float = 365.0

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> "Policy":
        names = cls.__dataclass_fields__
        return cls(**{k: float(section[k]) for k in names if k in section})

    @property
    def half_life_s(self) -> float:
        return self.half_life_days * _DAY

    def judge(self, stats: Stats, now: float) -> Judgement:
        total = stats.total
        if total < self.min_messages:
            return Judgement(False, False, f"{stats.key}: {total:.1f} weighted verdicts, too few")
        ham_share = stats.ham / total
        summary = (f"{stats.key}: ham {stats.ham:.1f}, junk {stats.junk:.1f}, quarantine "
                   f"{stats.quarantine:.1f}, reject {stats.reject:.1f} (half-life "
                   f"{self.half_life_days:g} d)")
        if 1 - ham_share >= self.bad_ratio:
            return Judgement(False, True, summary)
        if ham_share >= self.good_ratio and now - stats.first_seen >= self.good_after_days * _DAY:
            return Judgement(True, False, summary)
        return Judgement(False, False, summary)


# ---- the store ----------------------------------------------------------------------------------
def _schema(db: sqlite_utils.Database) -> None:
    db["reputation"].create(
        {"key": str, "ham": float, "junk": float, "quarantine": float, "reject": float,
         "updated": float, "first_seen": float, "last_seen": float, "messages": int,
         "corrections": int},
        pk="key", not_null={"ham", "junk", "quarantine", "reject", "updated", "first_seen",
                            "last_seen", "messages", "corrections"},
        defaults={"ham": 0.0, "junk": 0.0, "quarantine": 0.0, "reject": 0.0, "messages": 0,
                  "corrections": 0},
        if_not_exists=True)
    db["reputation"].create_index(["last_seen"], if_not_exists=True)
    # Messages a person already corrected (by Message-ID or digest): learning one twice counts
    # once, and relearning it with the other label takes the first correction back.
    db["corrected"].create({"message": str, "label": str, "time": float, "weight": float},
                           pk="message", if_not_exists=True)
    db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
    db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", [str(SCHEMA_VERSION)])
    db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('created', ?)", [repr(time.time())])


class ReputationStore:
    def __init__(self, path: str | Path, policy: Policy | None = None, *, busy_timeout_ms: int = 2000,
                 readonly: bool = False, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy or Policy()
        self.clock = clock
        half_life = self.policy.half_life_s
        self.db = Database(path, busy_timeout_ms=busy_timeout_ms, schema=_schema, readonly=readonly,
                           functions={"tm_decay": (3, lambda v, since, now: decay(
                               float(v), float(since), float(now), half_life))})

    @classmethod
    def from_config(cls, config: "Config", *, readonly: bool = False, busy_timeout_ms: int | None = None,
                    clock: Callable[[], float] = time.time) -> "ReputationStore":
        section = config.section("reputation")
        timeout = busy_timeout_ms if busy_timeout_ms is not None else int(
            config.get("state.busy_timeout_ms", 2000))
        return cls(db_path(config, "reputation", "reputation.sqlite"), Policy.from_config(section),
                   busy_timeout_ms=timeout, readonly=readonly, clock=clock)

    @property
    def path(self) -> Path:
        return self.db.path

    def close(self) -> None:
        self.db.close()

    # ---- reads ------------------------------------------------------------------------------
    def created(self) -> float | None:
        row = self.db.conn().execute("SELECT value FROM meta WHERE key = 'created'").fetchone()
        return float(row[0]) if row else None

    def lookup(self, keys: Sequence[str], now: float | None = None) -> dict[str, Stats]:
        """Decayed stats of the keys that have any history."""
        if not keys:
            return {}
        now = self.clock() if now is None else now
        marks = ",".join("?" * len(keys))
        rows = self.db.conn().execute(
            f"SELECT key, ham, junk, quarantine, reject, updated, first_seen, last_seen, messages, "
            f"corrections FROM reputation WHERE key IN ({marks})", list(keys)).fetchall()
        return {row[0]: self._stats(row, now) for row in rows}

    def _stats(self, row: Sequence[Any], now: float) -> Stats:
        key, ham, junk, quarantine, reject, updated, first, last, messages, corrections = row
        hl = self.policy.half_life_s
        return Stats(key, decay(ham, updated, now, hl), decay(junk, updated, now, hl),
                     decay(quarantine, updated, now, hl), decay(reject, updated, now, hl),
                     float(first), float(last), int(messages), int(corrections))

    def top(self, order: str = "bad", kind: str | None = None, limit: int = 20,
            now: float | None = None) -> list[Stats]:
        """Keys with the most (decayed) spam verdicts ("bad"), ham ("good") or all ("volume")."""
        now = self.clock() if now is None else now
        expr = {"bad": "junk + quarantine + reject", "good": "ham",
                "volume": "ham + junk + quarantine + reject"}[order]
        where, params = "", [now, int(limit)]
        if kind:
            where, params = "WHERE key LIKE ?", [f"{kind}:%", now, int(limit)]
        rows = self.db.conn().execute(
            f"SELECT key, ham, junk, quarantine, reject, updated, first_seen, last_seen, messages, "
            f"corrections FROM reputation {where} ORDER BY tm_decay({expr}, updated, ?) DESC, key "
            f"LIMIT ?", params).fetchall()
        return [self._stats(r, now) for r in rows]

    # ---- writes -----------------------------------------------------------------------------
    def record(self, items: Iterable[tuple[Sequence[str], str, float]]) -> int:
        """Count verdicts: each item is (keys, bucket, time). One transaction for all items."""
        sql = _UPSERT
        n = 0
        with self.db.write() as conn:
            for keys, bucket, when in items:
                if bucket not in BUCKETS:
                    raise ValueError(f"unknown bucket {bucket!r}")
                for key in keys:
                    params = {b: (1.0 if b == bucket else 0.0) for b in BUCKETS}
                    params.update(key=key, now=float(when))
                    conn.execute(sql, params)
                    n += 1
        return n

    def correct(self, keys: Sequence[str], label: str, previous: Action | None = None,
                previous_time: float | None = None, weight: float | None = None,
                message_key: str | None = None) -> int:
        """A person's verdict on a message: ``label`` "ham" or "spam". ``previous`` (the action
        we took, when known from history, at ``previous_time``) is taken back from its bucket,
        then ``weight`` (default ``correction_weight``) goes to the label's side. With
        ``message_key`` (Message-ID or digest) a message corrected twice with the same label
        counts once, and with the other label the first correction is taken back. Returns the
        number of keys changed."""
        if label not in ("ham", "spam"):
            raise ValueError("label must be ham or spam")
        weight = self.policy.correction_weight if weight is None else float(weight)
        target = "ham" if label == "ham" else "junk"
        undo_bucket = bucket_for(previous) if previous is not None else None
        now = self.clock()
        hl = self.policy.half_life_s
        changed = 0
        with self.db.write() as conn:
            earlier = None
            if message_key:
                earlier = conn.execute("SELECT label, time, weight FROM corrected WHERE message = ?",
                                       [message_key]).fetchone()
                if earlier is not None and earlier[0] == label:
                    return 0
            for key in keys:
                row = conn.execute(
                    "SELECT ham, junk, quarantine, reject, updated, first_seen, last_seen, "
                    "messages, corrections FROM reputation WHERE key = ?", [key]).fetchone()
                if row is None:
                    counts = dict.fromkeys(BUCKETS, 0.0)
                    first = last = now
                    messages = corrections = 0
                else:
                    counts = {b: decay(float(v), float(row[4]), now, hl)
                              for b, v in zip(BUCKETS, row[:4])}
                    first, last, messages, corrections = row[5], row[6], row[7], row[8]
                if earlier is not None:
                    # The automatic verdict was taken back by the first correction already.
                    side = "ham" if earlier[0] == "ham" else "junk"
                    counts[side] = max(0.0, counts[side] - decay(float(earlier[2]),
                                                                 float(earlier[1]), now, hl))
                elif undo_bucket is not None and undo_bucket != target:
                    undo = decay(1.0, previous_time or now, now, hl)
                    counts[undo_bucket] = max(0.0, counts[undo_bucket] - undo)
                counts[target] += weight
                conn.execute(
                    "INSERT OR REPLACE INTO reputation (key, ham, junk, quarantine, reject, updated, "
                    "first_seen, last_seen, messages, corrections) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
                    "?, ?)", [key, counts["ham"], counts["junk"], counts["quarantine"],
                              counts["reject"], now, first, last, messages, corrections + 1])
                changed += 1
            if message_key and keys:
                conn.execute("INSERT OR REPLACE INTO corrected (message, label, time, weight) "
                             "VALUES (?, ?, ?, ?)", [message_key, label, now, weight])
        return changed

    def forget(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        marks = ",".join("?" * len(keys))
        with self.db.write() as conn:
            cur = conn.execute(f"DELETE FROM reputation WHERE key IN ({marks})", list(keys))
            return int(cur.rowcount)

    def prune(self, now: float | None = None, batch: int = 5000) -> int:
        """Delete keys not seen for ``retention_days``, in short batches."""
        now = self.clock() if now is None else now
        cutoff = now - self.policy.retention_days * _DAY
        removed = 0
        while True:
            with self.db.write() as conn:
                cur = conn.execute("DELETE FROM reputation WHERE rowid IN (SELECT rowid FROM "
                                   "reputation WHERE last_seen < ? LIMIT ?)", [cutoff, batch])
                removed += cur.rowcount
                if cur.rowcount < batch:
                    return removed


_UPSERT = """
INSERT INTO reputation (key, ham, junk, quarantine, reject, updated, first_seen, last_seen,
                        messages, corrections)
VALUES (:key, :ham, :junk, :quarantine, :reject, :now, :now, :now, 1, 0)
ON CONFLICT (key) DO UPDATE SET
    ham = tm_decay(ham, updated, :now) + excluded.ham,
    junk = tm_decay(junk, updated, :now) + excluded.junk,
    quarantine = tm_decay(quarantine, updated, :now) + excluded.quarantine,
    reject = tm_decay(reject, updated, :now) + excluded.reject,
    updated = max(updated, :now),
    first_seen = min(first_seen, :now),
    last_seen = max(last_seen, :now),
    messages = messages + 1
"""


def open_reader(config: "Config") -> ReputationStore:
    """The store as the reputation check reads it: read-only, short busy timeout."""
    return ReputationStore.from_config(config, readonly=True,
                                       busy_timeout_ms=int(config.get("reputation.read_timeout_ms", 50)))


__all__ = ["BUCKETS", "Policy", "ReputationStore", "StateError", "Stats", "bucket_for", "decay",
           "expand_key", "identities_from_authres", "identity_keys", "ip_keys",
           "normalise_identities", "open_reader"]
