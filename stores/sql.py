"""The session store on SQLAlchemy 2: SQLite by default, PostgreSQL for many processes or machines.

Open with :func:`open_store`. SQLite runs in WAL mode with a busy timeout, so several local
processes can read and append at once and a killed writer never leaves a half-written call
(each call is one transaction). PostgreSQL (``postgresql+psycopg://user:pw@host/db``) lets any
number of agentspec processes on any machines share one cache: point every process at the same
URL (``agentspec run --store URL``, ``Engine.from_pretrained(store=URL)``); each appends in its
own transaction, and a session's calls come back in append order.

Schema versions live in ``agentspec_schema``; :data:`MIGRATIONS` upgrades older stores in place,
and a store written by a newer agentspec is refused with :class:`SchemaVersionError`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .base import (
    CallRecord,
    CorruptRecordError,
    LoadedSession,
    SchemaVersionError,
    SessionInfo,
    StoreError,
    TokenizerMismatchError,
)
from .codec import decode_stats, decode_tokens, encode_stats, encode_tokens

SCHEMA_VERSION = 2

metadata = sa.MetaData()
schema_table = sa.Table("agentspec_schema", metadata, sa.Column("version", sa.Integer, nullable=False))
sessions_table = sa.Table(
    "agentspec_sessions", metadata,
    sa.Column("session_id", sa.String(512), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),  # added in schema v2
)
records_table = sa.Table(
    "agentspec_records", metadata,
    sa.Column("record_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("session_id", sa.String(512), sa.ForeignKey("agentspec_sessions.session_id", ondelete="CASCADE"),
              nullable=False, index=True),
    sa.Column("fingerprint", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("output_tokens", sa.Integer, nullable=False),
    sa.Column("prompt", sa.LargeBinary, nullable=False),
    sa.Column("output", sa.LargeBinary, nullable=False),
    sa.Column("stats", sa.LargeBinary, nullable=True),
)


def _migrate_1_to_2(conn: Connection) -> None:
    """v2 added ``agentspec_sessions.updated_at`` (filled from the newest record)."""
    conn.execute(sa.text("ALTER TABLE agentspec_sessions ADD COLUMN updated_at FLOAT"))
    conn.execute(sa.text(
        "UPDATE agentspec_sessions SET updated_at = COALESCE((SELECT MAX(r.created_at) FROM agentspec_records r "
        "WHERE r.session_id = agentspec_sessions.session_id), created_at)"
    ))


MIGRATIONS = {1: _migrate_1_to_2}  # from version -> function upgrading to version + 1


def default_url() -> str:
    """``sqlite:///$AGENTSPEC_HOME/cache.db``."""
    from agentspec.model import agentspec_home

    return f"sqlite:///{agentspec_home() / 'cache.db'}"


def open_store(url: str | None = None) -> SqlStore:
    """Open (creating or upgrading) the store at ``url`` (default: the SQLite file under $AGENTSPEC_HOME)."""
    return SqlStore(url or default_url())


