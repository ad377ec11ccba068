"""The DuckDB store: one file holds everything redex knows (schema: `core.store.migrations`).

DuckDB lets one process write a file at a time, and a read-write connection excludes every other
process, readers included. The app, the CLI and background jobs all use the file at once, so no
process keeps a connection open: each unit of work opens one, does it, and closes it, inside a
cross-process lock on a side file (`<db>.lock`): shared for readers, exclusive for writers, with
writers served first (`<db>.gate`) so that polling readers cannot starve a job's progress writes.
Waiters queue on the lock instead of failing with DuckDB's "could not set lock" error, which
never reaches the user. Units of work are short (a bulk insert of 70,000 embeddings takes well
under a second), so nobody waits long.

Within one thread, nested `read()`/`write()` calls reuse the connection already open (a read
inside a write sees the write's own changes).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import duckdb

from core import config
from core.store.migrations import MIGRATIONS

LOCK_TIMEOUT_S = float(os.environ.get("REDEX_LOCK_TIMEOUT", "300"))


class StoreLockTimeout(RuntimeError):
    """Another process held the store for longer than REDEX_LOCK_TIMEOUT seconds."""


class StoreCorrupt(RuntimeError):
    """The store file cannot be read (not a DuckDB file, truncated, a bad checksum): the message names the
    file and what to do. `path` is the file."""

    def __init__(self, path: Path, detail: str):
        self.path, self.detail = path, " ".join(detail.split())
        super().__init__(
            f"the redex store {path} is damaged ({self.detail}). `redex doctor` says what can be recovered;"
            f" `redex doctor --repair` moves the file aside (to {path.name}.corrupt-<time>), starts a fresh"
            f" store and registers again the datasets whose sources it finds. Or restore the file from a backup.")


_CORRUPT = ("corrupt database", "not a valid duckdb database", "could not read enough bytes", "checksum")


def _is_corrupt(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.Error) and any(m in str(exc).lower() for m in _CORRUPT)


class Store:
    """Short-lived, lock-guarded DuckDB connections to one file; safe across processes and threads."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else config.db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.gate_path = self.path.with_name(self.path.name + ".gate")
        self._local = threading.local()
        self._migrate()

    def generation(self) -> tuple:
        """Changes whenever any process commits to the store: the size and modification time of the
        file and of its write-ahead log (a commit appends to the log, a checkpoint rewrites the file).
        Two `stat` calls and no connection (opening the file costs 20-200 ms on a busy machine), so a
        page can key its caches of store reads on it and read nothing while nothing changed."""
        out: list = [str(self.path)]
        for path in (self.path, self.path.with_name(self.path.name + ".wal")):
            try:
                st = os.stat(path)
                out += [st.st_size, st.st_mtime_ns]
            except OSError:
                out += [None, None]
        return tuple(out)

    # -- connections -------------------------------------------------------------------------
    @contextlib.contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection (shared lock); reuses this thread's open connection if any."""
        con = getattr(self._local, "con", None)
        if con is not None:
            yield con
            return
        with self._connection(read_only=True) as con:
            yield con

    @contextlib.contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside one transaction (exclusive lock): all or nothing."""
        con = getattr(self._local, "con", None)
        if con is not None:
            if getattr(self._local, "read_only", False):
                raise RuntimeError("store.write() inside store.read(): open the write first")
            yield con
            return
        with self._connection(read_only=False) as con:
            try:
                con.begin()
                yield con
                con.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    con.rollback()
                raise

    @contextlib.contextmanager
    def _connection(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """This thread's connection under the store lock, closed after; a damaged file raises
        `StoreCorrupt` (naming the file and the fix) instead of DuckDB's error."""
        with self._locked(fcntl.LOCK_SH if read_only else fcntl.LOCK_EX):
            con = _connect(self.path, read_only=read_only)
            self._local.con = con
            try:
                yield con
            except BaseException as exc:
                if _is_corrupt(exc):
                    raise StoreCorrupt(self.path, str(exc)) from None
                raise
            finally:
                self._local.con = None
                con.close()

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        """Hold the store lock in `mode` (LOCK_SH to read, LOCK_EX to write), writers first.

        A second lock, the gate, keeps writers from starving under a steady stream of readers:
        a writer holds the gate exclusively while it waits for and holds the store lock, and a
        reader passes the gate (shared, released at once) before taking its shared store lock.
        Lock order is always gate, then store, so nobody deadlocks.
        """
        writer = mode == fcntl.LOCK_EX
        gate = os.open(self.gate_path, os.O_RDWR | os.O_CREAT, 0o644)
        main = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        self._local.read_only = not writer
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            self._acquire(gate, fcntl.LOCK_EX if writer else fcntl.LOCK_SH, deadline)
            try:
                self._acquire(main, mode, deadline)
            finally:
                if not writer:
                    fcntl.flock(gate, fcntl.LOCK_UN)
            yield
        finally:
            self._local.read_only = False
            os.close(main)  # closing a descriptor releases its lock
            os.close(gate)

    def _acquire(self, fd: int, mode: int, deadline: float) -> None:
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreLockTimeout(
                        f"the redex store {self.path} stayed busy for {LOCK_TIMEOUT_S:.0f} s") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.02)

    # -- helpers -----------------------------------------------------------------------------
    def query(self, sql: str, params: list | tuple | None = None) -> list[tuple]:
        with self.read() as con:
            return con.execute(sql, params or []).fetchall()

    def query_df(self, sql: str, params: list | tuple | None = None):
        with self.read() as con:
            return con.execute(sql, params or []).df()

    def execute(self, sql: str, params: list | tuple | None = None) -> list[tuple]:
        with self.write() as con:
            cur = con.execute(sql, params or [])
            return cur.fetchall() if cur.description else []

    def schema_version(self) -> int:
        with self.read() as con:
            return con.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0

    def _migrate(self) -> None:
        with self.write() as con:
            con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                        " applied_at TIMESTAMP DEFAULT current_timestamp)")
            current = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version > current:
                    con.execute(sql)
                    con.execute("INSERT INTO schema_version (version) VALUES (?)", [version])


def _connect(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """Open the file, retrying DuckDB's own lock error (a process outside redex holding it)."""
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as exc:
            if _is_corrupt(exc):
                raise StoreCorrupt(path, str(exc)) from None
            if not isinstance(exc, duckdb.IOException) or "lock" not in str(exc).lower() \
                    or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


_stores: dict[Path, Store] = {}
_stores_lock = threading.Lock()


def get_store(path: str | Path | None = None) -> Store:
    """The process-wide Store for a file (default: the configured cache)."""
    key = Path(path) if path else config.db_path()
    with _stores_lock:
        if key not in _stores:
            _stores[key] = Store(key)
        return _stores[key]
