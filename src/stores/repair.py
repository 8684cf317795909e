"""Damage: check a store whole, repair its metadata, and save what can still be read of a damaged
store into a new one.

All read the records by record id, a range at a time, and one by one inside a range that fails,
so a damaged page costs the records on it and no more; every record that cannot be read or does
not decode is counted and named, never dropped in silence. The check also verifies every session
header and running total against its checksum and the store's commit counter (:mod:`.commits`);
:func:`repair` rebuilds those from the calls themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import sqlalchemy as sa

from .base import CorruptRecordError, StoreError
from .schema import checked, intact, records_table, schema_table, sessions_table, stats_row, stats_table
from .sql import SqlStore, decode_call, lost_commits
from .sqlite import integrity_problems

CHUNK = 256  # record ids read at a time

_COLUMNS = (records_table.c.record_id, records_table.c.namespace, records_table.c.session_id,
            records_table.c.fingerprint, records_table.c.created_at, records_table.c.prompt_tokens,
            records_table.c.output_tokens, records_table.c.prompt, records_table.c.output, records_table.c.stats,
            records_table.c.checksum)
Key = tuple[str, str]  # (namespace, session id)


@dataclass
class RecordScan:
    """What a pass over every record, session header and running total found."""

    problems: list[str] = field(default_factory=list)  # damage of the database file itself
    records: int = 0  # records read and decoded
    bad: list[str] = field(default_factory=list)  # records unreadable or undecodable: "record N: why"
    sessions: dict[Key, str] = field(default_factory=dict)  # session -> tokenizer (of its good records)
    missing: int = 0  # record ids up to the newest given out that were not found (deleted, or lost unseen)
    headers: list[Key] = field(default_factory=list)  # session headers that fail their checksum
    totals: list[Key] = field(default_factory=list)  # running totals that fail their checksum
    commits: tuple[int, int] | None = None  # (made, held) when the file holds fewer commits than were made
    span: dict[Key, tuple[float, float]] = field(default_factory=dict)  # session -> first, last good call time
    sums: dict[Key, dict] = field(default_factory=dict)  # session -> totals of its good calls

    @property
    def ok(self) -> bool:
        return not (self.problems or self.bad or self.headers or self.totals or self.commits)

    def damage(self, where: str) -> list[str]:
        """One line per damage found outside the records."""
        lines = list(self.problems)
        lines += [f"the header of session {sid!r}{_tenant(ns)} fails its checksum" for ns, sid in self.headers]
        lines += [f"the totals of session {sid!r}{_tenant(ns)} fail their checksum" for ns, sid in self.totals]
        if self.commits:
            lines.append(lost_commits(*self.commits, where))
        return lines


def _tenant(namespace: str) -> str:
    return f" (tenant {namespace!r})" if namespace else ""


def _rows(store: SqlStore, top: int) -> Iterator[tuple[int, sa.Row | None, str]]:
    """``(record id, row, "")`` for every readable row and ``(record id, None, why)`` for each one
    that cannot be read, in record id order."""
    r = records_table
    for start in range(1, top + 1, CHUNK):
        stop = min(start + CHUNK - 1, top)  # never past ``top``: calls appended meanwhile are not counted
        try:
            with store._read() as conn:
                rows = conn.execute(sa.select(*_COLUMNS).where(r.c.record_id.between(start, stop))
                                    .order_by(r.c.record_id)).all()
            yield from ((row.record_id, row, "") for row in rows)
            continue
        except StoreError:
            pass
        for record_id in range(start, stop + 1):  # one by one around the damage
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
    full, and the commit counter), every session header and running total, and decode every record
    of every namespace; ``on_call(namespace, fingerprint, call)`` gets each good one."""
    report = RecordScan()
    if store.is_sqlite:
        try:
            made = store._counter.read() if store._counter is not None else None  # first: see _check_commits
            with store._read() as conn:
                report.problems += integrity_problems(conn, full=True) or []
                report.problems += [f"{table} row {rowid} refers to a missing row of {parent}"
                                    for table, rowid, parent, _ in conn.exec_driver_sql("PRAGMA foreign_key_check")]
                held = conn.execute(sa.select(schema_table.c.commits)).scalar() or 0
            if made is not None and made > held:
                report.commits = (made, held)
        except StoreError as exc:
            report.problems.append(str(exc))
    for table, damaged in ((sessions_table, report.headers), (stats_table, report.totals)):
        try:
            with store._read() as conn:
                damaged += [(row["namespace"], row["session_id"]) for row in conn.execute(sa.select(table)).mappings()
                            if not intact(table, row)]
        except StoreError as exc:
            report.problems.append(str(exc))
    top = _newest_id(store)
    for record_id, row, why in _rows(store, top):
        if row is None:
            report.bad.append(f"record {record_id}: unreadable ({why})")
            continue
        try:
            call = decode_call(row)
        except CorruptRecordError as exc:
            report.bad.append(f"record {record_id} of session {row.session_id!r}: {exc}")
            continue
        key = (row.namespace, row.session_id)
        fingerprint = report.sessions.setdefault(key, row.fingerprint)
        if fingerprint != row.fingerprint:
            report.bad.append(f"record {record_id} of session {row.session_id!r}: tokenizer {row.fingerprint}, "
                              f"its session's is {fingerprint}")
            continue
        report.records += 1
        first, _ = report.span.get(key, (call.created_at, 0.0))
        report.span[key] = (first, call.created_at)
        increments = stats_row(row.prompt_tokens, row.output_tokens, call.stats)
        total = report.sums.setdefault(key, dict.fromkeys(increments, 0))
        for name, value in increments.items():
            total[name] += value
        if on_call is not None:
            on_call(row.namespace, row.fingerprint, call)
    report.missing = top - report.records - len(report.bad)
    return report


