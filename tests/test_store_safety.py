"""The store's safety: readers never block writers, damage is never silent, names are checked,
files are private, tokenizers never mix, tenants never see each other."""

from __future__ import annotations

import multiprocessing as mp
import random
import shutil
import stat

import pytest
import sqlalchemy as sa
from agentspec.stores import (
    SESSION_ID_LIMIT,
    CorruptRecordError,
    StoreDamagedError,
    StoreError,
    TokenizerMismatchError,
    open_store,
)
from agentspec.stores.codec import decode_stats, encode_stats
from agentspec.stores.repair import salvage, scan
from agentspec.stores.schema import records_table
from test_store import BACKENDS, fresh_url
from typer.testing import CliRunner

from agentspec.cli import app


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path):
    return fresh_url(request.param, tmp_path)


def _append_one(url: str) -> None:
    open_store(url).append("s", [1], [99], fingerprint="fp")


def test_a_read_never_blocks_a_writer(tmp_path):
    url = f"sqlite:///{tmp_path / 'rw.db'}"
    store = open_store(url)
    store.append("s", [1], [2], fingerprint="fp")
    with store.engine.connect() as conn:  # the connection every read of the store uses: a read held open
        assert len(conn.execute(sa.select(records_table)).all()) == 1
        writer = mp.get_context("spawn").Process(target=_append_one, args=(url,))
        writer.start()
        writer.join(timeout=40)  # it would wait for the reader's lock for 60 s, then fail
        if writer.is_alive():
            writer.kill()
        assert writer.exitcode == 0
        assert len(conn.execute(sa.select(records_table)).all()) == 1  # still the same open read (a snapshot)
    assert [c.output_ids for c in store.load_session("s").calls] == [[2], [99]]


@pytest.mark.parametrize("bad, problem", [
    ("a\ud800b", "lone surrogate"), ("a\x00b", "NUL"), ("x" * (SESSION_ID_LIMIT + 1), "the limit is 512"),
    ("", "non-empty"), (7, "must be a string"),
])
def test_bad_session_ids_are_a_clear_value_error(url, bad, problem):
    store = open_store(url)
    for call in (lambda: store.append(bad, [1], [2], fingerprint="fp"), lambda: store.load_session(bad),
                 lambda: store.calls_since(bad, 0), lambda: store.delete_session(bad),
                 lambda: store.open_session(bad, "fp")):
        with pytest.raises(ValueError, match=problem):
            call()
    if bad != "":  # the unscoped store is namespace ""
        with pytest.raises(ValueError, match=problem.replace("512", "128")):
            store.scoped(bad)
    longest = "é" * SESSION_ID_LIMIT  # at the limit, in characters, on every backend
    store.append(longest, [1], [2], fingerprint="fp")
    assert store.load_session(longest).calls[0].output_ids == [2]
    assert {s.session_id for s in store.list_sessions()} == {longest}


