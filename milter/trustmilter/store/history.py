"""History: every verdict the milter acted on (queue id, time, client, sender, recipients,
identities, action, score, symbols, per-check timings), kept ``history.retention_days`` and
pruned in short batches by the recorder thread. ``trustmilter history`` reads it; ``learn`` finds
a message's verdict and identities in it by Message-ID to correct reputation precisely."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import sqlite_utils

from trustmilter.store.db import Database, db_path

if TYPE_CHECKING:
    from trustmilter.config import Config

SCHEMA_VERSION = 1
_DAY = 86400.0
# One encoder for every row (json.dumps with options builds a new one per call).
_to_json = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


@dataclass
class HistoryEntry:
    time: float
    action: str
    score: float
    queue_id: str = ""
    message_id: str = ""
    client_ip: str = ""
    helo: str = ""
    mail_from: str = ""
    rcpt: list[str] = field(default_factory=list)
    identities: dict[str, Any] = field(default_factory=dict)
    intended: str = ""              # the action without shadow mode (= action outside it)
    symbols: list[list[Any]] = field(default_factory=list)       # [[name, score], ...]
    timings: dict[str, float] = field(default_factory=dict)      # check -> ms
    elapsed_ms: float = 0.0
    id: int | None = None

    def row(self) -> dict[str, Any]:
        # A shallow copy: asdict() deep-copies every list and dict only for them to be
        # serialised here (it was a third of the milter process's CPU under load).
        out = dict(vars(self))
        out.pop("id")
        for key in ("rcpt", "identities", "symbols", "timings"):
            out[key] = _to_json(out[key])
        return out

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "HistoryEntry":
        data = dict(row)
        for key in ("rcpt", "identities", "symbols", "timings"):
            data[key] = json.loads(data[key] or "null") or ({} if key in ("identities", "timings") else [])
        return cls(**data)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _schema(db: sqlite_utils.Database) -> None:
    db["history"].create(
        {"id": int, "time": float, "queue_id": str, "message_id": str, "client_ip": str,
         "helo": str, "mail_from": str, "rcpt": str, "identities": str, "action": str,
         "intended": str, "score": float, "symbols": str, "timings": str, "elapsed_ms": float},
        pk="id", not_null={"time", "action", "score"}, if_not_exists=True)
    db["history"].create_index(["time"], if_not_exists=True)
    db["history"].create_index(["action", "time"], if_not_exists=True)
    db["history"].create_index(["message_id"], if_not_exists=True)
    db["history"].create_index(["queue_id"], if_not_exists=True)
    db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
    db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", [str(SCHEMA_VERSION)])


_COLUMNS = ("id", "time", "queue_id", "message_id", "client_ip", "helo", "mail_from", "rcpt",
            "identities", "action", "intended", "score", "symbols", "timings", "elapsed_ms")


class HistoryStore:
    def __init__(self, path: str | Path, *, retention_days: float = 30.0, busy_timeout_ms: int = 2000,
                 readonly: bool = False, clock: Callable[[], float] = time.time) -> None:
        self.retention_days = float(retention_days)
        self.clock = clock
        self.db = Database(path, busy_timeout_ms=busy_timeout_ms, schema=_schema, readonly=readonly)

    @classmethod
    def from_config(cls, config: "Config", *, readonly: bool = False,
                    clock: Callable[[], float] = time.time) -> "HistoryStore":
        return cls(db_path(config, "history", "history.sqlite"),
                   retention_days=float(config.section("history")["retention_days"]),
                   busy_timeout_ms=int(config.get("state.busy_timeout_ms", 2000)),
                   readonly=readonly, clock=clock)

    @property
    def path(self) -> Path:
        return self.db.path

    def close(self) -> None:
        self.db.close()

    def add_many(self, entries: Iterable[HistoryEntry]) -> int:
        rows = [e.row() for e in entries]
        if not rows:
            return 0
        cols = list(rows[0])
        sql = (f"INSERT INTO history ({', '.join(cols)}) VALUES "
               f"({', '.join(':' + c for c in cols)})")
        with self.db.write() as conn:
            conn.executemany(sql, rows)
        return len(rows)

    def query(self, *, since: float | None = None, until: float | None = None,
              actions: Iterable[str] = (), queue_id: str | None = None,
              message_id: str | None = None, limit: int = 100) -> list[HistoryEntry]:
        """Matching entries, oldest first, at most the ``limit`` newest."""
        where, params = [], []
        if since is not None:
            where.append("time >= ?")
            params.append(since)
        if until is not None:
            where.append("time < ?")
            params.append(until)
        actions = list(actions)
        if actions:
            where.append(f"action IN ({','.join('?' * len(actions))})")
            params.extend(actions)
        if queue_id:
            where.append("queue_id = ?")
            params.append(queue_id)
        if message_id:
            where.append("message_id = ?")
            params.append(message_id)
        sql = (f"SELECT {', '.join(_COLUMNS)} FROM history"
               + (f" WHERE {' AND '.join(where)}" if where else "")
               + " ORDER BY time DESC, id DESC LIMIT ?")
        rows = self.db.conn().execute(sql, params + [int(limit)]).fetchall()
        return [HistoryEntry.from_row(dict(zip(_COLUMNS, r))) for r in reversed(rows)]

    def find_message(self, message_id: str) -> HistoryEntry | None:
        """The newest verdict on the message with this Message-ID (as written, brackets kept)."""
        found = self.query(message_id=message_id.strip(), limit=1)
        return found[0] if found else None

    def prune(self, now: float | None = None, batch: int = 5000) -> int:
        """Delete entries older than ``retention_days`` in short transactions."""
        now = self.clock() if now is None else now
        cutoff = now - self.retention_days * _DAY
        removed = 0
        while True:
            with self.db.write() as conn:
                cur = conn.execute("DELETE FROM history WHERE id IN (SELECT id FROM history WHERE "
                                   "time < ? ORDER BY time LIMIT ?)", [cutoff, batch])
            removed += cur.rowcount
            if cur.rowcount < batch:
                return removed


def parse_since(text: str, now: float | None = None) -> float:
    """"90s", "30m", "1h", "2d", "1w" ago, or a date/time "2026-11-01[T10:00[:00]]" (local time)."""
    import datetime as dt
    import re
    now = time.time() if now is None else now
    text = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return now - float(m.group(1)) * unit
    try:
        when = dt.datetime.fromisoformat(text.replace(" ", "T"))
    except ValueError:
        raise ValueError(f"cannot read {text!r}: give e.g. 1h, 2d or 2026-11-01") from None
    return when.timestamp()
