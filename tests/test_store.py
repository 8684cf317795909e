"""Session store on SQLite and on a real PostgreSQL (AGENTSPEC_TEST_PG_URL, started by .ci/run)."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import subprocess
import time
import uuid

import pytest
import sqlalchemy as sa
from agentspec.stores import (
    SCHEMA_VERSION,
    SchemaVersionError,
    StoreError,
    TokenizerMismatchError,
    open_store,
    sqlite,
)
from agentspec.stores.commits import CommitCounter, counter_path
from agentspec.stores.repair import scan
from agentspec.stores.schema import records_table

PG_URL = os.environ.get("AGENTSPEC_TEST_PG_URL")
BACKENDS = ["sqlite", pytest.param("postgres", marks=[
    pytest.mark.postgres, pytest.mark.skipif(not PG_URL, reason="AGENTSPEC_TEST_PG_URL is not set")])]


def fresh_url(backend: str, tmp_path) -> str:
    """A fresh empty store URL: a new SQLite file, or a new PostgreSQL schema-free database."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / f'store-{uuid.uuid4().hex[:6]}.db'}"
    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return PG_URL.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path):
    return fresh_url(request.param, tmp_path)


def test_append_and_load_in_order(url):
    store = open_store(url)
    ids = [store.append("s1", [1, 2, 3 + i], [7, 8, i], {"steps": i}, fingerprint="fp") for i in range(5)]
    store.append("s2", [9], [9, 9], fingerprint="fp")
    assert ids == sorted(ids)
    loaded = store.load_session("s1")
    assert [c.output_ids for c in loaded.calls] == [[7, 8, i] for i in range(5)]
    assert [c.stats["steps"] for c in loaded.calls] == list(range(5))
    assert loaded.info.calls == 5 and loaded.info.prompt_tokens == 15 and loaded.info.output_tokens == 15
    assert {s.session_id for s in store.list_sessions()} == {"s1", "s2"}
    history = store.recent_outputs("fp", max_tokens=5)
    assert history.outputs == [[7, 8, 4], [9, 9]] and history.session_ids == ["s1", "s2"]
    assert history.skipped == 0 and history.newest_id == history.record_ids[-1] > ids[-1]
    assert store.recent_outputs("fp", max_tokens=100, after=ids[3]).outputs == [[7, 8, 4], [9, 9]]
    assert store.recent_outputs("other-tokenizer", 100).outputs == []
    if store.is_sqlite:  # WAL: readers never block the writer, a killed writer leaves no half-written call
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    assert [c.output_ids for c in store.calls_since("s1", ids[2]).calls] == [[7, 8, 3], [7, 8, 4]]


def test_tokenizer_mismatch_is_refused(url):
    store = open_store(url)
    store.append("s", [1], [2], fingerprint="tok-a")
    with pytest.raises(TokenizerMismatchError, match="tok-a"):
        store.append("s", [1], [2], fingerprint="tok-b")
    assert len(store.load_session("s").calls) == 1


def test_appends_from_another_store_object_see_deletes_and_new_tokenizers(url):
    """The append fast path (sessions known to this process) notices another process's changes."""
    mine, theirs = open_store(url), open_store(url)
    mine.append("s", [1], [2], fingerprint="tok-a")
    theirs.delete_session("s")
    mine.append("s", [1], [3], fingerprint="tok-a")  # recreated, not lost to a missing foreign key
    assert [c.output_ids for c in mine.load_session("s").calls] == [[3]]
    theirs.delete_session("s")
    theirs.append("s", [1], [4], fingerprint="tok-b")
    with pytest.raises(TokenizerMismatchError, match="tok-b"):
        mine.append("s", [1], [5], fingerprint="tok-a")
    assert [c.output_ids for c in mine.load_session("s").calls] == [[4]]


def test_statistics_are_totalled_per_session_and_survive_pruning(url):
    store = open_store(url)
    call = {"prompt_tokens": 3, "output_tokens": 4, "steps": 2, "drafted_tokens": 6, "accepted_tokens": 2,
            "accepted_by_source": {"session": 1, "global": 1}, "decode_seconds": 0.5}
    for _ in range(3):
        store.append("a", [1, 2, 3], [4, 5, 6, 7], call, fingerprint="fp")
    store.append("b", [1], [2], {}, fingerprint="fp")
    totals = store.session_stats()
    assert totals["a"]["calls"] == 3 and totals["a"]["steps"] == 6 and totals["a"]["accepted_tokens"] == 6
    assert totals["a"]["prompt_tokens"] == 9 and totals["a"]["output_tokens"] == 12
    assert totals["a"]["accepted_by_source"] == {"request": 0, "session": 3, "global": 3}
    assert totals["a"]["decode_seconds"] == pytest.approx(1.5)
    assert totals["b"]["calls"] == 1 and totals["b"]["steps"] == 0
    assert store.prune(max_session_tokens=7) == 2
    assert store.load_session("a").info.calls == 1 and store.session_stats("a")["a"]["calls"] == 3
    store.delete_session("a")
    assert set(store.session_stats()) == {"b"}


