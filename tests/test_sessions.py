"""Sessions through the engine and a store: a new process drafts from what an earlier one stored."""

from __future__ import annotations

import multiprocessing as mp
import uuid

import pytest
from test_store import BACKENDS, fresh_url
from typer.testing import CliRunner

PROMPT = [5, 17, 99, 3, 250, 41, 8, 77, 19, 300, 12, 6]


def tiny_engine(store_url: str | None):
    """A tiny random Llama (the same weights in every process) with the real drafter and a store."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from agentspec.config import SpeculationConfig
    from agentspec.draft.builder import SuffixDrafter
    from agentspec.engine import Engine
    from agentspec.engine.model import load_tokenizer
    from agentspec.sessions import SessionManager

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    drafter = SuffixDrafter()
    engine = Engine(model, load_tokenizer(), drafter=drafter, speculation=SpeculationConfig(adaptive=False))
    engine.eos_ids = set()
    if store_url:
        engine.sessions = SessionManager.open(store_url, drafter, engine.fingerprint)
    return engine


def _first_process(url: str, session: str) -> None:
    engine = tiny_engine(url)
    engine.generate(PROMPT, session=session, max_new_tokens=48)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_process_drafts_from_the_first(backend, tmp_path):
    url = fresh_url(backend, tmp_path)
    session = f"agent-{uuid.uuid4().hex[:6]}"
    proc = mp.get_context("spawn").Process(target=_first_process, args=(url, session))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == 0
    # a fresh process with no store: drafts only from the prompt itself
    cold = tiny_engine(None).generate(PROMPT, session=session, max_new_tokens=48)
    # a fresh process on the shared store: the first process's output is in the session tree
    warm_engine = tiny_engine(url)
    warm = warm_engine.generate(PROMPT, session=session, max_new_tokens=48)
    assert warm.token_ids == cold.token_ids  # same greedy output either way
    assert warm.stats.tokens_per_step > cold.stats.tokens_per_step + 1
    assert warm.stats.accepted_by_source.get("session", 0) > 0
    # and the call was appended: two calls in the session now, the second with its statistics
    loaded = warm_engine.sessions.store.load_session(session)
    assert len(loaded.calls) == 2 and loaded.calls[1].stats["output_tokens"] == 48


def test_global_history_reaches_other_sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'g.db'}"
    tiny_engine(url).generate(PROMPT, session="first", max_new_tokens=40)
    other = tiny_engine(url).generate(PROMPT, session="second", max_new_tokens=40)
    assert other.stats.accepted_by_source.get("global", 0) > 0


def test_stats_cli_reads_what_the_engine_stored(tmp_path):
    from agentspec.cli import app

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    engine = tiny_engine(url)
    for _ in range(2):
        engine.generate(PROMPT, session="cli-session", max_new_tokens=30)
    result = CliRunner().invoke(app, ["stats", "--json", "--store", url])
    assert result.exit_code == 0, result.output
    import json

    rows = json.loads(result.output)
    assert rows["cli-session"]["calls"] == 2 and rows["cli-session"]["output_tokens"] == 60
    assert rows["*"]["accepted_tokens"] > 0 and 0 < rows["*"]["hit_rate"] <= 1
    listing = CliRunner().invoke(app, ["sessions", "list", "--store", url])
    assert "cli-session" in listing.output
    missing = CliRunner().invoke(app, ["sessions", "show", "nope", "--store", url])
    assert missing.exit_code == 1 and "no session" in missing.output


def test_session_load_feeds_only_what_fits_the_drafter_budget():
    from types import SimpleNamespace

    from agentspec.stores import CallRecord

    from agentspec.sessions import SessionManager

    drafter = SimpleNamespace(config=SimpleNamespace(session_max_tokens=100))
    manager = SessionManager(store=None, drafter=drafter, fingerprint="fp")
    prompt = list(range(50))
    calls = [CallRecord(1, "s", prompt, [1] * 10), CallRecord(2, "s", prompt + [1] * 10 + [2] * 30, [3] * 20),
             CallRecord(3, "s", [9] * 40, [4] * 30)]  # sizes 60, 50, 70: the newest two are 120 > 100
    assert [c.record_id for c in manager._newest_that_fit(calls)] == [3]
    drafter.config.session_max_tokens = 120
    assert [c.record_id for c in manager._newest_that_fit(calls)] == [2, 3]


class RecordingDrafter:
    """A drafter stand-in that records what the manager feeds it."""

    def __init__(self) -> None:
        self.history: list[tuple] = []

    def add_history(self, session_id, prompt_ids, output_ids, *, to_global=True) -> None:
        self.history.append((session_id, list(prompt_ids), list(output_ids), to_global))


def test_manager_without_a_store_keeps_nothing():
    from agentspec.sessions import SessionManager
    from agentspec.stats import SpecStats

    drafter = RecordingDrafter()
    manager = SessionManager.open(None, drafter, "fp")
    manager.ensure_loaded("s")
    assert manager.record("s", [1, 2], [3], SpecStats(output_tokens=1)) is None
    assert drafter.history == []


def test_manager_loads_global_once_and_each_session_once(tmp_path):
    from agentspec.stores import open_store

    from agentspec.sessions import SessionManager
    from agentspec.stats import SpecStats

    url = f"sqlite:///{tmp_path / 'm.db'}"
    writer = SessionManager.open(url, RecordingDrafter(), "fp")
    writer.record("a", [1, 2], [3, 4], SpecStats())
    writer.record("b", [5], [6], SpecStats())
    open_store(url).append("c", [7], [8], fingerprint="other-tokenizer")
    drafter = RecordingDrafter()
    manager = SessionManager.open(url, drafter, "fp")  # a new process on the same store
    manager.ensure_loaded("a")
    manager.ensure_loaded("a")
    assert drafter.history == [(None, [], [3, 4], True), (None, [], [6], True),  # global: this tokenizer only
                               ("a", [1, 2], [3, 4], False)]
    manager.ensure_loaded("new-session")
    assert len(drafter.history) == 3


def test_manager_sees_calls_other_processes_append_later(tmp_path):
    from agentspec.sessions import SessionManager
    from agentspec.stats import SpecStats

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    drafter_a, drafter_b = RecordingDrafter(), RecordingDrafter()
    a = SessionManager.open(url, drafter_a, "fp")
    b = SessionManager.open(url, drafter_b, "fp")  # another process on the same store
    a.ensure_loaded("s")
    b.ensure_loaded("s")
    b.record("s", [1, 2], [3], SpecStats())
    b.record("other", [4], [5], SpecStats())
    a.ensure_loaded("s")  # before a's next call of "s": b's new calls
    assert drafter_a.history == [(None, [], [3], True), (None, [], [5], True), ("s", [1, 2], [3], False)]
    a.record("s", [1, 2, 3, 6], [7], SpecStats())
    a.ensure_loaded("s")  # its own call is not fed twice (the drafter learnt it live)
    b.ensure_loaded("s")
    assert len(drafter_a.history) == 3
    assert drafter_b.history == [(None, [], [7], True), ("s", [1, 2, 3, 6], [7], False)]


def test_session_of_another_tokenizer_is_refused_before_drafting(tmp_path):
    from agentspec.stores import TokenizerMismatchError, open_store

    from agentspec.sessions import SessionManager
    from agentspec.stats import SpecStats

    url = f"sqlite:///{tmp_path / 't.db'}"
    open_store(url).append("s", [1], [2], fingerprint="tok-a")
    drafter = RecordingDrafter()
    manager = SessionManager.open(url, drafter, "tok-b")
    with pytest.raises(TokenizerMismatchError, match="tok-a"):
        manager.ensure_loaded("s")
    assert all(session != "s" for session, *_ in drafter.history)
    with pytest.raises(TokenizerMismatchError):
        manager.record("s", [1], [3], SpecStats())
    assert [c.output_ids for c in manager.store.load_session("s").calls] == [[2]]


def test_cli_maintenance_commands(tmp_path):
    import json

    from agentspec.stores import open_store

    from agentspec.cli import app

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    store = open_store(url)
    call = {"output_tokens": 4, "steps": 2, "drafted_tokens": 4, "accepted_tokens": 2,
            "accepted_by_source": {"session": 2}}
    for _ in range(3):
        store.append("keep", [1] * 6, [2] * 4, call, fingerprint="fp")
    store.append("gone", [1], [2], fingerprint="fp")
    run = CliRunner().invoke

    out = run(app, ["stats", "--session", "keep", "--json", "--store", url])
    rows = json.loads(out.output)
    assert set(rows) == {"keep", "*"} and rows["keep"]["tokens_per_step"] == 2.0
    assert rows["keep"]["hit_rate"] == 0.5 and rows["keep"]["accepted_by_source"]["session"] == 6
    table = run(app, ["stats", "--store", url])
    assert table.exit_code == 0 and "all sessions" in table.output and "50.0%" in table.output

    path = tmp_path / "keep.jsonl"
    assert run(app, ["sessions", "export", "keep", str(path), "--store", url]).exit_code == 0
    assert run(app, ["sessions", "import", str(path), "--as", "copy", "--store", url]).exit_code == 0
    again = run(app, ["sessions", "import", str(path), "--as", "copy", "--store", url])
    assert again.exit_code == 1 and "exists already" in again.output
    assert run(app, ["sessions", "drop", "gone", "--store", url]).exit_code == 0
    assert run(app, ["sessions", "drop", "gone", "--store", url]).exit_code == 1
    assert run(app, ["prune", "--max-session-tokens", "10", "--store", url]).output.strip() == "deleted 4 calls"
    listing = json.loads(run(app, ["sessions", "list", "--json", "--store", url]).output)
    assert {(s["session_id"], s["calls"]) for s in listing} == {("keep", 1), ("copy", 1)}

    bad = run(app, ["stats", "--store", "postgresql+psycopg://nobody@127.0.0.1:1/none"])
    assert bad.exit_code == 2 and "cannot open the store" in bad.output


def test_engine_refuses_a_session_of_another_tokenizer_before_generating(tmp_path):
    from agentspec.stores import TokenizerMismatchError, open_store

    url = f"sqlite:///{tmp_path / 'tok.db'}"
    open_store(url).append("theirs", [1, 2], [3], fingerprint="another-tokenizer")
    engine = tiny_engine(url)
    with pytest.raises(TokenizerMismatchError, match="another-tokenizer"):
        engine.generate(PROMPT, session="theirs", max_new_tokens=4)
    assert len(engine.generate(PROMPT, session="mine", max_new_tokens=4).token_ids) == 4  # still usable


def test_store_failure_after_generation_keeps_the_output(tmp_path, caplog):
    from agentspec.stores import StoreError

    engine = tiny_engine(f"sqlite:///{tmp_path / 'fail.db'}")

    def broken(*args, **kwargs):
        raise StoreError("the database is read-only (test)")

    engine.sessions.record = broken
    result = engine.generate(PROMPT, session="s", max_new_tokens=6)
    assert len(result.token_ids) == 6
    assert "not stored" in caplog.text
