"""The session store on SQLAlchemy 2: SQLite by default, PostgreSQL for many processes or machines.

Open with :func:`open_store`; any number of processes may open a new or old store at once (the
first creates or upgrades the tables, the others wait). SQLite runs in WAL mode (see
:mod:`.sqlite`): several local processes read and append at once, a read never blocks a writer
and a killed writer never leaves a half-written call (each call is one transaction).
PostgreSQL (``postgresql+psycopg://user:pw@host/db``) lets any number of agentspec processes on
any machines share one cache: point every process at the same URL (``agentspec run --store URL``,
``Engine.from_pretrained(store=URL)``); each appends in its own transaction, and a session's
calls come back in append order.

Tables (see :mod:`.schema`): sessions, records (one row per finished call: token payloads as
msgpack+zlib with checksums, see :mod:`.codec`, and the call's statistics), running totals per
session (kept when :meth:`SqlStore.prune` evicts old calls) and the schema version. Older stores
are upgraded in place when opened; a store written by a newer agentspec is refused with
:class:`SchemaVersionError`.

Tenants: :meth:`SqlStore.scoped` is a view of one namespace: its session ids, listings, exports
and global history are its own. The namespace is a key column, not a prefix of the session id.

Damage is never silent: a damaged SQLite file is refused when it opens (``PRAGMA integrity_check``,
bounded by :data:`CHECK_SECONDS`: about 0.5 ms on a 1M-token store) or as soon as a read meets it, with a
:class:`StoreDamagedError` saying how to save what can still be read (:mod:`.repair`); a corrupt
record is skipped and counted; a session header or total that fails its checksum is a
:class:`SessionDamagedError` (``agentspec sessions check --repair`` restores it); commits lost from a
damaged ``-wal`` file are found when the store opens (:mod:`.commits`); every database error
surfaces as :class:`StoreError`.

Durability: a call is there once :meth:`SqlStore.append` returns (SQLite: WAL with
``synchronous=NORMAL`` survives a killed process; a power cut may lose the last few commits).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import sqlite
from .base import (
    NAMESPACE_LIMIT,
    CallRecord,
    CorruptRecordError,
    LoadedSession,
    OutputHistory,
    SessionDamagedError,
    SessionInfo,
    StoreDamagedError,
    StoreError,
    TokenizerMismatchError,
    check_name,
)
from .codec import decode_stats, decode_tokens, encode_stats, encode_tokens
from .commits import CommitCounter
from .schema import (
    COUNTERS,
    SCHEMA_VERSION,
    SOURCES,
    checked,
    intact,
    prepare_schema,
    records_table,
    schema_table,
    sessions_table,
    stats_row,
    stats_table,
)

logger = logging.getLogger(__name__)

CHECK_SECONDS = 2.0  # the most the integrity check may take when a SQLite store opens (then: a warning)
KNOWN_SESSIONS = 1024  # sessions whose header this process remembers (the append fast path)
_SCHEMA_LOCK = 0x61676E7473706563  # PostgreSQL advisory lock key while creating or migrating tables
_INSERT_RECORD = records_table.insert()
_COUNT_COMMIT = "UPDATE agentspec_schema SET commits = commits + 1 RETURNING commits"  # SQLite files
_KEY = ["namespace", "session_id"]
_RECORD_COLUMNS = (records_table.c.record_id, records_table.c.namespace, records_table.c.session_id,
                   records_table.c.fingerprint, records_table.c.created_at, records_table.c.prompt_tokens,
                   records_table.c.output_tokens, records_table.c.checksum)
DATABASE_ERRORS = (sa.exc.SQLAlchemyError, UnicodeDecodeError)  # the driver decodes damaged text itself


def default_url() -> str:
    """``sqlite:///$AGENTSPEC_HOME/cache.db``."""
    from agentspec.config import agentspec_home  # config is a leaf module; imported late to keep stores standalone

    return f"sqlite:///{agentspec_home() / 'cache.db'}"


