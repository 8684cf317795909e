"""The store's safety: readers never block writers, damage is never silent, names are checked,
files are private, tokenizers never mix, tenants never see each other."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import signal
import sqlite3
import stat

import pytest
import sqlalchemy as sa
from agentspec.stores import (
    SESSION_ID_LIMIT,
    CorruptRecordError,
    SessionDamagedError,
    StoreDamagedError,
    StoreError,
    TokenizerMismatchError,
    open_store,
    repair,
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
        assert stat.S_IMODE(file.with_name("cache.db-commits").stat().st_mode) == 0o600
    store.export_session("s", tmp_path / "s.jsonl")
    assert stat.S_IMODE((tmp_path / "s.jsonl").stat().st_mode) == 0o600
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


def _tamper(url: str, statement: str) -> None:
    """Change rows behind the store's back (their checksums left as they were)."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(statement))
    engine.dispose()


def test_a_damaged_fingerprint_is_damage_not_a_mismatch_and_repair_restores_it(url):
    store = open_store(url)
    for i in range(3):
        store.append("s", [1, i], [2, i], {"steps": 1}, fingerprint="tok-a")
    store.append("other", [1], [2], fingerprint="tok-a")
    _tamper(url, "UPDATE agentspec_sessions SET fingerprint = 'tok-b' WHERE session_id = 's'")
    reader = open_store(url)
    for call in (lambda: reader.load_session("s", fingerprint="tok-a"), lambda: reader.list_sessions(),
                 lambda: reader.append("s", [1], [2], fingerprint="tok-a"),
                 lambda: reader.append("s", [1], [2], fingerprint="tok-b")):
        with pytest.raises(SessionDamagedError, match="header of session 's'.*sessions check --repair"):
            call()
    assert reader.load_session("other", fingerprint="tok-a").calls  # the other sessions go on
    runner = CliRunner()
    result = runner.invoke(app, ["sessions", "check", "--store", url])
    assert result.exit_code == 1 and "the header of session 's' fails its checksum" in result.output
    assert "sessions check --repair" in result.output
    result = runner.invoke(app, ["sessions", "check", "--repair", "--store", url])
    assert result.exit_code == 0 and "restored the header of session 's'" in result.output, result.output
    assert "after the repair: intact" in result.output
    repaired = open_store(url)
    assert repaired.session_info("s").fingerprint == "tok-a"
    assert len(repaired.load_session("s", fingerprint="tok-a").calls) == 3
    repaired.append("s", [1], [3], fingerprint="tok-a")
    with pytest.raises(TokenizerMismatchError):  # a true mismatch is still one
        repaired.append("s", [1], [3], fingerprint="tok-b")


def test_damaged_totals_are_reported_and_rebuilt_from_the_calls(url):
    store = open_store(url)
    for _ in range(4):
        store.append("s", [1] * 3, [2] * 5, {"steps": 2, "accepted_by_source": {"session": 1}}, fingerprint="fp")
    committed = store.session_stats("s")["s"]
    _tamper(url, "UPDATE agentspec_stats SET output_tokens = output_tokens + 175")
    reader = open_store(url)
    with pytest.raises(SessionDamagedError, match="totals of session 's'.*sessions check --repair"):
        reader.session_stats()
    reader.append("s", [1] * 3, [2] * 5, {"steps": 2, "accepted_by_source": {"session": 1}}, fingerprint="fp")
    with pytest.raises(SessionDamagedError):  # an append leaves damaged totals damaged (not sealed)
        reader.session_stats("s")
    result = CliRunner().invoke(app, ["stats", "--store", url])
    assert result.exit_code == 2 and "damaged" in result.output
    result = CliRunner().invoke(app, ["sessions", "check", "--store", url])
    assert result.exit_code == 1 and "the totals of session 's' fail their checksum" in result.output
    result = CliRunner().invoke(app, ["sessions", "check", "--repair", "--store", url])
    assert result.exit_code == 0 and "rebuilt the totals of session 's' from its 5 stored calls" in result.output
    rebuilt = open_store(url).session_stats("s")["s"]
    assert rebuilt["calls"] == 5 and rebuilt["output_tokens"] == 25 and rebuilt["steps"] == 10
    assert {k: v for k, v in rebuilt.items() if k not in ("calls", "prompt_tokens", "output_tokens", "steps",
                                                          "accepted_by_source")} == {
        k: v for k, v in committed.items() if k not in ("calls", "prompt_tokens", "output_tokens", "steps",
                                                        "accepted_by_source")}
    assert rebuilt["accepted_by_source"]["session"] == 5


