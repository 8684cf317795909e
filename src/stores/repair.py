"""Damage: check a store whole, and save what can still be read of a damaged one into a new store.

Both read the records by record id, a range at a time, and one by one inside a range that fails,
so a damaged page costs the records on it and no more; every record that cannot be read or does
not decode is counted and named, never dropped in silence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import sqlalchemy as sa

from .base import CorruptRecordError, StoreError
from .schema import records_table
from .sql import SqlStore, decode_call
from .sqlite import integrity_problems

CHUNK = 256  # record ids read at a time

_COLUMNS = (records_table.c.record_id, records_table.c.namespace, records_table.c.session_id,
            records_table.c.fingerprint, records_table.c.created_at, records_table.c.prompt_tokens,
            records_table.c.output_tokens, records_table.c.prompt, records_table.c.output, records_table.c.stats)


@dataclass
class RecordScan:
    """What a pass over every record found."""

    problems: list[str] = field(default_factory=list)  # damage of the database file itself
    records: int = 0  # records read and decoded
    bad: list[str] = field(default_factory=list)  # records unreadable or undecodable: "record N: why"
    sessions: dict[tuple[str, str], str] = field(default_factory=dict)  # (namespace, session id) -> tokenizer
    missing: int = 0  # record ids up to the newest given out that were not found (deleted, or lost unseen)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.bad


def _rows(store: SqlStore, top: int) -> Iterator[tuple[int, sa.Row | None, str]]:
    """``(record id, row, "")`` for every readable row and ``(record id, None, why)`` for each one
    that cannot be read, in record id order."""
    r = records_table
    for start in range(1, top + 1, CHUNK):
        try:
            with store._read() as conn:
                rows = conn.execute(sa.select(*_COLUMNS).where(r.c.record_id.between(start, start + CHUNK - 1))
                                    .order_by(r.c.record_id)).all()
            yield from ((row.record_id, row, "") for row in rows)
            continue
        except StoreError:
            pass
        for record_id in range(start, min(start + CHUNK, top + 1)):  # one by one around the damage
            try:
                with store._read() as conn:
                    row = conn.execute(sa.select(*_COLUMNS).where(r.c.record_id == record_id)).one_or_none()
            except StoreError as exc:
                yield record_id, None, str(exc).split(": ", 1)[-1]
                continue
            if row is not None:
                yield record_id, row, ""


def _newest_id(store: SqlStore) -> int:
    """The highest record id ever given out (SQLite: from ``sqlite_sequence`` when the table's
    last page is lost)."""
    try:
        with store._read() as conn:
            return conn.execute(sa.select(sa.func.max(records_table.c.record_id))).scalar() or 0
    except StoreError:
        if not store.is_sqlite:
            raise
    with store._read() as conn:
        return conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = 'agentspec_records'").scalar() or 0


def scan(store: SqlStore, on_call=None) -> RecordScan:
    """Check the database file (SQLite: ``PRAGMA integrity_check`` and ``foreign_key_check``, in
    full) and decode every record of every namespace; ``on_call(namespace, fingerprint, call)``
    gets each good one."""
    report = RecordScan()
    if store.is_sqlite:
        try:
            with store._read() as conn:
                report.problems += integrity_problems(conn, full=True) or []
                report.problems += [f"{table} row {rowid} refers to a missing row of {parent}"
                                    for table, rowid, parent, _ in conn.exec_driver_sql("PRAGMA foreign_key_check")]
        except StoreError as exc:
            report.problems.append(str(exc))
    top = _newest_id(store)
    for record_id, row, why in _rows(store, top):
        if row is None:
            report.bad.append(f"record {record_id}: unreadable ({why})")
            continue
        try:
            call = decode_call(row.session_id, record_id, row.created_at, row.prompt_tokens, row.output_tokens,
                               row.prompt, row.output, row.stats)
        except CorruptRecordError as exc:
            report.bad.append(f"record {record_id} of session {row.session_id!r}: {exc}")
            continue
        fingerprint = report.sessions.setdefault((row.namespace, row.session_id), row.fingerprint)
        if fingerprint != row.fingerprint:
            report.bad.append(f"record {record_id} of session {row.session_id!r}: tokenizer {row.fingerprint}, "
                              f"its session's is {fingerprint}")
            continue
        report.records += 1
        if on_call is not None:
            on_call(row.namespace, row.fingerprint, call)
    report.missing = top - report.records - len(report.bad)
    return report


def salvage(source: SqlStore, target: SqlStore, batch: int = 200) -> RecordScan:
    """Copy every call of ``source`` (all namespaces) that can still be read into ``target``, a new
    store, in the original order; the report counts and names what could not be saved. Session
    totals in the new store count the saved calls (not calls pruned before)."""
    if target.namespaces():
        raise StoreError(f"{target._safe_url()} holds sessions already; save into a new store")
    views: dict[str, SqlStore] = {}
    pending: list[tuple[str, str, object]] = []

    def flush() -> None:
        with target._write() as conn:
            for namespace, fingerprint, call in pending:
                view = views.setdefault(namespace, target.scoped(namespace))
                view._append(conn, call.session_id, call.prompt_ids, call.output_ids, call.stats, fingerprint)
        pending.clear()

    def keep(namespace: str, fingerprint: str, call) -> None:
        pending.append((namespace, fingerprint, call))
        if len(pending) >= batch:
            flush()

    report = scan(source, keep)
    flush()
    return report
