"""SQLite specifics: the store file, its connections and its integrity check.

- The file is created private (0600; its -wal and -shm files take the same mode; a folder made
  for it 0700) and atomically: a new store is built in a temporary file and linked into place,
  so a store file is never empty. An empty (0-byte) file where a store was expected is refused,
  never taken for a new store, and an existing store is opened in ``mode=rw``: a file that
  disappeared is an error, not a fresh empty store.
- WAL: a read is a plain (deferred) transaction on a snapshot and never blocks the writer; a
  write takes the write lock up front (``BEGIN IMMEDIATE``: no lock-upgrade deadlocks).
- ``PRAGMA integrity_check`` (index contents included: a damaged index would hide rows) when a
  store opens, bounded in time, and in full on demand (:func:`integrity_problems`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .base import StoreError

WRITE = "agentspec_write"  # execution option of the connections that write (BEGIN IMMEDIATE)
BUSY_SECONDS = 60  # how long a writer waits for another process's write lock
DAMAGE_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
DAMAGE_WORDS = ("malformed", "not a database")  # the same, for drivers without sqlite_errorcode (Python 3.10)
# text that is not UTF-8 (agentspec writes none): the driver's UnicodeDecodeError, or its message
NOT_UTF8 = "Could not decode to UTF-8"


def file_path(url: str) -> Path | None:
    """The database file of a SQLite URL; None in memory or for a ``file:`` URI the driver parses."""
    path = sa.engine.make_url(url).database
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Path(path)


def check_file(file: Path, create: bool) -> bool:
    """Refuse what cannot be a usable store at ``file``; True when it must be created."""
    if file.exists():
        if file.is_file() and file.stat().st_size == 0:
            raise StoreError(f"the store file {file} is empty (0 bytes) where a store was expected (truncated or "
                             "overwritten?); move it away to start a new store")
        if not os.access(file, os.W_OK):
            raise StoreError(f"the store file {file} is read-only; agentspec needs to write to it")
        return False
    if not create:
        raise StoreError(f"no store at {file} (the file does not exist)")
    missing = [p for p in (file.parent, *file.parent.parents) if not p.exists()]
    try:
        for folder in reversed(missing):
            folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot create the folder {file.parent} for the store: {exc}") from exc
    if not os.access(file.parent, os.W_OK):
        raise StoreError(f"cannot create the store {file}: the folder {file.parent} is read-only")
    return True


def create_file(file: Path, initialise: Callable[[Engine], None]) -> bool:
    """Build a new store in a private temporary file next to ``file`` and link it into place; False
    when another process got there first (theirs is kept)."""
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".new")  # mode 0600
    os.close(fd)
    try:
        engine = engine_for(Path(tmp))
        try:
            initialise(engine)
        finally:
            engine.dispose()  # the last connection checkpoints the WAL into the file
        try:
            os.link(tmp, file)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot create the store {file}: {exc}") from exc
    finally:
        for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def engine_for(file: Path | None, url: str | None = None, damaged: bool = False) -> Engine:
    """An engine on an existing file (opened ``mode=rw``), or on ``url`` as the driver reads it.
    ``damaged``: to read what is left of a damaged file, tolerate a damaged schema (``PRAGMA
    writable_schema``; the store takes no writes once it knows of the damage)."""
    if file is not None:
        uri = f"file:{urllib.parse.quote(str(file))}?mode=rw"
        engine = sa.create_engine(f"sqlite:///{file}", creator=lambda: sqlite3.connect(
            uri, uri=True, timeout=BUSY_SECONDS, check_same_thread=False))
    else:
        engine = sa.create_engine(url, connect_args={"timeout": BUSY_SECONDS})

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # the driver begins nothing by itself: see _begin
        cur = dbapi_conn.cursor()
        if damaged:  # first: before anything reads the schema
            cur.execute("PRAGMA writable_schema=ON")
        cur.execute("PRAGMA journal_mode=WAL")  # a killed writer leaves no half-written call
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={BUSY_SECONDS * 1000}")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):  # reads: a snapshot that never blocks the writer; writes: the write lock up front
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")

    return engine


def integrity_problems(conn: Connection, full: bool = False, seconds: float | None = None) -> list[str] | None:
    """``PRAGMA quick_check`` (``integrity_check`` when ``full``: index contents too): the problems
    found, ``[]`` when the file is sound, None when it did not finish within ``seconds``."""
    raw = conn.connection.driver_connection
    if seconds is not None:
        deadline = time.monotonic() + seconds
        raw.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    try:
        rows = [r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check" if full else "PRAGMA quick_check")]
    except sa.exc.OperationalError as exc:
        if "interrupted" in str(exc.orig):
            return None
        raise
    finally:
        raw.set_progress_handler(None, 0)
    return [] if rows == ["ok"] else rows


def is_damage(exc: BaseException) -> bool:
    """Whether a driver error says the file is damaged (rather than busy, read-only, ...)."""
    orig = getattr(exc, "orig", exc)
    if isinstance(orig, UnicodeDecodeError) or NOT_UTF8 in str(orig):
        return True
    if not isinstance(orig, sqlite3.DatabaseError):
        return False
    code = getattr(orig, "sqlite_errorcode", None)
    return code in DAMAGE_CODES if code is not None else any(word in str(orig) for word in DAMAGE_WORDS)
