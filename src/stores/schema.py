"""The store's tables (schema v6) and the in-place upgrades of older stores.

Every table is keyed by ``(namespace, session_id)``: a namespace is a tenant's own set of sessions
(:meth:`SqlStore.scoped`); the unscoped store is namespace ``""``. Record ids only ever grow
(SQLite ``AUTOINCREMENT``, a PostgreSQL sequence), so a reader's cursor never skips a new call.

Every row of the sessions, records and statistics tables carries a ``checksum`` of its values
(:func:`row_checksum`; the token and statistics payloads have their own, see :mod:`.codec`), so an
altered header, total or call is found when it is read, never returned as it is. The schema row
counts the store's write transactions (``commits``: see :mod:`.commits`).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .base import NAMESPACE_LIMIT, SESSION_ID_LIMIT, CorruptRecordError, SchemaVersionError
from .codec import checksum_of, decode_legacy_stats, encode_stats

SCHEMA_VERSION = 6
SOURCES = ("request", "session", "global")  # SpecStats.accepted_by_source keys
V3_SOURCES = (*SOURCES, "recycled")  # v3 and v4 also counted Token Recycling's drafts (removed since)
COUNTERS = ("prompt_tokens", "prefill_tokens", "output_tokens", "steps", "drafted_tokens", "accepted_tokens")
TABLES = ("agentspec_sessions", "agentspec_records", "agentspec_stats")

metadata = sa.MetaData()
ZERO = sa.text("0")
schema_table = sa.Table(
    "agentspec_schema", metadata,
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("commits", sa.BigInteger, nullable=False, server_default=ZERO),  # added in schema v6
)
sessions_table = sa.Table(
    "agentspec_sessions", metadata,
    sa.Column("namespace", sa.String(NAMESPACE_LIMIT), primary_key=True),  # added in schema v4
    sa.Column("session_id", sa.String(SESSION_ID_LIMIT), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),  # added in schema v2
    sa.Column("checksum", sa.BigInteger, nullable=False, server_default=ZERO),  # added in schema v6
)
records_table = sa.Table(
    "agentspec_records", metadata,
    sa.Column("record_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("namespace", sa.String(NAMESPACE_LIMIT), nullable=False),
    sa.Column("session_id", sa.String(SESSION_ID_LIMIT), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("output_tokens", sa.Integer, nullable=False),
    sa.Column("prompt", sa.LargeBinary, nullable=False),
    sa.Column("output", sa.LargeBinary, nullable=False),
    sa.Column("stats", sa.LargeBinary, nullable=False),  # checksummed since v4 (NULL allowed before)
    sa.Column("checksum", sa.BigInteger, nullable=False, server_default=ZERO),  # added in schema v6
    sa.ForeignKeyConstraint(["namespace", "session_id"],
                            ["agentspec_sessions.namespace", "agentspec_sessions.session_id"], ondelete="CASCADE"),
    sa.Index("ix_agentspec_records_by_session", "namespace", "session_id", "record_id"),
    sa.Index("ix_agentspec_records_by_tokenizer", "namespace", "fingerprint", "record_id"),
    sqlite_autoincrement=True,
)
stats_table = sa.Table(  # added in schema v3: running totals per session, kept when calls are pruned
    "agentspec_stats", metadata,
    sa.Column("namespace", sa.String(NAMESPACE_LIMIT), primary_key=True),
    sa.Column("session_id", sa.String(SESSION_ID_LIMIT), primary_key=True),
    sa.Column("calls", sa.BigInteger, nullable=False),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in COUNTERS),
    *(sa.Column(f"accepted_{src}", sa.BigInteger, nullable=False) for src in SOURCES),
    sa.Column("prefill_seconds", sa.Float, nullable=False),
    sa.Column("decode_seconds", sa.Float, nullable=False),
    sa.Column("checksum", sa.BigInteger, nullable=False, server_default=ZERO),  # added in schema v6
    sa.ForeignKeyConstraint(["namespace", "session_id"],
                            ["agentspec_sessions.namespace", "agentspec_sessions.session_id"], ondelete="CASCADE"),
)


PAYLOADS = ("prompt", "output", "stats")  # checksummed on their own
CHECKED = {table.name: [c for c in table.c if c.name not in ("checksum", "record_id", *PAYLOADS)]
           for table in (sessions_table, records_table, stats_table)}  # the columns a row checksum covers


_AS_TYPE = {table: [(c.name, c.type.python_type) for c in columns] for table, columns in CHECKED.items()}


def row_checksum(table: sa.Table, row) -> int:
    """The checksum of a row (a mapping of column name to value) of ``table``: its values other
    than the record id and the payloads, each as its column's type."""
    return checksum_of([as_type(row[name]) for name, as_type in _AS_TYPE[table.name]])


