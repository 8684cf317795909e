"""The session store on SQLAlchemy 2: SQLite by default, PostgreSQL for many processes or machines.

Open with :func:`open_store`; any number of processes may open a new or old store at once (the
first creates or upgrades the tables, the others wait). SQLite runs in WAL mode with a busy timeout, so several local
processes can read and append at once and a killed writer never leaves a half-written call
(each call is one transaction). PostgreSQL (``postgresql+psycopg://user:pw@host/db``) lets any
number of agentspec processes on any machines share one cache: point every process at the same
URL (``agentspec run --store URL``, ``Engine.from_pretrained(store=URL)``); each appends in its
own transaction, and a session's calls come back in append order.

Tables: ``agentspec_sessions`` (id, tokenizer fingerprint, times), ``agentspec_records`` (one row per
finished call: token payloads as msgpack+zlib, see :mod:`.codec`, and the call's statistics),
``agentspec_stats`` (running totals per session, updated in the same transaction as each append,
kept when :meth:`SqlStore.prune` evicts old calls) and ``agentspec_schema`` (the schema version).
:data:`MIGRATIONS` upgrades older stores in place when they are opened (in one transaction), and
a store written by a newer agentspec is refused with :class:`SchemaVersionError`.

Durability: a call is there once :meth:`SqlStore.append` returns (SQLite: WAL with
``synchronous=NORMAL`` survives a killed process; a power cut may lose the last few commits).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .base import (
    CallRecord,
    CorruptRecordError,
    LoadedSession,
    OutputHistory,
    SchemaVersionError,
    SessionInfo,
    StoreError,
    TokenizerMismatchError,
)
from .codec import decode_stats, decode_tokens, encode_stats, encode_tokens

SCHEMA_VERSION = 3
_SCHEMA_LOCK = 0x61676E7473706563  # PostgreSQL advisory lock key while creating or migrating tables
SOURCES = ("request", "session", "global", "recycled")  # SpecStats.accepted_by_source keys

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

COUNTERS = ("prompt_tokens", "prefill_tokens", "output_tokens", "steps", "drafted_tokens", "accepted_tokens")
stats_table = sa.Table(  # added in schema v3
    "agentspec_stats", metadata,
    sa.Column("session_id", sa.String(512), sa.ForeignKey("agentspec_sessions.session_id", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("calls", sa.BigInteger, nullable=False),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in COUNTERS),
    *(sa.Column(f"accepted_{src}", sa.BigInteger, nullable=False) for src in SOURCES),
    sa.Column("prefill_seconds", sa.Float, nullable=False),
    sa.Column("decode_seconds", sa.Float, nullable=False),
)

_TOUCH = (sessions_table.update()
          .where(sessions_table.c.session_id == sa.bindparam("sid"), sessions_table.c.fingerprint == sa.bindparam("fp"))
          .values(updated_at=sa.bindparam("now")))
_INSERT_RECORD = records_table.insert()


def _stats_row(prompt_tokens: int, output_tokens: int, stats: dict) -> dict:
    """The ``agentspec_stats`` increments of one call (token counts from the payloads themselves)."""
    by_source = stats.get("accepted_by_source") or {}
    row = {name: int(stats.get(name) or 0) for name in COUNTERS}
    row.update(calls=1, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
               prefill_seconds=float(stats.get("prefill_seconds") or 0.0),
               decode_seconds=float(stats.get("decode_seconds") or 0.0),
               **{f"accepted_{src}": int(by_source.get(src, 0)) for src in SOURCES})
    return row


def _migrate_1_to_2(conn: Connection) -> None:
    """v2 added ``agentspec_sessions.updated_at`` (filled from the newest record)."""
    conn.execute(sa.text("ALTER TABLE agentspec_sessions ADD COLUMN updated_at FLOAT"))
    conn.execute(sa.text(
        "UPDATE agentspec_sessions SET updated_at = COALESCE((SELECT MAX(r.created_at) FROM agentspec_records r "
        "WHERE r.session_id = agentspec_sessions.session_id), created_at)"
    ))


def _migrate_2_to_3(conn: Connection) -> None:
    """v3 added ``agentspec_stats``: per-session totals, filled here from the stored calls."""
    stats_table.create(conn)
    r = records_table
    totals: dict[str, dict] = {}
    for sid, n_prompt, n_output, payload in conn.execute(
            sa.select(r.c.session_id, r.c.prompt_tokens, r.c.output_tokens, r.c.stats).order_by(r.c.record_id)):
        try:
            row = _stats_row(n_prompt, n_output, decode_stats(payload))
        except CorruptRecordError:
            row = _stats_row(n_prompt, n_output, {})
        total = totals.setdefault(sid, dict.fromkeys(row, 0))
        for key, value in row.items():
            total[key] += value
    if totals:
        conn.execute(stats_table.insert(), [dict(session_id=sid, **t) for sid, t in totals.items()])


MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3}  # from version -> function upgrading to version + 1


def default_url() -> str:
    """``sqlite:///$AGENTSPEC_HOME/cache.db``."""
    from agentspec.config import agentspec_home

    return f"sqlite:///{agentspec_home() / 'cache.db'}"