class SqlStore:
    """Sessions and their calls in a SQL database. Safe to share between threads and processes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self._check_sqlite_path(url)
        try:
            self.engine = self._create_engine(url)
            with self.engine.begin() as conn:
                self._prepare_schema(conn)
        except sa.exc.ArgumentError as exc:
            raise StoreError(f"invalid store URL {url!r}: {exc}") from exc
        except sa.exc.NoSuchModuleError as exc:
            raise StoreError(f"no driver for {url!r} ({exc}); for PostgreSQL: pip install 'psycopg[binary]'") from exc
        except sa.exc.DBAPIError as exc:
            raise StoreError(f"cannot open the store at {self._safe_url()}: {_cause(exc)}") from exc

    # ------------------------------------------------------------------ set-up
    def _safe_url(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    @staticmethod
    def _check_sqlite_path(url: str) -> None:
        path = sa.engine.make_url(url).database
        if not path or path == ":memory:" or path.startswith("file:"):  # in memory, or a URI the driver parses
            return
        file = Path(path)
        if file.exists() and not os.access(file, os.W_OK):
            raise StoreError(f"the store file {file} is read-only; agentspec needs to write to it")
        if not file.exists():
            folder = file.parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the folder {folder} for the store: {exc}") from exc
            if not os.access(folder, os.W_OK):
                raise StoreError(f"cannot create the store {file}: the folder {folder} is read-only")

    def _create_engine(self, url: str) -> Engine:
        if not self.is_sqlite:
            return sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10}
                                    if url.startswith("postgresql") else {})
        engine = sa.create_engine(url, connect_args={"timeout": 60})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # WAL: readers never block the writer; a killed writer rolls back
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (see below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _begin_immediate(conn):  # take the write lock up front: no lock upgrade deadlocks
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    def _prepare_schema(self, conn: Connection) -> None:
        inspector = sa.inspect(conn)
        tables = set(inspector.get_table_names())
        if "agentspec_schema" not in tables:
            if tables & {"agentspec_sessions", "agentspec_records"}:
                raise SchemaVersionError(f"{self._safe_url()} has agentspec tables but no schema version")
            metadata.create_all(conn)
            conn.execute(schema_table.insert().values(version=SCHEMA_VERSION))
            return
        version = conn.execute(sa.select(schema_table.c.version)).scalar()
        if version is None:
            raise SchemaVersionError(f"{self._safe_url()}: the schema version row is missing")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self._safe_url()} has schema v{version}, newer than this agentspec's v{SCHEMA_VERSION}; "
                "upgrade agentspec to use it"
            )
        while version < SCHEMA_VERSION:
            MIGRATIONS[version](conn)
            version += 1
            conn.execute(schema_table.update().values(version=version))

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(schema_table.c.version)).scalar())

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ writing
    def open_session(self, session_id: str, fingerprint: str) -> SessionInfo:
        """Create the session if new; raise if it exists with another tokenizer."""
        with self.engine.begin() as conn:
            self._ensure_session(conn, session_id, fingerprint, time.time())
        info = self.session_info(session_id)
        assert info is not None
        return info

    def _ensure_session(self, conn: Connection, session_id: str, fingerprint: str, now: float) -> None:
        if not session_id:
            raise ValueError("session id must be a non-empty string")
        insert = self._insert(sessions_table).values(
            session_id=session_id, fingerprint=fingerprint, created_at=now, updated_at=now)
        conn.execute(insert.on_conflict_do_nothing(index_elements=["session_id"]))
        existing = conn.execute(sa.select(sessions_table.c.fingerprint)
                                .where(sessions_table.c.session_id == session_id)).scalar()
        if existing != fingerprint:
            raise TokenizerMismatchError(
                f"session {session_id!r} holds tokens of tokenizer {existing}, not {fingerprint}; "
                "use another session id for this model"
            )

    def _insert(self, table: sa.Table):
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table)

    def append(self, session_id: str, prompt_ids: Sequence[int], output_ids: Sequence[int],
               stats: dict | None = None, fingerprint: str = "") -> int:
        """Append one finished call in one transaction; returns its record id (append order)."""
        now = time.time()
        row = dict(session_id=session_id, fingerprint=fingerprint, created_at=now,
                   prompt_tokens=len(prompt_ids), output_tokens=len(output_ids),
                   prompt=encode_tokens(prompt_ids), output=encode_tokens(output_ids),
                   stats=encode_stats(stats or {}))
        try:
            with self.engine.begin() as conn:
                self._ensure_session(conn, session_id, fingerprint, now)
                record_id = conn.execute(records_table.insert().values(**row)).inserted_primary_key[0]
                conn.execute(sessions_table.update().where(sessions_table.c.session_id == session_id)
                             .values(updated_at=now))
        except sa.exc.DBAPIError as exc:
            raise StoreError(f"cannot write to the store at {self._safe_url()}: {_cause(exc)}") from exc
        return int(record_id)

    # ------------------------------------------------------------------ reading
    def session_info(self, session_id: str) -> SessionInfo | None:
        return next(iter(self.list_sessions(session_id=session_id)), None)

    def list_sessions(self, session_id: str | None = None) -> list[SessionInfo]:
        """Sessions with call and token totals, most recently used first."""
        r, s = records_table, sessions_table
        query = (
            sa.select(s.c.session_id, s.c.fingerprint, s.c.created_at, s.c.updated_at,
                      sa.func.count(r.c.record_id), sa.func.coalesce(sa.func.sum(r.c.prompt_tokens), 0),
                      sa.func.coalesce(sa.func.sum(r.c.output_tokens), 0))
            .select_from(s.outerjoin(r, r.c.session_id == s.c.session_id))
            .group_by(s.c.session_id, s.c.fingerprint, s.c.created_at, s.c.updated_at)
            .order_by(s.c.updated_at.desc())
        )
        if session_id is not None:
            query = query.where(s.c.session_id == session_id)
        with self.engine.connect() as conn:
            return [SessionInfo(*row[:4], int(row[4]), int(row[5]), int(row[6])) for row in conn.execute(query)]

    def load_session(self, session_id: str, with_prompts: bool = True) -> LoadedSession:
        """All readable calls of a session in append order; corrupt records are skipped and counted."""
        info = self.session_info(session_id)
        columns = [records_table.c.record_id, records_table.c.created_at, records_table.c.output,
                   records_table.c.stats, records_table.c.prompt if with_prompts else sa.null()]
        query = (sa.select(*columns).where(records_table.c.session_id == session_id)
                 .order_by(records_table.c.record_id))
        loaded = LoadedSession(info, [])
        with self.engine.connect() as conn:
            for record_id, created, output, stats, prompt in conn.execute(query):
                try:
                    loaded.calls.append(CallRecord(
                        record_id, session_id, decode_tokens(prompt) if prompt is not None else [],
                        decode_tokens(output), decode_stats(stats), created))
                except CorruptRecordError as exc:
                    loaded.skipped += 1
                    loaded.errors.append(f"record {record_id}: {exc}")
        return loaded

    def recent_outputs(self, fingerprint: str, max_tokens: int) -> tuple[list[list[int]], int]:
        """Outputs of the newest calls of all sessions of this tokenizer, up to ``max_tokens`` tokens,
        oldest first; and the number of corrupt records skipped."""
        r = records_table
        query = (sa.select(r.c.record_id, r.c.output, r.c.output_tokens).where(r.c.fingerprint == fingerprint)
                 .order_by(r.c.record_id.desc()))
        picked, total, skipped = [], 0, 0
        with self.engine.connect() as conn:
            for record_id, output, n in conn.execute(query):
                if total + n > max_tokens and picked:
                    break
                try:
                    picked.append((record_id, decode_tokens(output)))
                except CorruptRecordError:
                    skipped += 1
                    continue
                total += n
        return [out for _, out in reversed(picked)], skipped

    def iter_records(self, session_id: str | None = None) -> Iterator[tuple[str, dict]]:
        """``(session id, stats)`` of every call (all sessions or one), for statistics."""
        r = records_table
        query = sa.select(r.c.session_id, r.c.stats, r.c.output_tokens).order_by(r.c.record_id)
        if session_id is not None:
            query = query.where(r.c.session_id == session_id)
        with self.engine.connect() as conn:
            for sid, stats, _ in conn.execute(query):
                try:
                    yield sid, decode_stats(stats)
                except CorruptRecordError:
                    continue

    # ------------------------------------------------------------------ maintenance
    def delete_session(self, session_id: str) -> bool:
        with self.engine.begin() as conn:
            conn.execute(records_table.delete().where(records_table.c.session_id == session_id))
            return conn.execute(sessions_table.delete().where(sessions_table.c.session_id == session_id)).rowcount > 0

    def prune(self, max_session_tokens: int | None = None, max_total_tokens: int | None = None) -> int:
        """Delete the oldest calls beyond a token budget (prompt + output) per session and in total.
        Returns the number of calls deleted."""
        r = records_table
        doomed: list[int] = []
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(r.c.record_id, r.c.session_id, r.c.prompt_tokens + r.c.output_tokens)
                                .order_by(r.c.record_id.desc())).all()
        per_session: dict[str, int] = {}
        total = 0
        for record_id, sid, n in rows:  # newest first: keep until a budget is spent
            per_session[sid] = per_session.get(sid, 0) + n
            total += n
            if (max_session_tokens is not None and per_session[sid] > max_session_tokens) or (
                    max_total_tokens is not None and total > max_total_tokens):
                doomed.append(record_id)
        with self.engine.begin() as conn:
            for start in range(0, len(doomed), 500):
                conn.execute(r.delete().where(r.c.record_id.in_(doomed[start:start + 500])))
        return len(doomed)

    def export_session(self, session_id: str, path: str | Path) -> int:
        """Write a session as JSON lines (a header, then one call per line); returns the call count."""
        loaded = self.load_session(session_id)
        if loaded.info is None:
            raise KeyError(f"no session {session_id!r} in {self._safe_url()}")
        with open(path, "w") as f:
            info = loaded.info
            f.write(json.dumps({"agentspec_session": info.session_id, "fingerprint": info.fingerprint,
                                "created_at": info.created_at}) + "\n")
            for call in loaded.calls:
                f.write(json.dumps({"prompt": call.prompt_ids, "output": call.output_ids, "stats": call.stats}) + "\n")
        return len(loaded.calls)

    def import_session(self, path: str | Path, session_id: str | None = None) -> str:
        """Read an :meth:`export_session` file into this store (optionally under another id)."""
        lines = Path(path).read_text().splitlines()
        try:
            header = json.loads(lines[0])
            sid = session_id or header["agentspec_session"]
            fingerprint = header["fingerprint"]
            calls = [json.loads(line) for line in lines[1:] if line.strip()]
        except (IndexError, KeyError, ValueError) as exc:
            raise StoreError(f"{path} is not an agentspec session export ({exc})") from exc
        for call in calls:
            self.append(sid, call["prompt"], call["output"], call.get("stats"), fingerprint=fingerprint)
        return sid

    def stored_bytes(self) -> tuple[int, int]:
        """``(payload bytes, tokens)`` over all records: the storage cost per token."""
        r = records_table
        size = sa.func.length(r.c.prompt) + sa.func.length(r.c.output)
        with self.engine.connect() as conn:
            tokens = sa.func.coalesce(sa.func.sum(r.c.prompt_tokens + r.c.output_tokens), 0)
            b, n = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(size), 0), tokens)).one()
        return int(b), int(n)


def _cause(exc: sa.exc.DBAPIError) -> str:
    """The driver's message, with the usual causes said plainly."""
    text = str(exc.orig).strip()
    if "readonly" in text or "read-only" in text:
        return f"the database is read-only ({text})"
    return text