def checked(table: sa.Table, row: dict) -> dict:
    """``row`` with its checksum."""
    return {**row, "checksum": row_checksum(table, row)}


def intact(table: sa.Table, row) -> bool:
    """Whether a row read back (a mapping with its ``checksum``) still matches its checksum."""
    try:
        return row["checksum"] == row_checksum(table, row)
    except (TypeError, ValueError, OverflowError):  # a value altered into another type (text, a blob)
        return False


def stats_row(prompt_tokens: int, output_tokens: int, stats: dict, sources: tuple[str, ...] = SOURCES) -> dict:
    """The ``agentspec_stats`` increments of one call (token counts from the payloads themselves)."""
    by_source = stats.get("accepted_by_source") or {}
    row = {name: int(stats.get(name) or 0) for name in COUNTERS}
    row.update(calls=1, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
               prefill_seconds=float(stats.get("prefill_seconds") or 0.0),
               decode_seconds=float(stats.get("decode_seconds") or 0.0),
               **{f"accepted_{src}": int(by_source.get(src, 0)) for src in sources})
    return row


def _migrate_1_to_2(conn: Connection) -> None:
    """v2 added ``agentspec_sessions.updated_at`` (filled from the newest record)."""
    conn.execute(sa.text("ALTER TABLE agentspec_sessions ADD COLUMN updated_at FLOAT"))
    conn.execute(sa.text(
        "UPDATE agentspec_sessions SET updated_at = COALESCE((SELECT MAX(r.created_at) FROM agentspec_records r "
        "WHERE r.session_id = agentspec_sessions.session_id), created_at)"
    ))


def _migrate_2_to_3(conn: Connection) -> None:
    """v3 added ``agentspec_stats`` (keyed by session id alone), filled here from the stored calls."""
    columns = ["calls", *COUNTERS, *(f"accepted_{src}" for src in V3_SOURCES)]
    conn.execute(sa.text(
        "CREATE TABLE agentspec_stats (session_id VARCHAR(512) NOT NULL PRIMARY KEY "
        "REFERENCES agentspec_sessions (session_id) ON DELETE CASCADE, "
        + "".join(f"{c} BIGINT NOT NULL, " for c in columns)
        + "prefill_seconds FLOAT NOT NULL, decode_seconds FLOAT NOT NULL)"))
    totals: dict[str, dict] = {}
    for sid, n_prompt, n_output, payload in conn.execute(sa.text(
            "SELECT session_id, prompt_tokens, output_tokens, stats FROM agentspec_records ORDER BY record_id")):
        try:
            row = stats_row(n_prompt, n_output, decode_legacy_stats(payload), V3_SOURCES)
        except CorruptRecordError:
            row = stats_row(n_prompt, n_output, {}, V3_SOURCES)
        total = totals.setdefault(sid, dict.fromkeys(row, 0))
        for key, value in row.items():
            total[key] += value
    if totals:
        names = ["session_id", *next(iter(totals.values()))]
        conn.execute(sa.text(f"INSERT INTO agentspec_stats ({', '.join(names)}) "
                             f"VALUES ({', '.join(':' + n for n in names)})"),
                     [dict(session_id=sid, **t) for sid, t in totals.items()])


