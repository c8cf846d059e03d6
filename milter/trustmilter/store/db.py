"""SQLite plumbing shared by the reputation, history and quarantine stores (the Bayes store keeps
its own in ``store/sqlite.py``).

The rules every store here follows (see PITFALLS: SQLite):
- WAL, so readers (the checks, the CLI) never wait for the writer and the writer never waits for
  them; ``synchronous=NORMAL`` (durable across a process crash, fast).
- A busy timeout on every connection: short where the milter reads (a held lock costs an
  ``*_UNAVAILABLE`` symbol and a log line, never a stalled message), longer for the writer
  thread and the CLI.
- One connection per thread and process: sqlite3 connections must not cross threads or a fork.
- Short transactions: one batch of verdicts per ``BEGIN IMMEDIATE``.
- Local disk only: SQLite locking is unreliable on network filesystems.
- Private files: the state directory is 0700 and every database (and its -wal/-shm, which SQLite
  creates with the database's mode) 0600, since they hold addresses and subjects. When root
  creates a file (the CLI run by an admin) in a directory owned by the service user, the file is
  handed to that user, or the milter could no longer write it.
"""
from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import sqlite_utils

from trustmilter.errors import TrustmilterError

if TYPE_CHECKING:
    from trustmilter.config import Config

DEFAULT_STATE_DIR = "/var/lib/trustmilter"


class StateError(TrustmilterError):
    """A state database cannot be opened, is locked beyond its timeout, or is not ours."""


def state_dir(config: "Config") -> Path:
    return Path(str(config.get("state.dir") or DEFAULT_STATE_DIR))


def db_path(config: "Config", section: str, default_name: str) -> Path:
    """``<section>.path`` when set, else ``state.dir/<default_name>``."""
    explicit = str(config.get(f"{section}.path") or "")
    return Path(explicit) if explicit else state_dir(config) / default_name


def is_locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc))


def _ensure_private_dir(path: Path) -> None:
    if path.is_dir():
        return
    old = os.umask(0o077)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    finally:
        os.umask(old)
    _adopt_parent_owner(path)


def _adopt_parent_owner(path: Path) -> None:
    """Root creating a file in a directory owned by the service user gives the file to it."""
    if os.geteuid() != 0:
        return
    try:
        parent = path.parent.stat()
        st = path.stat()
    except OSError:
        return
    if parent.st_uid != 0 and (st.st_uid, st.st_gid) != (parent.st_uid, parent.st_gid):
        os.chown(path, parent.st_uid, parent.st_gid)


def _create_private_file(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it (SQLite would use the umask)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    os.close(fd)
    _adopt_parent_owner(path)


def _tighten(path: Path) -> None:
    """Take group and other permissions away from a file or directory we own (one owned by
    someone else, e.g. a shared directory an admin chose, is left alone)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 and st.st_uid == os.geteuid():
        os.chmod(path, mode & 0o700)


class Database:
    """One SQLite file: per-thread connections, schema set up once, WAL, private permissions.

    ``schema`` is called with a sqlite-utils Database on a fresh connection when the file is
    first opened for writing; it must be idempotent (CREATE ... IF NOT EXISTS)."""

    def __init__(self, path: str | Path, *, busy_timeout_ms: int, schema: Callable[[sqlite_utils.Database], None],
                 readonly: bool = False, private: bool = True,
                 functions: dict[str, tuple[int, Callable[..., Any]]] | None = None) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.readonly = readonly
        self.private = private
        self._schema = schema
        self._functions = functions or {}
        self._local = threading.local()
        self._ready = False
        self._ready_lock = threading.Lock()

    # ---- connections ------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether the file exists; StateError when we may not even look (permissions)."""
        try:
            return self.path.exists()
        except OSError as exc:
            raise StateError(f"{self.path}: {exc.strerror or exc}") from None

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (made on first use; a forked child makes its own)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        if not self._ready:
            self._prepare()
        try:
            if self.readonly:
                conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                       check_same_thread=False,
                                       timeout=self.busy_timeout_ms / 1000)
            else:
                conn = sqlite3.connect(str(self.path), isolation_level=None,
                                       check_same_thread=False,
                                       timeout=self.busy_timeout_ms / 1000)
            conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
            if self.readonly:
                conn.execute("PRAGMA query_only = 1")
            else:
                conn.execute("PRAGMA synchronous = NORMAL")
            for name, (nargs, fn) in self._functions.items():
                conn.create_function(name, nargs, fn, deterministic=True)
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot open: {exc}") from None
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _prepare(self) -> None:
        with self._ready_lock:
            if self._ready:
                return
            try:
                if not self.readonly:
                    self._create()
                elif not self.path.exists():
                    raise StateError(f"{self.path}: no such database (nothing recorded yet)")
            except OSError as exc:
                raise StateError(f"{self.path}: {exc.strerror or exc}") from None
            self._ready = True

    def _create(self) -> None:
        """Directory, file, WAL and schema; runs once per process under ``_ready_lock``."""
        _ensure_private_dir(self.path.parent)
        if self.private:
            _tighten(self.path.parent)
        if not self.path.exists():
            _create_private_file(self.path)
        elif self.private:
            _tighten(self.path)
        setup_timeout = max(self.busy_timeout_ms, 5000)
        conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=setup_timeout / 1000)
        try:
            conn.execute(f"PRAGMA busy_timeout = {setup_timeout}")
            db = sqlite_utils.Database(conn)
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.enable_wal()
            self._schema(db)
        except sqlite3.Error as exc:
            raise StateError(f"{self.path}: cannot set up: {exc}") from None
        finally:
            conn.close()
        for suffix in ("-wal", "-shm"):
            side = Path(str(self.path) + suffix)
            if side.exists():
                _adopt_parent_owner(side)

    def db(self) -> sqlite_utils.Database:
        return sqlite_utils.Database(self.conn())

    def write(self) -> "_WriteTransaction":
        """``with database.write() as conn:`` one short BEGIN IMMEDIATE transaction."""
        return _WriteTransaction(self.conn())

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local = threading.local()


class _WriteTransaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        # IMMEDIATE: take the write lock now (or time out now), not half way through.
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