def open_store(url: str | None = None) -> SqlStore:
    """Open (creating or upgrading) the store at ``url`` (default: the SQLite file under $AGENTSPEC_HOME)."""
    return SqlStore(url or default_url())


class SqlStore:
    """Sessions and their calls in a SQL database. Safe to share between threads and processes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._known: dict[str, str] = {}  # session id -> fingerprint, seen in this process (append fast path)
        if self.is_sqlite:
            self._check_sqlite_path(url)
        try:
            self.engine = self._create_engine(url)
            self._add_stats = self._stats_upsert()  # statements are built once; appends only bind values
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
        """Create the tables, or check the version and migrate; one process at a time (SQLite: the
        transaction's write lock; PostgreSQL: an advisory lock held until commit)."""
        if not self.is_sqlite:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
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
        conn.execute(insert.on_conflict_do_nothing(index_elements=["session_id"]))  # races with other processes
        existing = conn.execute(sa.select(sessions_table.c.fingerprint)
                                .where(sessions_table.c.session_id == session_id)).scalar()
        if existing != fingerprint:
            raise TokenizerMismatchError(
                f"session {session_id!r} holds tokens of tokenizer {existing}, not {fingerprint}; "
                "use another session id for this model"
            )

    def _stats_upsert(self):
        """``INSERT ... ON CONFLICT (session_id) DO UPDATE`` adding one call's increments (built once)."""
        insert = self._insert(stats_table)
        columns = [c.name for c in stats_table.c if c.name != "session_id"]
        return insert.on_conflict_do_update(
            index_elements=["session_id"], set_={c: stats_table.c[c] + insert.excluded[c] for c in columns})

    def _insert(self, table: sa.Table):
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table)

    def append(self, session_id: str, prompt_ids: Sequence[int], output_ids: Sequence[int],
               stats: dict | None = None, fingerprint: str = "") -> int:
        """Append one finished call in one transaction (the record, the session's time and its
        statistics); returns its record id (append order)."""
        try:
            with self.engine.begin() as conn:
                record_id = self._append(conn, session_id, prompt_ids, output_ids, stats or {}, fingerprint)
        except sa.exc.DBAPIError as exc:
            raise StoreError(f"cannot write to the store at {self._safe_url()}: {_cause(exc)}") from exc
        self._known[session_id] = fingerprint
        return record_id

    def _append(self, conn: Connection, session_id: str, prompt_ids: Sequence[int], output_ids: Sequence[int],
                stats: dict, fingerprint: str) -> int:
        now = time.time()
        touch = {"sid": session_id, "fp": fingerprint, "now": now}
        # fast path: a session this process has written to, still there with the same tokenizer
        if not (self._known.get(session_id) == fingerprint and conn.execute(_TOUCH, touch).rowcount == 1):
            self._ensure_session(conn, session_id, fingerprint, now)
            conn.execute(_TOUCH, touch)
        row = dict(session_id=session_id, fingerprint=fingerprint, created_at=now,
                   prompt_tokens=len(prompt_ids), output_tokens=len(output_ids),
                   prompt=encode_tokens(prompt_ids), output=encode_tokens(output_ids), stats=encode_stats(stats))
        record_id = conn.execute(_INSERT_RECORD, row).inserted_primary_key[0]
        conn.execute(self._add_stats, {"session_id": session_id,
                                       **_stats_row(len(prompt_ids), len(output_ids), stats)})
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
        loaded = self.calls_since(session_id, 0, with_prompts)
        loaded.info = info
        return loaded

    def calls_since(self, session_id: str, after: int, with_prompts: bool = True) -> LoadedSession:
        """A session's readable calls with record ids above ``after``, in append order (``info`` is
        left None: this is the cheap query a process runs before each call to see others' appends)."""
        r = records_table
        query = (sa.select(r.c.record_id, r.c.created_at, r.c.output, r.c.stats,
                           r.c.prompt if with_prompts else sa.null())
                 .where(r.c.session_id == session_id, r.c.record_id > after).order_by(r.c.record_id))
        loaded = LoadedSession(None, [], newest_id=after)
        with self.engine.connect() as conn:
            for record_id, created, output, stats, prompt in conn.execute(query):
                loaded.newest_id = record_id
                try:
                    loaded.calls.append(CallRecord(
                        record_id, session_id, decode_tokens(prompt) if prompt is not None else [],
                        decode_tokens(output), decode_stats(stats), created))
                except CorruptRecordError as exc:
                    loaded.skipped += 1
                    loaded.errors.append(f"record {record_id}: {exc}")
        return loaded

    def recent_outputs(self, fingerprint: str, max_tokens: int, after: int = 0) -> OutputHistory:
        """Outputs of the newest calls of all sessions of this tokenizer (record ids above ``after``),
        up to ``max_tokens`` tokens, oldest first."""
        r = records_table
        query = (sa.select(r.c.record_id, r.c.session_id, r.c.output, r.c.output_tokens)
                 .where(r.c.fingerprint == fingerprint, r.c.record_id > after).order_by(r.c.record_id.desc()))
        history, total = OutputHistory([], [], [], 0, after), 0
        with self.engine.connect() as conn:
            for record_id, sid, output, n in conn.execute(query):
                history.newest_id = max(history.newest_id, record_id)
                if total + n > max_tokens and history.outputs:
                    break
                try:
                    history.outputs.append(decode_tokens(output))
                except CorruptRecordError:
                    history.skipped += 1
                    continue
                history.record_ids.append(record_id)
                history.session_ids.append(sid)
                total += n
        for column in (history.outputs, history.record_ids, history.session_ids):
            column.reverse()
        return history

    def session_stats(self, session_id: str | None = None) -> dict[str, dict]:
        """Running totals per session (all calls ever appended, pruned ones included):
        ``{session id: {"calls": n, <SpecStats counters>, "accepted_by_source": {...}}}``."""
        query = sa.select(stats_table)
        if session_id is not None:
            query = query.where(stats_table.c.session_id == session_id)
        out: dict[str, dict] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(query).mappings():
                d = {k: row[k] for k in ("calls", *COUNTERS, "prefill_seconds", "decode_seconds")}
                d["accepted_by_source"] = {src: int(row[f"accepted_{src}"]) for src in SOURCES}
                out[row["session_id"]] = d
        return out

    # ------------------------------------------------------------------ maintenance
    def delete_session(self, session_id: str) -> bool:
        """Delete a session, its calls and its statistics; False if there was no such session."""
        self._known.pop(session_id, None)
        with self.engine.begin() as conn:
            conn.execute(records_table.delete().where(records_table.c.session_id == session_id))
            conn.execute(stats_table.delete().where(stats_table.c.session_id == session_id))
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
        """Read an :meth:`export_session` file into this store as a new session (optionally under
        another id), all calls in one transaction; refuses a session id that exists already."""
        try:
            lines = Path(path).read_text().splitlines()
            header = json.loads(lines[0])
            sid = session_id or header["agentspec_session"]
            fingerprint = header["fingerprint"]
            calls = [json.loads(line) for line in lines[1:] if line.strip()]
            rows = [(call["prompt"], call["output"], call.get("stats") or {}) for call in calls]
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        except (IndexError, KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{path} is not an agentspec session export ({type(exc).__name__}: {exc})") from exc
        if self.session_info(sid) is not None:
            raise StoreError(f"session {sid!r} exists already in {self._safe_url()}; drop it first or import it "
                             "under another id")
        try:
            with self.engine.begin() as conn:
                self._ensure_session(conn, sid, fingerprint, time.time())
                for prompt, output, stats in rows:
                    self._append(conn, sid, prompt, output, stats, fingerprint)
        except (TypeError, ValueError) as exc:  # token ids that are not ints in range
            raise StoreError(f"{path} holds invalid calls ({exc}); nothing was imported") from exc
        except sa.exc.DBAPIError as exc:
            raise StoreError(f"cannot write to the store at {self._safe_url()}: {_cause(exc)}") from exc
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