def repair(store: SqlStore, report: RecordScan) -> list[str]:
    """Rebuild what :func:`scan` found damaged outside the records, from the calls themselves: a
    session header (tokenizer of its calls, created at its first call, used at its last), running
    totals (summed over the stored calls: calls pruned earlier are no longer counted) and the commit
    counter (the loss accepted). Returns one line per thing done or left; a damaged file is never
    written (save it with ``agentspec sessions export --into``)."""
    if report.problems:
        return ["the database file itself is damaged: nothing was repaired in it; save what can still be read "
                "with `agentspec sessions export --into`"]
    done: list[str] = []
    s, t = sessions_table, stats_table
    with store._write() as conn:
        for ns, sid in report.headers:
            if (ns, sid) not in report.sessions:
                done.append(f"the header of session {sid!r}{_tenant(ns)} cannot be restored: it has no readable "
                            "calls to restore it from; drop the session with `agentspec sessions drop`")
                continue
            first, last = report.span[(ns, sid)]
            header = checked(s, dict(namespace=ns, session_id=sid, fingerprint=report.sessions[(ns, sid)],
                                     created_at=first, updated_at=last))
            conn.execute(s.update().where(s.c.namespace == ns, s.c.session_id == sid).values(header))
            done.append(f"restored the header of session {sid!r}{_tenant(ns)} from its calls (tokenizer "
                        f"{header['fingerprint']})")
        for ns, sid in report.totals:
            zeros = dict.fromkeys((c.name for c in t.c if c.name not in ("namespace", "session_id", "checksum")), 0)
            sums = report.sums.get((ns, sid), zeros)
            conn.execute(t.update().where(t.c.namespace == ns, t.c.session_id == sid)
                         .values(checked(t, dict(namespace=ns, session_id=sid, **sums))))
            done.append(f"rebuilt the totals of session {sid!r}{_tenant(ns)} from its {sums['calls']} stored calls "
                        "(calls pruned earlier are no longer counted)")
    if report.commits and store._counter is not None:
        with store._read() as conn:
            held = conn.execute(sa.select(schema_table.c.commits)).scalar() or 0
        store._counter.reset(held)
        done.append(f"accepted the loss of {report.commits[0] - report.commits[1]} commits: the store counts "
                    f"{held} commits from here on")
    return done


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
