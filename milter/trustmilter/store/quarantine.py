"""The quarantine index, and release/delete through the MTA's own tools.

A quarantined message lives in the MTA's hold queue (durable, Postfix's own); the index only
describes it: queue id, time, sender, recipients, subject, score, symbols. Releasing or deleting
runs Postfix's ``postsuper -H ID`` / ``postsuper -d ID hold`` (with ``-c`` when
``quarantine.postfix_config_dir`` is set) and marks the index entry only after Postfix confirmed
that exactly that message moved. ``-d ... hold`` can only ever delete from the hold queue, so a
message already released by hand is never deleted by mistake.

Queue ids are checked before they reach a command line: Postfix ids are letters and digits, and
``ALL`` (which postsuper reads as "every message") is refused.

The index holds senders, recipients and subjects: the file is 0600 in a 0700 directory.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import sqlite_utils

from trustmilter.errors import TrustmilterError
from trustmilter.store.db import Database, db_path

if TYPE_CHECKING:
    from trustmilter.config import Config

SCHEMA_VERSION = 1
HELD, RELEASED, DELETED = "held", "released", "deleted"
_QUEUE_ID = re.compile(r"^[0-9A-Za-z]{5,40}$")
_DAY = 86400.0


class QuarantineError(TrustmilterError):
    """A release or delete could not be done (nothing was changed)."""


def check_queue_id(queue_id: str) -> str:
    queue_id = queue_id.strip()
    if not _QUEUE_ID.match(queue_id) or queue_id.upper() == "ALL":
        raise QuarantineError(f"not a queue id: {queue_id!r}")
    return queue_id


@dataclass
class QuarantineEntry:
    queue_id: str
    time: float
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    subject: str = ""
    score: float = 0.0
    symbols: list[list[Any]] = field(default_factory=list)     # [[name, score], ...]
    reason: str = ""
    message_id: str = ""
    client_ip: str = ""
    status: str = HELD
    status_time: float | None = None
    status_by: str = ""
    id: int | None = None

    def row(self) -> dict[str, Any]:
        out = dict(vars(self))    # shallow: the lists are serialised just below
        out.pop("id")
        out["recipients"] = json.dumps(out["recipients"])
        out["symbols"] = json.dumps(out["symbols"], separators=(",", ":"))
        return out

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "QuarantineEntry":
        data = dict(row)
        data["recipients"] = json.loads(data["recipients"] or "[]")
        data["symbols"] = json.loads(data["symbols"] or "[]")
        return cls(**data)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _schema(db: sqlite_utils.Database) -> None:
    db["quarantine"].create(
        {"id": int, "queue_id": str, "time": float, "sender": str, "recipients": str,
         "subject": str, "score": float, "symbols": str, "reason": str, "message_id": str,
         "client_ip": str, "status": str, "status_time": float, "status_by": str},
        pk="id", not_null={"queue_id", "time", "status"}, if_not_exists=True)
    db["quarantine"].create_index(["queue_id"], if_not_exists=True)
    db["quarantine"].create_index(["status", "time"], if_not_exists=True)
    db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
    db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", [str(SCHEMA_VERSION)])


_COLUMNS = ("id", "queue_id", "time", "sender", "recipients", "subject", "score", "symbols",
            "reason", "message_id", "client_ip", "status", "status_time", "status_by")


class QuarantineIndex:
    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 2000, readonly: bool = False,
                 retention_days: float = 90.0, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.retention_days = float(retention_days)
        self.db = Database(path, busy_timeout_ms=busy_timeout_ms, schema=_schema, readonly=readonly,
                           private=True)

    @classmethod
    def from_config(cls, config: "Config", *, readonly: bool = False,
                    clock: Callable[[], float] = time.time) -> "QuarantineIndex":
        return cls(db_path(config, "quarantine", "quarantine.sqlite"),
                   busy_timeout_ms=int(config.get("state.busy_timeout_ms", 2000)),
                   readonly=readonly,
                   retention_days=float(config.section("quarantine")["retention_days"]),
                   clock=clock)

    @property
    def path(self) -> Path:
        return self.db.path

    def close(self) -> None:
        self.db.close()

    def add_many(self, entries: Iterable[QuarantineEntry]) -> int:
        rows = [e.row() for e in entries]
        if not rows:
            return 0
        cols = list(rows[0])
        sql = (f"INSERT INTO quarantine ({', '.join(cols)}) VALUES "
               f"({', '.join(':' + c for c in cols)})")
        with self.db.write() as conn:
            conn.executemany(sql, rows)
        return len(rows)

    def entries(self, status: str | None = HELD, limit: int = 1000) -> list[QuarantineEntry]:
        """Entries (newest last); ``status`` None = every status."""
        where, params = "", []
        if status:
            where, params = "WHERE status = ?", [status]
        rows = self.db.conn().execute(
            f"SELECT {', '.join(_COLUMNS)} FROM quarantine {where} ORDER BY time DESC, id DESC "
            f"LIMIT ?", params + [int(limit)]).fetchall()
        return [QuarantineEntry.from_row(dict(zip(_COLUMNS, r))) for r in reversed(rows)]

    def get(self, queue_id: str) -> QuarantineEntry | None:
        """The newest entry with this queue id (Postfix reuses short ids over time)."""
        row = self.db.conn().execute(
            f"SELECT {', '.join(_COLUMNS)} FROM quarantine WHERE queue_id = ? "
            f"ORDER BY (status = 'held') DESC, time DESC, id DESC LIMIT 1", [queue_id]).fetchone()
        return QuarantineEntry.from_row(dict(zip(_COLUMNS, row))) if row else None

    def mark(self, entry_id: int, status: str, by: str = "") -> None:
        with self.db.write() as conn:
            conn.execute("UPDATE quarantine SET status = ?, status_time = ?, status_by = ? "
                         "WHERE id = ?", [status, self.clock(), by, entry_id])

    def prune(self, now: float | None = None) -> int:
        """Forget released/deleted entries after ``retention_days``; held ones stay while the
        message is held."""
        now = self.clock() if now is None else now
        with self.db.write() as conn:
            cur = conn.execute("DELETE FROM quarantine WHERE status != 'held' AND "
                               "coalesce(status_time, time) < ?",
                               [now - self.retention_days * _DAY])
            return int(cur.rowcount)


# ---- the MTA ------------------------------------------------------------------------------------
@dataclass
class PostfixQueue:
    """Postfix's hold queue through its own commands."""

    config_dir: str = ""
    postsuper: str = "/usr/sbin/postsuper"
    postqueue: str = "/usr/sbin/postqueue"
    timeout: float = 30.0

    @classmethod
    def from_config(cls, config: "Config") -> "PostfixQueue":
        section = config.section("quarantine")
        mta = str(section["mta"])
        if mta != "postfix":
            raise QuarantineError(f"quarantine.mta {mta!r}: only postfix is supported")
        return cls(config_dir=str(section["postfix_config_dir"] or ""),
                   postsuper=str(section["postsuper"]), postqueue=str(section["postqueue"]),
                   timeout=float(section["command_timeout"]))

    def _base(self, tool: str) -> list[str]:
        return [tool] + (["-c", self.config_dir] if self.config_dir else [])

    def _run(self, cmd: list[str]) -> str:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout,
                                 stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise QuarantineError(f"{cmd[0]}: not found (set quarantine.postsuper/postqueue)") from None
        except subprocess.TimeoutExpired:
            raise QuarantineError(f"{' '.join(cmd)}: no answer within {self.timeout:g}s") from None
        if res.returncode != 0:
            detail = (res.stderr or res.stdout).strip().splitlines()
            raise QuarantineError(f"{' '.join(cmd)} failed: {detail[-1] if detail else res.returncode}")
        return res.stderr + res.stdout

    def release(self, queue_id: str) -> None:
        """Move one message from the hold queue back into delivery; QuarantineError unless
        Postfix reports exactly that one message released."""
        queue_id = check_queue_id(queue_id)
        out = self._run(self._base(self.postsuper) + ["-H", queue_id])
        count = _count(out, r"Released from hold: (\d+) message")
        if count != 1:
            raise QuarantineError(f"{queue_id} is not in the hold queue (released or deleted "
                                  f"outside trustmilter?): postsuper released {count}")

    def delete(self, queue_id: str) -> None:
        """Delete one message, from the hold queue only."""
        queue_id = check_queue_id(queue_id)
        out = self._run(self._base(self.postsuper) + ["-d", queue_id, "hold"])
        count = _count(out, r"Deleted: (\d+) message")
        if count != 1:
            raise QuarantineError(f"{queue_id} is not in the hold queue (released or deleted "
                                  f"outside trustmilter?): postsuper deleted {count}")

    def held(self) -> dict[str, dict[str, Any]]:
        """queue id -> ``postqueue -j`` record, for every message in the hold queue."""
        out = self._run(self._base(self.postqueue) + ["-j"])
        held: dict[str, dict[str, Any]] = {}
        for line in out.splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            item = json.loads(line)
            if item.get("queue_name") == "hold":
                held[str(item.get("queue_id"))] = item
        return held