def open_store(url: str | None = None, *, create: bool = True, check: bool = True) -> SqlStore:
    """Open the store at ``url`` (default: the SQLite file under $AGENTSPEC_HOME), upgrading an
    older schema. ``create=False`` (read commands): a missing SQLite file is a :class:`StoreError`
    naming it. ``check=False`` skips the integrity check at open (to save or inspect a damaged file)."""
    return SqlStore(url or default_url(), create=create, check=check)


def _cause(exc: Exception) -> str:
    """The driver's message, with the usual causes said plainly."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    if "readonly" in text or "read-only" in text:
        return f"the database is read-only ({text})"
    return text


class SqlStore:
    """Sessions and their calls in a SQL database. Safe to share between threads and processes."""

    def __init__(self, url: str, *, create: bool = True, check: bool = True) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.namespace = ""
        self._known: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> (tokenizer, created): fast path
        self._damage: list[str] = []  # damage met so far (shared by the scoped views): writes are refused
        try:
            self._connect(create, damaged=not check)
            if check and self.is_sqlite:
                self._check_at_open()
            self._prepare_schema()
            if check and self._counter is not None:
                self._check_commits()
        except DATABASE_ERRORS as exc:
            error = self._error(exc, "open")
            if check or not isinstance(error, StoreDamagedError):
                raise error from exc
            # check=False: a damaged file opens, for reading what can still be read (it takes no writes)

    # ------------------------------------------------------------------ set-up
    def _safe_url(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def _connect(self, create: bool, damaged: bool) -> None:
        self._counter: CommitCounter | None = None  # SQLite files: the count of commits kept beside the file
        if not self.is_sqlite:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, connect_args={"connect_timeout": 10}
                                           if self.url.startswith("postgresql") else {})
        else:
            file = sqlite.file_path(self.url)
            if file is not None:
                self._counter = CommitCounter(file)
                if sqlite.check_file(file, create) and sqlite.create_file(file, self._create_tables):
                    self._counter.reset(0)  # a new file: a counter left by a store once there is not its own
            self.engine = sqlite.engine_for(file, self.url, damaged)
        self._writer = self.engine.execution_options(**{sqlite.WRITE: True})
        # statements are built once; appends only bind values
        s, t = sessions_table, stats_table
        self._touch = (s.update().where(s.c.namespace == sa.bindparam("ns"), s.c.session_id == sa.bindparam("sid"),
                                        s.c.fingerprint == sa.bindparam("fp"), s.c.created_at == sa.bindparam("at"))
                       .values(updated_at=sa.bindparam("now"), checksum=sa.bindparam("sum")))
        self._header = sa.select(s).where(s.c.namespace == sa.bindparam("ns"), s.c.session_id == sa.bindparam("sid"))
        self._totals = (sa.select(t).where(t.c.namespace == sa.bindparam("ns"), t.c.session_id == sa.bindparam("sid"))
                        .with_for_update())
        self._new_totals = self._insert(t).on_conflict_do_nothing(index_elements=_KEY).returning(t.c.calls)
        self._set_totals = t.update().where(t.c.namespace == sa.bindparam("ns"), t.c.session_id == sa.bindparam("sid"))

    def _create_tables(self, engine: sa.Engine) -> None:
        with engine.execution_options(**{sqlite.WRITE: True}).begin() as conn:
            prepare_schema(conn, self._safe_url())

    def _check_at_open(self) -> None:
        with self.engine.connect() as conn:
            problems = sqlite.integrity_problems(conn, full=True, seconds=CHECK_SECONDS)
        if problems is None:
            logger.warning("the integrity check of %s did not finish in %.1f s and was left out; "
                           "run `agentspec sessions check` to check it whole", self._safe_url(), CHECK_SECONDS)
        elif problems:
            raise StoreDamagedError(f"cannot open the store at {self._safe_url()}: {self._damaged(problems)}")

    def _check_commits(self) -> None:
        """Refuse a file that holds fewer commits than were made to it (see :mod:`.commits`)."""
        try:
            made = self._counter.read()  # first: a count read before the database's can only be lower
        except OSError as exc:
            logger.warning("cannot read the commit counter %s (%s): lost commits go unreported", self._counter.path,
                           exc)
            return
        with self.engine.connect() as conn:
            held = conn.execute(sa.select(schema_table.c.commits)).scalar() or 0
        if made is None:
            with contextlib.suppress(OSError):  # (a write after each commit warns, see _write)
                self._counter.advance(held)
        elif made > held:
            message = lost_commits(made, held, self._safe_url())
            self._damage.append(message)
            raise StoreDamagedError(f"cannot open the store at {self._safe_url()}: {message}")

    def _damaged(self, problems: Sequence[str]) -> str:
        """What is damaged and the way out (also remembered: no more writes into this file)."""
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        message = (f"the database file is damaged ({shown}). agentspec will not use it: save what can still be "
                   f"read into a new store with `agentspec sessions export --into sqlite:///NEW.db --store "
                   f"{self._safe_url()}` and use the new store (or move the file away to start afresh)")
        if not self._damage:
            self._damage.append(message)
        return message

    def _prepare_schema(self) -> None:
        """Create or upgrade the tables, one process at a time (SQLite: the write lock; PostgreSQL: an
        advisory lock held until commit); a store already at this version only reads its version."""
        with self.engine.connect() as conn:
            if sa.inspect(conn).has_table("agentspec_schema") and (
                    conn.execute(sa.select(schema_table.c.version)).scalar() == SCHEMA_VERSION):
                return
        with self._writer.begin() as conn:
            if not self.is_sqlite:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
            prepare_schema(conn, self._safe_url())

    def _error(self, exc: Exception, action: str) -> StoreError:
        """The one translation of database errors into :class:`StoreError`."""
        if isinstance(exc, sa.exc.ArgumentError):
            return StoreError(f"invalid store URL {self.url!r}: {exc}")
        if isinstance(exc, sa.exc.NoSuchModuleError):
            return StoreError(f"no driver for {self.url!r} ({exc}); for PostgreSQL: pip install 'psycopg[binary]'")
        where = f"cannot {action} the store at {self._safe_url()}"
        if self.is_sqlite and sqlite.is_damage(exc):
            return StoreDamagedError(f"{where}: {self._damaged([_cause(exc)])}")
        return StoreError(f"{where}: {_cause(exc)}")

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        """A read transaction (SQLite: a snapshot that never blocks a writer)."""
        try:
            with self.engine.connect() as conn:
                yield conn
        except DATABASE_ERRORS as exc:
            raise self._error(exc, "read") from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction, committed when the block ends; refused once the file is known damaged."""
        if self._damage:
            raise StoreDamagedError(f"cannot write to the store at {self._safe_url()}: {self._damage[0]}")
        commits = None
        try:
            with self._writer.begin() as conn:
                yield conn
                if self._counter is not None:
                    commits = conn.exec_driver_sql(_COUNT_COMMIT).scalar_one()
        except DATABASE_ERRORS as exc:
            raise self._error(exc, "write to") from exc
        if commits is not None:
            try:
                self._counter.advance(commits)  # after the commit: a writer killed before it leaves the count low
            except OSError as exc:
                logger.warning("cannot update the commit counter %s (%s): lost commits may go unreported",
                               self._counter.path, exc)

    def scoped(self, namespace: str) -> SqlStore:
        """A view of this store in which session ids, listings, exports, statistics and the global
        history are ``namespace``'s own (the unscoped store is namespace ``""``). Shares the
        connections; any number of views may be used at once."""
        view = copy.copy(self)
        view.namespace = check_name(namespace, "namespace", NAMESPACE_LIMIT, empty=True)
        view._known = OrderedDict()
        return view

    def namespaces(self) -> list[str]:
        """Every namespace that holds sessions, ``""`` (the unscoped store) included."""
        with self._read() as conn:
            return list(conn.execute(sa.select(sessions_table.c.namespace).distinct()
                                     .order_by(sessions_table.c.namespace)).scalars())

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute(sa.select(schema_table.c.version)).scalar())

    def close(self) -> None:
        """Close the connections (of every view of this store)."""
        self.engine.dispose()
        if self._counter is not None:
            self._counter.close()

    # ------------------------------------------------------------------ writing
    def open_session(self, session_id: str, fingerprint: str) -> SessionInfo:
        """Create the session if new; raise if it exists with another tokenizer."""
        with self._write() as conn:
            self._ensure_session(conn, check_name(session_id), fingerprint, time.time())
        info = self.session_info(session_id)
        assert info is not None
        return info

    def _ensure_session(self, conn: Connection, session_id: str, fingerprint: str, now: float) -> float:
        """Create the session if new (its creation time is returned), or check its tokenizer."""
        row = checked(sessions_table, dict(namespace=self.namespace, session_id=session_id, fingerprint=fingerprint,
                                           created_at=now, updated_at=now))
        conn.execute(self._insert(sessions_table).values(row).on_conflict_do_nothing(index_elements=_KEY))  # races
        created = self._check_tokenizer(conn, session_id, fingerprint)
        return now if created is None else created

    def _check_tokenizer(self, conn: Connection, session_id: str, fingerprint: str) -> float | None:
        """The session's creation time (None: no such session); :class:`TokenizerMismatchError` when it
        belongs to another tokenizer, :class:`SessionDamagedError` when its header is damaged."""
        row = conn.execute(self._header, {"ns": self.namespace, "sid": session_id}).mappings().one_or_none()
        if row is None:
            return None
        self._check_header(row)
        if row["fingerprint"] != fingerprint:
            raise TokenizerMismatchError(
                f"session {session_id!r} holds tokens of tokenizer {row['fingerprint']}, not {fingerprint}; "
                "token ids of different tokenizers are never mixed: use another session id for this model")
        return row["created_at"]

    def _check_header(self, row) -> None:
        if not intact(sessions_table, row):
            raise SessionDamagedError(
                f"the header of session {row['session_id']!r} in {self._safe_url()} is damaged (its tokenizer or "
                f"times fail their checksum); restore it from its calls with `agentspec sessions check --repair "
                f"--store {self._safe_url()}`")

    def _add_totals(self, conn: Connection, session_id: str, increments: dict) -> None:
        """Add one call's increments to the session's running totals (read, checked, written back);
        totals that fail their checksum are left as they are, to be rebuilt by a repair."""
        key = {"ns": self.namespace, "sid": session_id}
        row = conn.execute(self._totals, key).mappings().one_or_none()
        if row is None:
            new = checked(stats_table, {"namespace": self.namespace, "session_id": session_id, **increments})
            if conn.execute(self._new_totals, new).first() is not None:  # (rowcount: -1 on psycopg)
                return
            row = conn.execute(self._totals, key).mappings().one()  # another process created them first
        if not intact(stats_table, row):
            logger.warning("the totals of session %r in %s are damaged and were not updated; rebuild them with "
                           "`agentspec sessions check --repair`", session_id, self._safe_url())
            return
        new = checked(stats_table, {**row, **{name: row[name] + value for name, value in increments.items()}})
        conn.execute(self._set_totals, {**key, **{name: new[name] for name in (*increments, "checksum")}})

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
        check_name(session_id)
        with self._write() as conn:
            record_id = self._append(conn, session_id, prompt_ids, output_ids, stats or {}, fingerprint)
        self._known.move_to_end(session_id)
        if len(self._known) > KNOWN_SESSIONS:
            self._known.popitem(last=False)
        return record_id

    def _append(self, conn: Connection, session_id: str, prompt_ids: Sequence[int], output_ids: Sequence[int],
                stats: dict, fingerprint: str) -> int:
        now = time.time()
        # fast path: a session this process has written to, still there with the same tokenizer and creation
        known = self._known.get(session_id)
        if known is None or known[0] != fingerprint or self._touch_session(conn, session_id, fingerprint,
                                                                           known[1], now) != 1:
            created = self._ensure_session(conn, session_id, fingerprint, now)
            self._touch_session(conn, session_id, fingerprint, created, now)
            self._known[session_id] = (fingerprint, created)
        row = checked(records_table, dict(
            namespace=self.namespace, session_id=session_id, fingerprint=fingerprint, created_at=now,
            prompt_tokens=len(prompt_ids), output_tokens=len(output_ids)))
        row.update(prompt=encode_tokens(prompt_ids), output=encode_tokens(output_ids), stats=encode_stats(stats))
        record_id = conn.execute(_INSERT_RECORD, row).inserted_primary_key[0]
        self._add_totals(conn, session_id, stats_row(len(prompt_ids), len(output_ids), stats))
        return int(record_id)

    def _touch_session(self, conn: Connection, session_id: str, fingerprint: str, created: float, now: float) -> int:
        """Set the session's last-use time (and its header's checksum); the rows changed (0 or 1)."""
        header = checked(sessions_table, dict(namespace=self.namespace, session_id=session_id,
                                              fingerprint=fingerprint, created_at=created, updated_at=now))
        return conn.execute(self._touch, {"ns": self.namespace, "sid": session_id, "fp": fingerprint, "at": created,
                                          "now": now, "sum": header["checksum"]}).rowcount

    # ------------------------------------------------------------------ reading
    def session_info(self, session_id: str) -> SessionInfo | None:
        return next(iter(self.list_sessions(session_id=session_id)), None)

    def list_sessions(self, session_id: str | None = None) -> list[SessionInfo]:
        """Sessions with call and token totals, most recently used first."""
        r, s = records_table, sessions_table
        header = (s.c.namespace, s.c.session_id, s.c.fingerprint, s.c.created_at, s.c.updated_at, s.c.checksum)
        query = (
            sa.select(*header, sa.func.count(r.c.record_id).label("calls"),
                      sa.func.coalesce(sa.func.sum(r.c.prompt_tokens), 0).label("prompt_tokens"),
                      sa.func.coalesce(sa.func.sum(r.c.output_tokens), 0).label("output_tokens"))
            .select_from(s.outerjoin(r, (r.c.namespace == s.c.namespace) & (r.c.session_id == s.c.session_id)))
            .where(s.c.namespace == self.namespace)
            .group_by(*header)
            .order_by(s.c.updated_at.desc())
        )
        if session_id is not None:
            query = query.where(s.c.session_id == check_name(session_id))
        with self._read() as conn:
            rows = conn.execute(query).mappings().all()
        for row in rows:
            self._check_header(row)
        return [SessionInfo(row["session_id"], row["fingerprint"], row["created_at"], row["updated_at"],
                            int(row["calls"]), int(row["prompt_tokens"]), int(row["output_tokens"])) for row in rows]

    def load_session(self, session_id: str, with_prompts: bool = True, fingerprint: str | None = None) -> LoadedSession:
        """All readable calls of a session in append order; corrupt records are skipped and counted.
        With ``fingerprint``: a session of another tokenizer raises :class:`TokenizerMismatchError`."""
        info = self.session_info(session_id)
        loaded = self.calls_since(session_id, 0, with_prompts, fingerprint)
        loaded.info = info
        return loaded

    def calls_since(self, session_id: str, after: int, with_prompts: bool = True,
                    fingerprint: str | None = None) -> LoadedSession:
        """A session's readable calls with record ids above ``after``, in append order (``info`` is
        left None: this is the cheap query a process runs before each call to see others' appends).
        With ``fingerprint``: only that tokenizer's calls, and :class:`TokenizerMismatchError` if the
        session now belongs to another tokenizer (dropped and re-created by another model)."""
        r = records_table
        query = (sa.select(*_RECORD_COLUMNS, (r.c.prompt if with_prompts else sa.null()).label("prompt"), r.c.output,
                           r.c.stats)
                 .where(r.c.namespace == self.namespace, r.c.session_id == check_name(session_id),
                        r.c.record_id > after).order_by(r.c.record_id))
        if fingerprint is not None:
            query = query.where(r.c.fingerprint == fingerprint)
        loaded = LoadedSession(None, [], newest_id=after)
        with self._read() as conn:
            if fingerprint is not None:
                self._check_tokenizer(conn, session_id, fingerprint)
            for row in conn.execute(query):
                loaded.newest_id = row.record_id
                try:
                    loaded.calls.append(decode_call(row))
                except CorruptRecordError as exc:
                    loaded.skipped += 1
                    loaded.errors.append(f"record {row.record_id}: {exc}")
        return loaded

    def recent_outputs(self, fingerprint: str, max_tokens: int, after: int = 0) -> OutputHistory:
        """Outputs of the newest calls of all sessions of this tokenizer (record ids above ``after``),
        up to ``max_tokens`` tokens, oldest first."""
        r = records_table
        query = (sa.select(*_RECORD_COLUMNS, r.c.output)
                 .where(r.c.namespace == self.namespace, r.c.fingerprint == fingerprint, r.c.record_id > after)
                 .order_by(r.c.record_id.desc()))
        history, total = OutputHistory([], [], [], 0, after), 0
        with self._read() as conn:
            for row in conn.execute(query):
                history.newest_id = max(history.newest_id, row.record_id)
                try:
                    check_record(row)  # first: its token count is one of the values checked
                except CorruptRecordError:
                    history.skipped += 1
                    continue
                if total + row.output_tokens > max_tokens and history.outputs:
                    break
                try:
                    history.outputs.append(decode_counted(row.output, row.output_tokens, "output"))
                except CorruptRecordError:
                    history.skipped += 1
                    continue
                history.record_ids.append(row.record_id)
                history.session_ids.append(row.session_id)
                total += row.output_tokens
        for column in (history.outputs, history.record_ids, history.session_ids):
            column.reverse()
        return history

    def session_stats(self, session_id: str | None = None) -> dict[str, dict]:
        """Running totals per session (all calls ever appended, pruned ones included):
        ``{session id: {"calls": n, <SpecStats counters>, "accepted_by_source": {...}}}``; totals that fail
        their checksum raise :class:`SessionDamagedError`."""
        query = sa.select(stats_table).where(stats_table.c.namespace == self.namespace)
        if session_id is not None:
            query = query.where(stats_table.c.session_id == check_name(session_id))
        out: dict[str, dict] = {}
        with self._read() as conn:
            for row in conn.execute(query).mappings():
                if not intact(stats_table, row):
                    raise SessionDamagedError(
                        f"the totals of session {row['session_id']!r} in {self._safe_url()} are damaged (they fail "
                        f"their checksum); rebuild them from the stored calls with `agentspec sessions check "
                        f"--repair --store {self._safe_url()}`")
                d = {k: row[k] for k in ("calls", *COUNTERS, "prefill_seconds", "decode_seconds")}
                d["accepted_by_source"] = {src: int(row[f"accepted_{src}"]) for src in SOURCES}
                out[row["session_id"]] = d
        return out

    # ------------------------------------------------------------------ maintenance
    def delete_session(self, session_id: str) -> bool:
        """Delete a session, its calls and its statistics; False if there was no such session."""
        check_name(session_id)
        self._known.pop(session_id, None)
        with self._write() as conn:
            for table in (records_table, stats_table, sessions_table):  # children first
                deleted = conn.execute(table.delete().where(
                    table.c.namespace == self.namespace, table.c.session_id == session_id)).rowcount
            return deleted > 0

    def prune(self, max_session_tokens: int | None = None, max_total_tokens: int | None = None) -> int:
        """Delete the oldest calls beyond a token budget (prompt + output) per session and in total
        (of this namespace). Returns the number of calls deleted."""
        r = records_table
        doomed: list[int] = []
        with self._read() as conn:
            rows = conn.execute(sa.select(r.c.record_id, r.c.session_id, r.c.prompt_tokens + r.c.output_tokens)
                                .where(r.c.namespace == self.namespace).order_by(r.c.record_id.desc())).all()
        per_session: dict[str, int] = {}
        total = 0
        for record_id, sid, n in rows:  # newest first: keep until a budget is spent
            per_session[sid] = per_session.get(sid, 0) + n
            total += n
            if (max_session_tokens is not None and per_session[sid] > max_session_tokens) or (
                    max_total_tokens is not None and total > max_total_tokens):
                doomed.append(record_id)
        with self._write() as conn:
            for start in range(0, len(doomed), 500):
                conn.execute(r.delete().where(r.c.record_id.in_(doomed[start:start + 500])))
        return len(doomed)

    def export_session(self, session_id: str, path: str | Path) -> int:
        """Write a session as JSON lines (a header, then one call per line; a new file is private,
        0600, like the store); returns the call count."""
        loaded = self.load_session(session_id)
        if loaded.info is None:
            raise KeyError(f"no session {session_id!r} in {self._safe_url()}")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
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
            sid = check_name(session_id or header["agentspec_session"])
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
            self.append_many(sid, fingerprint, rows)
        except (TypeError, ValueError) as exc:  # token ids that are not ints in range
            raise StoreError(f"{path} holds invalid calls ({exc}); nothing was imported") from exc
        return sid

    def append_many(self, session_id: str, fingerprint: str,
                    calls: Sequence[tuple[Sequence[int], Sequence[int], dict]]) -> None:
        """Append several calls ``(prompt ids, output ids, stats)`` to a session in one transaction."""
        check_name(session_id)
        with self._write() as conn:
            self._ensure_session(conn, session_id, fingerprint, time.time())
            for prompt, output, stats in calls:
                self._append(conn, session_id, prompt, output, stats, fingerprint)

    def stored_bytes(self) -> tuple[int, int]:
        """``(payload bytes, tokens)`` over all records of this namespace: the storage cost per token."""
        r = records_table
        size = sa.func.length(r.c.prompt) + sa.func.length(r.c.output)
        tokens = sa.func.coalesce(sa.func.sum(r.c.prompt_tokens + r.c.output_tokens), 0)
        with self._read() as conn:
            b, n = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(size), 0), tokens)
                                .where(r.c.namespace == self.namespace)).one()
        return int(b), int(n)