def _migrate_3_to_4(conn: Connection) -> None:
    """v4 keys every table by ``(namespace, session_id)`` (older sessions go to namespace ``""``),
    checksums the statistics payloads and never reuses a record id. The tables are rebuilt: the
    old ones are renamed, copied into the new ones and dropped."""
    for name in TABLES:
        conn.execute(sa.text(f"ALTER TABLE {name} RENAME TO {name}_v3"))
    metadata.create_all(conn, tables=[sessions_table, records_table, stats_table])
    conn.execute(sa.text("INSERT INTO agentspec_sessions (namespace, session_id, fingerprint, created_at, updated_at) "
                         "SELECT '', session_id, fingerprint, created_at, updated_at FROM agentspec_sessions_v3"))
    payload_columns = "created_at, prompt_tokens, output_tokens, prompt, output"
    conn.execute(sa.text(
        f"INSERT INTO agentspec_records (record_id, namespace, session_id, fingerprint, {payload_columns}, stats) "
        f"SELECT record_id, '', session_id, fingerprint, {payload_columns}, COALESCE(stats, :empty) "
        "FROM agentspec_records_v3"), {"empty": b""})
    rows = conn.execute(sa.text("SELECT record_id, stats FROM agentspec_records_v3 ORDER BY record_id")).all()
    sealed = []
    for record_id, payload in rows:
        try:
            sealed.append({"i": record_id, "s": encode_stats(decode_legacy_stats(payload))})
        except CorruptRecordError:
            pass  # left as it was: still undecodable (and counted) when read
    if sealed:
        conn.execute(sa.text("UPDATE agentspec_records SET stats = :s WHERE record_id = :i"), sealed)
    stat_columns = ", ".join(c.name for c in stats_table.c if c.name not in ("namespace", "session_id", "checksum"))
    conn.execute(sa.text(f"INSERT INTO agentspec_stats (namespace, session_id, {stat_columns}) "
                         f"SELECT '', session_id, {stat_columns} FROM agentspec_stats_v3"))
    for name in reversed(TABLES):  # children first
        conn.execute(sa.text(f"DROP TABLE {name}_v3"))
    if conn.dialect.name == "postgresql":  # the new sequence continues after the copied ids
        conn.execute(sa.text("SELECT setval(pg_get_serial_sequence('agentspec_records', 'record_id'), "
                             "COALESCE(MAX(record_id), 0) + 1, false) FROM agentspec_records"))


def _migrate_4_to_5(conn: Connection) -> None:
    """v5 drops ``agentspec_stats.accepted_recycled``: Token Recycling is gone and nothing counts into
    it any more. A store upgraded from v3 or older through :func:`_migrate_3_to_4`, which builds
    today's tables, never had it."""
    if "accepted_recycled" in {c["name"] for c in sa.inspect(conn).get_columns("agentspec_stats")}:
        conn.execute(sa.text("ALTER TABLE agentspec_stats DROP COLUMN accepted_recycled"))


def _migrate_5_to_6(conn: Connection) -> None:
    """v6 adds a checksum to every row of the sessions, records and statistics tables (computed
    here for the rows there are, 0 until then) and the commit counter of the schema row. A store upgraded
    through :func:`_migrate_3_to_4` has the columns already (zero)."""
    for table in (schema_table, sessions_table, records_table, stats_table):
        present = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
        for column in ("commits", "checksum"):
            if column in table.c and column not in present:
                conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0"))
    for table in (sessions_table, records_table, stats_table):
        keys = list(table.primary_key.columns)
        columns = {c.name: c for c in (*keys, *CHECKED[table.name])}.values()
        # rows without one only: a version altered back to 5 must not seal rows damaged since
        rows = conn.execute(sa.select(*columns).where(table.c.checksum == 0)).mappings().all()
        if rows:
            update = (table.update().where(*(c == sa.bindparam(f"k_{c.name}") for c in keys))
                      .values(checksum=sa.bindparam("sum")))
            conn.execute(update, [{**{f"k_{c.name}": row[c.name] for c in keys}, "sum": row_checksum(table, row)}
                                  for row in rows])


# from version -> to version + 1
MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4, 4: _migrate_4_to_5, 5: _migrate_5_to_6}


def prepare_schema(conn: Connection, where: str) -> None:
    """Create the tables in an empty database, or check the version and upgrade in place (in the
    caller's transaction; ``where`` names the store in errors)."""
    tables = set(sa.inspect(conn).get_table_names())
    if "agentspec_schema" not in tables:
        if tables & set(TABLES):
            raise SchemaVersionError(f"{where} has agentspec tables but no schema version")
        metadata.create_all(conn)
        conn.execute(schema_table.insert().values(version=SCHEMA_VERSION))
        return
    version = conn.execute(sa.select(schema_table.c.version)).scalar()
    if version is None:
        raise SchemaVersionError(f"{where}: the schema version row is missing")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(f"{where} has schema v{version}, newer than this agentspec's "
                                 f"v{SCHEMA_VERSION}; upgrade agentspec to use it")
    while version < SCHEMA_VERSION:
        MIGRATIONS[version](conn)
        version += 1
        conn.execute(schema_table.update().values(version=version))