def _count(output: str, pattern: str) -> int:
    m = re.search(pattern, output)
    return int(m.group(1)) if m else 0


def release(index: QuarantineIndex, mta: PostfixQueue, queue_id: str, by: str = "") -> QuarantineEntry:
    """Release a held message and then mark its index entry. A message held but missing from the
    index (its entry was lost) is released all the same: nothing may stay stuck."""
    queue_id = check_queue_id(queue_id)
    entry = index.get(queue_id)
    if entry is not None and entry.status != HELD:
        raise QuarantineError(f"{queue_id} was already {entry.status}")
    mta.release(queue_id)            # raises before anything is marked
    if entry is None:
        return QuarantineEntry(queue_id=queue_id, time=index.clock(), status=RELEASED,
                               status_by=by, reason="(not in the index)")
    index.mark(int(entry.id or 0), RELEASED, by)
    entry.status, entry.status_by = RELEASED, by
    return entry


def delete(index: QuarantineIndex, mta: PostfixQueue, queue_id: str, by: str = "") -> QuarantineEntry:
    queue_id = check_queue_id(queue_id)
    entry = index.get(queue_id)
    if entry is not None and entry.status != HELD:
        raise QuarantineError(f"{queue_id} was already {entry.status}")
    mta.delete(queue_id)
    if entry is None:
        return QuarantineEntry(queue_id=queue_id, time=index.clock(), status=DELETED,
                               status_by=by, reason="(not in the index)")
    index.mark(int(entry.id or 0), DELETED, by)
    entry.status, entry.status_by = DELETED, by
    return entry