def test_corrupt_records_are_skipped_and_counted(url):
    store = open_store(url)
    for i in range(4):
        store.append("s", [1, 2], [3, i], fingerprint="fp")
    good = store.append("s", [5], [6], fingerprint="fp")
    with store.engine.begin() as conn:
        first, second = sorted(conn.execute(sa.select(records_table.c.record_id)).scalars())[:2]
        conn.execute(records_table.update().where(records_table.c.record_id == first).values(output=b"\x93garbage"))
        payload = conn.execute(sa.select(records_table.c.output).where(records_table.c.record_id == second)).scalar()
        conn.execute(records_table.update().where(records_table.c.record_id == second)
                     .values(output=payload[: len(payload) // 2]))
    loaded = store.load_session("s")
    assert loaded.skipped == 2 and len(loaded.errors) == 2
    assert [c.output_ids for c in loaded.calls] == [[3, 2], [3, 3], [6]]
    assert loaded.calls[-1].record_id == good
    last = store.append("s", [7], [8], fingerprint="fp")
    with store.engine.begin() as conn:
        conn.execute(records_table.update().where(records_table.c.record_id == last).values(prompt=b""))
    since = store.calls_since("s", good)  # a corrupt newest record is read past, not re-read next time
    assert since.calls == [] and since.skipped == 1 and since.newest_id == last

def test_newer_schema_is_refused(url):
    store = open_store(url)
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE agentspec_schema SET version = :v"), {"v": SCHEMA_VERSION + 5})
    store.close()
    with pytest.raises(SchemaVersionError, match=f"v{SCHEMA_VERSION + 5}"):
        open_store(url)


def test_v1_store_is_upgraded_in_place(url):
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # the v1 layout: no sessions.updated_at
        conn.execute(sa.text("CREATE TABLE agentspec_schema (version INTEGER NOT NULL)"))
        conn.execute(sa.text("INSERT INTO agentspec_schema VALUES (1)"))
        conn.execute(sa.text("CREATE TABLE agentspec_sessions (session_id VARCHAR(512) PRIMARY KEY, "
                             "fingerprint VARCHAR(64) NOT NULL, created_at FLOAT NOT NULL)"))
        conn.execute(sa.text("CREATE TABLE agentspec_records (record_id SERIAL PRIMARY KEY, "
                             "session_id VARCHAR(512) NOT NULL REFERENCES agentspec_sessions(session_id), "
                             "fingerprint VARCHAR(64) NOT NULL, created_at FLOAT NOT NULL, "
                             "prompt_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, "
                             "prompt BYTEA NOT NULL, output BYTEA NOT NULL, stats BYTEA)"
                             .replace("BYTEA", "BLOB" if url.startswith("sqlite") else "BYTEA")
                             .replace("SERIAL", "INTEGER" if url.startswith("sqlite") else "SERIAL")))
        conn.execute(sa.text("INSERT INTO agentspec_sessions VALUES ('old', 'fp', 100.0)"))
    engine.dispose()
    import msgpack
    from agentspec.stores.codec import encode_tokens

    insert_v1 = ("INSERT INTO agentspec_records (session_id, fingerprint, created_at, prompt_tokens, output_tokens, "
                 "prompt, output, stats) VALUES ('old', 'fp', 150.0, 1, 2, :p, :o, :s)")

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(insert_v1),
                     {"p": encode_tokens([4]), "o": encode_tokens([5, 6]),
                      "s": msgpack.packb({"steps": 1, "accepted_tokens": 1, "accepted_by_source": {"session": 1}})})
        conn.execute(sa.text(insert_v1.replace("150.0, 1, 2", "140.0, 1, 1")),
                     {"p": encode_tokens([4]), "o": encode_tokens([7]), "s": b"\xc1corrupt"})
    engine.dispose()
    store = open_store(url)
    assert store.schema_version() == SCHEMA_VERSION
    info = store.session_info("old")
    assert info.updated_at == 150.0 and info.calls == 2  # v2: updated_at from the newest call
    loaded = store.load_session("old")
    assert [c.output_ids for c in loaded.calls] == [[5, 6]] and loaded.skipped == 1
    totals = store.session_stats("old")["old"]  # v3: totals from the stored calls (a corrupt one counted bare)
    assert totals["calls"] == 2 and totals["output_tokens"] == 3 and totals["steps"] == 1
    assert totals["accepted_by_source"]["session"] == 1
    newest = max(c.record_id for c in loaded.calls)
    assert store.append("old", [4], [8], {"steps": 2}, fingerprint="fp") > newest  # ids go on after the copied ones
    assert store.scoped("tenant").load_session("old").calls == []  # v4: older sessions are namespace ""
    assert store.session_stats("old")["old"]["steps"] == 3


def test_unreachable_database_is_a_clear_error():
    with pytest.raises(StoreError, match="cannot open the store at postgresql"):
        open_store("postgresql+psycopg://nobody:secret@127.0.0.1:1/none")


@contextlib.contextmanager
def read_only(path):
    """Make ``path`` (a file or folder) read-only, for root too (``chattr +i``); skip where impossible."""
    mode = path.stat().st_mode
    path.chmod(0o555 if path.is_dir() else 0o444)
    immutable = False
    try:
        if os.access(path, os.W_OK):  # root: file modes do not bind, the immutable attribute does
            immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
            if not immutable:
                pytest.skip("cannot make a file read-only for this user (root without chattr)")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(mode)


def test_read_only_file_is_a_clear_error(tmp_path):
    path = tmp_path / "ro.db"
    open_store(f"sqlite:///{path}").close()
    with read_only(path), pytest.raises(StoreError, match=f"{path} is read-only"):
        open_store(f"sqlite:///{path}")


def test_v4_store_loses_the_recycled_counter_and_keeps_its_totals(url):
    store = open_store(url)
    store.append("s", [1, 2], [3, 4, 5], {"steps": 2, "accepted_by_source": {"session": 2}}, fingerprint="fp")
    store.close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # back to v4's layout: one more counter column
        conn.execute(sa.text("ALTER TABLE agentspec_stats ADD COLUMN accepted_recycled BIGINT NOT NULL DEFAULT 0"))
        conn.execute(sa.text("UPDATE agentspec_schema SET version = 4"))
    engine.dispose()
    store = open_store(url)
    assert store.schema_version() == SCHEMA_VERSION == 6
    engine = sa.create_engine(url)
    columns = {c["name"] for c in sa.inspect(engine).get_columns("agentspec_stats")}
    engine.dispose()
    assert "accepted_recycled" not in columns and "accepted_session" in columns
    totals = store.session_stats("s")["s"]
    assert totals["steps"] == 2 and totals["output_tokens"] == 3
    assert totals["accepted_by_source"] == {"request": 0, "session": 2, "global": 0}
    store.append("s", [1], [2], {"steps": 1}, fingerprint="fp")
    assert store.session_stats("s")["s"]["steps"] == 3


def test_v5_store_gets_its_row_checksums_and_commit_counter(url):
    store = open_store(url)
    store.append("s", [1, 2], [3, 4, 5], {"steps": 2, "decode_seconds": 0.5}, fingerprint="fp")
    store.scoped("t").append("s", [1], [2], fingerprint="fp")
    before = (store.list_sessions(), store.session_stats(), store.load_session("s").calls)
    store.close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # back to v5's layout: no checksums, no commit counter
        for table in ("agentspec_sessions", "agentspec_records", "agentspec_stats"):
            conn.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN checksum"))
        conn.execute(sa.text("ALTER TABLE agentspec_schema DROP COLUMN commits"))
        conn.execute(sa.text("UPDATE agentspec_schema SET version = 5"))
    engine.dispose()
    if url.startswith("sqlite"):
        counter_path(sqlite.file_path(url)).unlink()  # a v5 store has none
    store = open_store(url)
    assert store.schema_version() == SCHEMA_VERSION == 6
    assert (store.list_sessions(), store.session_stats(), store.load_session("s").calls) == before
    assert scan(store).ok
    store.append("s", [1], [2], fingerprint="fp")
    assert store.session_stats("s")["s"]["calls"] == 2 and scan(store).ok
    if url.startswith("sqlite"):
        assert CommitCounter(sqlite.file_path(url)).read() == 1  # counted from the upgrade on


def test_read_only_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    with read_only(folder), pytest.raises(StoreError, match=f"the folder {folder} is read-only"):
        open_store(f"sqlite:///{folder / 'x.db'}")


def test_database_opened_read_only_is_a_clear_error(tmp_path):
    """A read-only database (works even as root, where file modes do not bind)."""
    path = tmp_path / "ro.db"
    open_store(f"sqlite:///{path}").append("s", [1], [2], fingerprint="fp")
    store = open_store(f"sqlite:///file:{path}?mode=ro&uri=true")
    assert store.load_session("s").calls[0].output_ids == [2]
    with pytest.raises(StoreError, match="read-only"):
        store.append("s", [1], [3], fingerprint="fp")


def test_not_a_database_file(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot open the store"):
        open_store(f"sqlite:///{path}")


def test_prune_export_import_delete(url, tmp_path):
    store = open_store(url)
    for _ in range(6):
        store.append("a", [1] * 10, [2] * 10, fingerprint="fp")  # 20 tokens each
        store.append("b", [1] * 5, [3] * 5, fingerprint="fp")  # 10 tokens each
    assert store.prune(max_session_tokens=40) == 4 + 2  # a keeps 2 calls, b keeps 4
    assert store.load_session("a").info.calls == 2 and store.load_session("b").info.calls == 4
    assert store.prune(max_total_tokens=30) > 0
    assert sum(s.prompt_tokens + s.output_tokens for s in store.list_sessions()) <= 30
    store.append("c", [4, 5], [6], {"steps": 1}, fingerprint="fp")
    path = tmp_path / "c.jsonl"
    assert store.export_session("c", path) == 1
    assert store.import_session(path, session_id="c-copy") == "c-copy"
    assert store.load_session("c-copy").calls[0].output_ids == [6]
    assert store.delete_session("c") and not store.delete_session("c")
    assert store.load_session("c").calls == []
    with pytest.raises(StoreError, match="'c-copy' exists already"):
        store.import_session(path, session_id="c-copy")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(StoreError, match="not an agentspec session export"):
        store.import_session(bad)
    lines = path.read_text().splitlines()  # a good call, then one with a token id out of range
    bad.write_text("\n".join([lines[0], lines[1], lines[1].replace("[6]", "[-6]")]) + "\n")
    with pytest.raises(StoreError, match="invalid calls.*nothing was imported"):
        store.import_session(bad, session_id="half")
    assert store.session_info("half") is None


# ------------------------------------------------------------------ crash safety and concurrency
def _writer(url: str, sessions: list[str], tag: int, count: int, conn) -> None:
    """Append ``count`` calls to each of ``sessions``, alternating; report each commit on ``conn``."""
    store = open_store(url)
    for i in range(count):
        for session in sessions:
            store.append(session, [tag, i] * 50, [tag, i, 7] * 20, {"tag": tag, "i": i}, fingerprint="fp")
        if conn is not None:
            conn.send(i)  # reported only after the transaction committed


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_never_loses_a_committed_call(backend, tmp_path):
    url = fresh_url(backend, tmp_path)
    open_store(url).close()
    ctx = mp.get_context("spawn")
    rng = random.Random(0)
    committed_total = 0
    for round_ in range(25):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_writer, args=(url, ["crash"], round_, 10_000, child))
        proc.start()
        committed = [parent.recv()]  # the writer is up (its first commit), then it runs for a random while
        deadline = time.time() + rng.uniform(0.3, 1.2)
        while time.time() < deadline:
            if parent.poll(0.05):
                committed.append(parent.recv())
        proc.kill()  # SIGKILL at a random point, usually mid-transaction
        proc.join()
        while parent.poll(0):
            committed.append(parent.recv())
        store = open_store(url)  # opens cleanly every time
        loaded = store.load_session("crash")
        assert loaded.skipped == 0
        mine = [c.stats["i"] for c in loaded.calls if c.stats["tag"] == round_]
        assert mine[: len(committed)] == committed  # every reported commit is there, in order
        assert mine == list(range(len(mine)))  # nothing half-written or out of order
        assert all(c.output_ids == [c.stats["tag"], c.stats["i"], 7] * 20 for c in loaded.calls)
        committed_total += len(committed)
        store.close()
    assert committed_total > 25
    print(f"{backend}: 25 SIGKILLs mid-append, {committed_total} reported commits, none lost")


def _open_and_append(url: str, tag: int) -> None:
    open_store(url).append(f"first-{tag}", [tag], [tag], fingerprint="fp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_four_processes_create_a_new_store_at_once(backend, tmp_path):
    url = fresh_url(backend, tmp_path)
    ctx = mp.get_context("fork")  # fork: the four start within milliseconds of each other
    procs = [ctx.Process(target=_open_and_append, args=(url, tag)) for tag in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert {s.session_id for s in open_store(url).list_sessions()} == {f"first-{tag}" for tag in range(4)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("processes", [4, 8])
def test_processes_append_at_once(backend, processes, tmp_path):
    url = fresh_url(backend, tmp_path)
    open_store(url).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, ["shared", f"own-{tag}"], tag, 200, None))
             for tag in range(processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    store = open_store(url)
    shared = store.load_session("shared").calls
    for tag in range(processes):  # none lost, none duplicated, each process's order kept
        assert [c.stats["i"] for c in shared if c.stats["tag"] == tag] == list(range(200))
        own = store.load_session(f"own-{tag}").calls
        assert [c.stats["i"] for c in own] == list(range(200))
    assert len(shared) == 200 * processes