def test_a_version_altered_back_to_5_does_not_seal_damaged_rows(url):
    store = open_store(url)
    store.append("s", [1], [2], fingerprint="fp")
    store.close()
    _tamper(url, "UPDATE agentspec_stats SET output_tokens = 99")
    _tamper(url, "UPDATE agentspec_schema SET version = 5")  # the upgrade to v6 runs again
    with pytest.raises(SessionDamagedError):
        open_store(url).session_stats()


def test_an_altered_record_time_is_a_counted_skip(url):
    store = open_store(url)
    store.append("s", [1], [2], fingerprint="fp")
    store.append("s", [1], [3], fingerprint="fp")
    _tamper(url, "UPDATE agentspec_records SET created_at = created_at + 1 WHERE output_tokens = 1 "
                 "AND record_id = (SELECT MIN(record_id) FROM agentspec_records)")
    loaded = open_store(url).load_session("s", fingerprint="fp")
    assert [c.output_ids for c in loaded.calls] == [[3]] and loaded.skipped == 1
    assert "fail their checksum" in loaded.errors[0]


def test_a_value_altered_into_another_type_is_damage(tmp_path):
    url = f"sqlite:///{tmp_path / 'typed.db'}"  # SQLite keeps a value's type in the row: a flip can change it
    store = open_store(url)
    store.append("s", [1], [2, 3], {"steps": 1}, fingerprint="fp")
    store.append("s", [1], [4], {"steps": 1}, fingerprint="fp")
    _tamper(url, "UPDATE agentspec_stats SET steps = x''")
    _tamper(url, "UPDATE agentspec_records SET output_tokens = x'02' WHERE output_tokens = 2")
    reader = open_store(url)
    with pytest.raises(SessionDamagedError, match="totals of session 's'"):
        reader.session_stats()
    history = reader.recent_outputs("fp", 100)
    assert history.outputs == [[4]] and history.skipped == 1
    assert reader.load_session("s").skipped == 1


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
WAL_CALLS = 100  # commits a killed writer leaves in the -wal file only
FLIP_SEEDS = int(os.environ.get("AGENTSPEC_FLIP_SEEDS", "60"))
FLIP_MODES = ("file", "sessions page", "stats page", "wal")