def decode_counted(payload: bytes, count: int, what: str) -> list[int]:
    """Token ids of a payload that must hold ``count`` of them (the row's own token count)."""
    ids = decode_tokens(payload)
    if len(ids) != count:
        raise CorruptRecordError(f"the {what} holds {len(ids)} tokens, its row says {count}")
    return ids


def check_record(row) -> None:
    """``CorruptRecordError`` when a record row's own values (not its payloads) fail their checksum."""
    if not intact(records_table, row._mapping):
        raise CorruptRecordError("the record's session, tokenizer, time or token counts fail their checksum")


def decode_call(row) -> CallRecord:
    """One stored records row (its checked columns, ``prompt``, ``output`` and ``stats``) as a
    :class:`CallRecord` (no prompt ids when ``prompt`` is None); ``CorruptRecordError`` when any
    part of it does not check out."""
    check_record(row)
    prompt = decode_counted(row.prompt, row.prompt_tokens, "prompt") if row.prompt is not None else []
    return CallRecord(row.record_id, row.session_id, prompt, decode_counted(row.output, row.output_tokens, "output"),
                      decode_stats(row.stats), row.created_at)


def lost_commits(made: int, held: int, where: str) -> str:
    """What a store file that holds fewer commits than were made to it has lost, and the ways on."""
    return (f"the last {made - held} of the {made} commits made to it are missing (its -wal file was damaged or "
            "removed before they reached the database file, or the file was replaced by an older copy); what is "
            "left is every call committed before them. Accept the loss and go on with `agentspec sessions check "
            f"--repair --store {where}`")