def test_files_and_folders_are_private(tmp_path):
    file = tmp_path / "new" / "deeper" / "cache.db"
    store = open_store(f"sqlite:///{file}")
    store.append("s", [1], [2], fingerprint="fp")
    with store.engine.connect() as conn:  # open: the -wal and -shm files exist
        conn.execute(sa.select(records_table)).all()
        for path in (file, file.with_name("cache.db-wal"), file.with_name("cache.db-shm")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in (tmp_path / "new", tmp_path / "new" / "deeper"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert sorted(p.name for p in file.parent.iterdir() if not p.name.startswith("cache.db")) == []  # no temp left


def test_read_commands_never_create_a_store(tmp_path):
    file = tmp_path / "none" / "cache.db"
    with pytest.raises(StoreError, match=f"no store at {file}"):
        open_store(f"sqlite:///{file}", create=False)
    assert not file.parent.exists()
    result = CliRunner().invoke(app, ["sessions", "list", "--store", f"sqlite:///{file}"])
    assert result.exit_code == 2 and "no store at" in result.output and not file.exists()


def test_an_empty_file_is_refused_not_recreated(tmp_path):
    file = tmp_path / "cache.db"
    file.touch()
    with pytest.raises(StoreError, match=r"empty \(0 bytes\)"):
        open_store(f"sqlite:///{file}")
    assert file.stat().st_size == 0


def test_database_errors_surface_as_store_errors(url):
    store = open_store(url)
    store.append("s", [1], [2], fingerprint="fp")
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE agentspec_stats"))
    with pytest.raises(StoreError, match="cannot read the store.*agentspec_stats"):
        store.session_stats()
    with pytest.raises(StoreError, match="cannot write to the store.*agentspec_stats"):
        store.append("s", [1], [3], fingerprint="fp")


def test_a_session_recreated_by_another_tokenizer_is_never_read_as_ours(url):
    reader, other = open_store(url), open_store(url)
    other.append("s", [1], [2], fingerprint="tok-a")
    loaded = reader.load_session("s", fingerprint="tok-a")
    assert [c.output_ids for c in loaded.calls] == [[2]]
    other.delete_session("s")  # dropped and re-created by another model while the reader holds its cursor
    newer = other.append("s", [1], [3], fingerprint="tok-b")
    assert newer > loaded.newest_id  # record ids are never reused: a cursor never skips a new call
    with pytest.raises(TokenizerMismatchError, match="tok-b"):
        reader.calls_since("s", loaded.newest_id, fingerprint="tok-a")
    with pytest.raises(TokenizerMismatchError, match="tok-b"):
        reader.load_session("s", fingerprint="tok-a")
    assert reader.recent_outputs("tok-a", 100).outputs == []
    assert [c.output_ids for c in reader.calls_since("s", 0).calls] == [[3]]  # unfiltered: inspection only


def test_tenants_see_only_their_own_sessions(url, tmp_path):
    root = open_store(url)
    a, b = root.scoped("alice"), root.scoped("bob")
    a.append("s", [1], [10], {"steps": 1}, fingerprint="fp")
    b.append("s", [1], [20], {"steps": 2}, fingerprint="fp")
    root.append("s", [1], [30], fingerprint="fp")
    root.append("alice/s", [1], [40], fingerprint="fp")  # a look-alike id is just another id of the root
    for view, output in ((a, [10]), (b, [20]), (root, [30])):
        assert [c.output_ids for c in view.load_session("s").calls] == [output]
        assert [o for o in view.recent_outputs("fp", 100).outputs if o != [40]] == [output]
    assert [s.session_id for s in a.list_sessions()] == ["s"]
    assert set(root.session_stats()) == {"s", "alice/s"} and a.session_stats()["s"]["steps"] == 1
    assert root.namespaces() == ["", "alice", "bob"]
    a.export_session("s", tmp_path / "s.jsonl")
    assert b.import_session(tmp_path / "s.jsonl", session_id="from-alice") == "from-alice"
    assert a.session_info("from-alice") is None
    assert b.delete_session("s") and a.load_session("s").calls and b.load_session("s").calls == []
    a.append("t", [1] * 10, [2] * 10, fingerprint="fp")
    assert a.prune(max_total_tokens=5) == 2 and root.load_session("s").calls  # prunes alice's calls only
    b.append("shared-tokenizer", [1], [5], fingerprint="other")
    with pytest.raises(TokenizerMismatchError):
        a.scoped("bob").append("shared-tokenizer", [1], [6], fingerprint="fp")
    a.append("shared-tokenizer", [1], [6], fingerprint="fp")  # alice's own session of that name


def test_every_flipped_byte_of_a_stats_payload_is_caught():
    payload = encode_stats({"steps": 12, "accepted_tokens": 30, "accepted_by_source": {"session": 30},
                            "decode_seconds": 0.25})
    original = decode_stats(payload)
    for position in range(len(payload)):
        for mask in (0x01, 0x10, 0x80, 0xFF):
            damaged = bytearray(payload)
            damaged[position] ^= mask
            try:
                assert decode_stats(bytes(damaged)) == original, (position, mask)
            except CorruptRecordError:
                pass


# ------------------------------------------------------------------ damaged files
SESSIONS, CALLS = ("alpha", "beta", "gamma"), 30


def _call(session: str, i: int) -> tuple[list[int], list[int], dict]:
    rng = random.Random(f"{session}-{i}")
    return [rng.randrange(50_000) for _ in range(40)], [rng.randrange(50_000) for _ in range(25)], {"i": i}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A SQLite store of 3 sessions x 30 calls, closed (everything in the main file)."""
    file = tmp_path_factory.mktemp("pristine") / "store.db"
    store = open_store(f"sqlite:///{file}")
    for i in range(CALLS):
        for session in SESSIONS:
            store.append(session, *_call(session, i)[:2], _call(session, i)[2], fingerprint="fp")
    store.close()
    assert not file.with_name("store.db-wal").exists()
    return file


def _outcome(file) -> str:
    """Open and read every session: "refused" (a StoreError saying so), "skipped" (damaged calls
    counted) or "intact"; fails on anything else (an altered call returned, a call gone uncounted)."""
    try:
        store = open_store(f"sqlite:///{file}")
        outcome = "intact"
        for session in SESSIONS:
            loaded = store.load_session(session, fingerprint="fp")
            for call in loaded.calls:
                i = call.stats["i"]
                assert (call.prompt_ids, call.output_ids) == _call(session, i)[:2]
            assert len(loaded.calls) + loaded.skipped == CALLS, f"{session}: calls vanished uncounted"
            if loaded.skipped:
                outcome = "skipped"
        store.close()
        return outcome
    except StoreError as exc:
        assert isinstance(exc, TokenizerMismatchError) or "damaged" in str(exc) or "cannot open" in str(exc), exc
        return "refused"


def test_byte_flips_end_in_a_refusal_or_a_counted_skip(pristine, tmp_path):
    size = pristine.stat().st_size
    outcomes: dict[str, int] = {}
    for seed in range(40):
        rng = random.Random(seed)
        file = tmp_path / f"flipped-{seed}.db"
        data = bytearray(pristine.read_bytes())
        for _ in range(rng.choice([1, 4, 16, 64])):
            data[rng.randrange(size)] ^= 1 << rng.randrange(8)
        file.write_bytes(data)
        result = _outcome(file)
        outcomes[result] = outcomes.get(result, 0) + 1
    print("byte flips, 40 seeds:", outcomes)


@pytest.mark.parametrize("keep", [0, 0.5])
def test_a_truncated_file_is_refused(pristine, tmp_path, keep):
    file = tmp_path / "cut.db"
    file.write_bytes(pristine.read_bytes()[: int(pristine.stat().st_size * keep)])
    with pytest.raises(StoreError, match="empty" if keep == 0 else "damaged.*agentspec sessions export --into"):
        open_store(f"sqlite:///{file}")
    assert file.stat().st_size == int(pristine.stat().st_size * keep)  # left as it was


def test_what_can_be_read_is_saved_into_a_new_store(pristine, tmp_path):
    file = tmp_path / "cut.db"
    file.write_bytes(pristine.read_bytes()[: pristine.stat().st_size * 2 // 3])
    with pytest.raises(StoreDamagedError):
        open_store(f"sqlite:///{file}")
    source, target = open_store(f"sqlite:///{file}", check=False), open_store(f"sqlite:///{tmp_path / 'new.db'}")
    report = salvage(source, target)
    assert report.records and report.bad and report.problems  # something saved, the damage named
    assert report.records + len(report.bad) + report.missing == len(SESSIONS) * CALLS  # every record id counted
    saved = 0
    for session in SESSIONS:
        for call in target.load_session(session, fingerprint="fp").calls:
            assert (call.prompt_ids, call.output_ids, call.stats) == _call(session, call.stats["i"])
            saved += 1
    assert saved == report.records and scan(target).ok
    with pytest.raises(StoreDamagedError):  # a known-damaged file takes no more writes
        source.append("alpha", [1], [2], fingerprint="fp")


def test_cli_check_and_export_into(pristine, tmp_path):
    runner = CliRunner()
    good = tmp_path / "good.db"
    shutil.copy(pristine, good)
    result = runner.invoke(app, ["sessions", "check", "--store", f"sqlite:///{good}"])
    assert result.exit_code == 0 and f"{len(SESSIONS) * CALLS} calls in 3 sessions read back intact" in result.output
    bad = tmp_path / "bad.db"
    bad.write_bytes(pristine.read_bytes()[: pristine.stat().st_size * 2 // 3])
    result = runner.invoke(app, ["sessions", "list", "--store", f"sqlite:///{bad}"])
    assert result.exit_code == 2 and "damaged" in result.output
    result = runner.invoke(app, ["sessions", "check", "--store", f"sqlite:///{bad}"])
    assert result.exit_code == 1 and "damaged" in result.output and "export --into" in result.output
    result = runner.invoke(app, ["sessions", "export", "--into", f"sqlite:///{tmp_path / 'saved.db'}",
                                 "--store", f"sqlite:///{bad}"])
    assert result.exit_code == 0 and "saved" in result.output, result.output
    assert open_store(f"sqlite:///{tmp_path / 'saved.db'}").list_sessions()