def _call(session: str, i: int) -> tuple[list[int], list[int], dict]:
    rng = random.Random(f"{session}-{i}")
    stats = {"i": i, "steps": 1 + i % 7, "drafted_tokens": 3 * i, "accepted_tokens": i,
             "accepted_by_source": {"session": i // 2, "global": i - i // 2}, "decode_seconds": 0.01 * i}
    return [rng.randrange(50_000) for _ in range(40)], [rng.randrange(50_000) for _ in range(25)], stats


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A SQLite store of 3 sessions x 30 calls, closed (everything in the main file)."""
    file = tmp_path_factory.mktemp("pristine") / "store.db"
    store = open_store(f"sqlite:///{file}")
    for i in range(CALLS):
        for session in SESSIONS:
            store.append(session, *_call(session, i), fingerprint="fp")
    store.close()
    assert not file.with_name("store.db-wal").exists()
    return file


def _append_and_die(url: str) -> None:
    store = open_store(url)
    for i in range(CALLS, CALLS + WAL_CALLS):
        session = SESSIONS[i % 3]
        store.append(session, *_call(session, i), fingerprint="fp")
    os.kill(os.getpid(), signal.SIGKILL)  # no checkpoint, no clean close: the commits stay in the -wal file


@pytest.fixture(scope="module")
def killed(pristine, tmp_path_factory):
    """The pristine store after a writer appended 100 calls and was killed: those commits are in
    its -wal file only (and counted in its -commits file)."""
    file = tmp_path_factory.mktemp("killed") / "store.db"
    shutil.copy(pristine, file)
    writer = mp.get_context("spawn").Process(target=_append_and_die, args=(f"sqlite:///{file}",))
    writer.start()
    writer.join(timeout=120)
    assert writer.exitcode == -signal.SIGKILL
    assert file.with_name("store.db-wal").stat().st_size > 100 * 4096
    return file


def _copy(source, folder):
    """The store at ``source`` with its -wal and -commits files (not -shm: a killed writer's is stale)."""
    target = folder / "store.db"
    for suffix in ("", "-wal", "-commits"):
        if source.with_name(source.name + suffix).exists():
            shutil.copy(source.with_name(source.name + suffix), target.with_name(target.name + suffix))
    return target


def _snapshot(store) -> dict:
    """Everything the store gives back: headers, totals and every call (with its record id)."""
    calls = {}
    for session in SESSIONS:
        loaded = store.load_session(session, fingerprint="fp")
        calls[session] = ([(c.record_id, c.prompt_ids, c.output_ids, c.stats, c.created_at) for c in loaded.calls],
                          loaded.skipped)
    return {"infos": store.list_sessions(), "totals": store.session_stats(), "calls": calls}


def _outcome(file, truth: dict) -> str:
    """Open, read everything and check the store at ``file``: "refused" (it does not open, saying
    why), "reported" (a read says damaged, or `sessions check` finds the damage), "intact" (all of
    it as committed) or "silent" (something differs from what was committed, and nothing says so).
    Fails at once on a call returned altered, or damage taken for a tokenizer mismatch."""
    url = f"sqlite:///{file}"
    try:
        open_store(url).close()
    except StoreError as exc:
        assert not isinstance(exc, TokenizerMismatchError), exc
        assert "damaged" in str(exc) or "missing" in str(exc) or "cannot open" in str(exc), exc
        return "refused"
    store = open_store(url)
    said = False
    try:
        seen = _snapshot(store)
    except StoreError as exc:
        assert not isinstance(exc, TokenizerMismatchError), f"damage taken for a tokenizer mismatch: {exc}"
        said, seen = True, None
    store.close()
    if seen is not None:
        for session, (calls, skipped) in seen["calls"].items():
            committed = {c[0]: c for c in truth["calls"][session][0]}
            for call in calls:
                assert call == committed[call[0]], f"{session}: a call came back altered"
            said |= skipped > 0
            assert len(calls) + skipped <= len(committed)
    checker = open_store(url, check=False)
    try:
        checked_ok = scan(checker).ok
    except StoreError:
        checked_ok = False
    checker.close()
    if said:
        assert not checked_ok, "a read said damaged but `sessions check` found nothing"
        return "reported"
    if not checked_ok:
        return "reported"
    return "intact" if seen == truth else "silent"


def _flip(file, mode: str, rng: random.Random) -> None:
    """Flip bits of the store at ``file``: anywhere in the main file, in the rows of the sessions or
    statistics table's page, or anywhere in the -wal file."""
    target = file.with_name(file.name + "-wal") if mode == "wal" else file
    data = bytearray(target.read_bytes())
    lo, hi = 0, len(data)
    if mode.endswith(" page"):
        table = {"sessions page": "agentspec_sessions", "stats page": "agentspec_stats"}[mode]
        with sqlite3.connect(file) as conn:
            page = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
            size = conn.execute("PRAGMA page_size").fetchone()[0]
        lo = (page - 1) * size
        lo, hi = lo + int.from_bytes(data[lo + 5:lo + 7], "big"), lo + size  # the page's cell content area
    for _ in range(rng.choice([1, 4] if mode == "wal" else [1, 2, 4] if mode.endswith(" page") else [1, 4, 16, 64])):
        data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    target.write_bytes(data)


def test_byte_flips_anywhere_are_never_silent(pristine, killed, tmp_path):
    """Flips in the main file (anywhere, and in the rows of the sessions and statistics tables) and
    in the -wal file of a killed writer: the store refuses to open, a read or `sessions check`
    reports the damage, or everything reads back as committed; never anything else."""
    truths = {}
    for source in (pristine, killed):  # what was committed (the killed writer's commits: no false alarm)
        folder = tmp_path / "truth" / source.parent.name
        folder.mkdir(parents=True)
        url = f"sqlite:///{_copy(source, folder)}"
        store = open_store(url)
        truths[source] = _snapshot(store)
        store.close()
        assert scan(open_store(url)).ok
    assert sum(len(calls) for calls, _ in truths[killed]["calls"].values()) == len(SESSIONS) * CALLS + WAL_CALLS
    outcomes = {mode: dict.fromkeys(("refused", "reported", "intact", "silent"), 0) for mode in FLIP_MODES}
    for seed in range(FLIP_SEEDS):
        mode = FLIP_MODES[seed % len(FLIP_MODES)]
        source = killed if mode == "wal" else pristine
        (tmp_path / str(seed)).mkdir()
        file = _copy(source, tmp_path / str(seed))
        _flip(file, mode, random.Random(seed))
        outcomes[mode][_outcome(file, truths[source])] += 1
        shutil.rmtree(tmp_path / str(seed))
    print(f"byte flips, {FLIP_SEEDS} seeds:", outcomes)
    trials = {mode: sum(counts.values()) for mode, counts in outcomes.items()}
    assert sum(trials.values()) == FLIP_SEEDS
    for mode, counts in outcomes.items():
        assert counts["silent"] == 0, (mode, counts)
        assert counts["refused"] + counts["reported"] > 0, (mode, counts)  # flips are found, not only survived
    assert outcomes["wal"]["refused"] == trials["wal"]  # every flip in the -wal file loses commits: all found


def test_commits_lost_from_a_damaged_wal_are_reported_and_the_loss_can_be_accepted(killed, tmp_path):
    file = _copy(killed, tmp_path)
    file.with_name("store.db-wal").unlink()  # the -wal file of the killed writer is lost
    url = f"sqlite:///{file}"
    with pytest.raises(StoreDamagedError, match=f"the last {WAL_CALLS} of the {CALLS * 3 + WAL_CALLS} commits "
                                                "made to it are missing.*sessions check --repair"):
        open_store(url)
    runner = CliRunner()
    result = runner.invoke(app, ["sessions", "check", "--store", url])
    assert result.exit_code == 1 and f"the last {WAL_CALLS} of the" in result.output
    assert f"{CALLS * 3} calls in 3 sessions read back intact" in result.output
    result = runner.invoke(app, ["sessions", "check", "--repair", "--store", url])
    assert result.exit_code == 0 and f"accepted the loss of {WAL_CALLS} commits" in result.output, result.output
    store = open_store(url)
    assert sum(len(store.load_session(s, fingerprint="fp").calls) for s in SESSIONS) == CALLS * 3
    store.append("alpha", [1], [2], fingerprint="fp")
    store.close()
    assert scan(open_store(url)).ok


def test_a_scan_never_counts_calls_appended_while_it_runs(pristine, tmp_path, monkeypatch):
    file = _copy(pristine, tmp_path)
    writer = open_store(f"sqlite:///{file}")
    monkeypatch.setattr(repair, "CHUNK", 32)  # several ranges: appends land while the scan is under way
    appended = []

    def append_meanwhile(namespace, fingerprint, call):
        if not appended:
            appended.extend(writer.append("alpha", [1], [i], fingerprint="fp") for i in range(10))

    report = scan(open_store(f"sqlite:///{file}", check=False), append_meanwhile)
    assert appended and report.records == CALLS * 3 and report.missing == 0 and report.ok


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
