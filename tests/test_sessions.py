"""Sessions through the engine and a store: a new process drafts from what an earlier one stored."""

from __future__ import annotations

import multiprocessing as mp
import uuid

import pytest
from agentspec.stores import CallRecord, TokenizerMismatchError, open_store
from test_store import BACKENDS, fresh_url
from typer.testing import CliRunner

from agentspec.draft.base import Source
from agentspec.draft.builder import DrafterConfig, SuffixDrafter
from agentspec.sessions import StoreSessions, newest_that_fit
from agentspec.stats import SpecStats

PROMPT = [5, 17, 99, 3, 250, 41, 8, 77, 19, 300, 12, 6]


def tiny_engine(store_url: str | None, **drafter_config):
    """A tiny random Llama (the same weights in every process) with the real drafter and a store."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from agentspec.config import SpeculationConfig
    from agentspec.engine import Engine
    from agentspec.engine.engine import tokenizer_fingerprint
    from agentspec.engine.model import load_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    tokenizer = load_tokenizer()
    sessions = StoreSessions(open_store(store_url), tokenizer_fingerprint(tokenizer)) if store_url else None
    drafter = SuffixDrafter(DrafterConfig(**drafter_config), history=sessions)
    engine = Engine(model, tokenizer, drafter=drafter, sessions=sessions, speculation=SpeculationConfig(adaptive=False))
    engine.eos_ids = set()
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
    prompt = list(range(50))
    calls = [CallRecord(1, "s", prompt, [1] * 10), CallRecord(2, "s", prompt + [1] * 10 + [2] * 30, [3] * 20),
             CallRecord(3, "s", [9] * 40, [4] * 30)]  # sizes 60, 50, 70: the newest two are 120 > 100
    assert [c.record_id for c in newest_that_fit(calls, 100)] == [3]
    assert [c.record_id for c in newest_that_fit(calls, 120)] == [2, 3]


def test_history_loads_all_then_only_what_is_new(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    writer = StoreSessions(open_store(url), "fp")
    writer.record("a", [1, 2], [3, 4], SpecStats())
    writer.record("b", [5], [6], SpecStats())
    open_store(url).append("c", [7], [8], fingerprint="other-tokenizer")
    reader = StoreSessions(open_store(url), "fp")  # a new process on the same store
    everyone = reader.calls(None, None, 1000)
    assert everyone.calls == [([], [3, 4]), ([], [6])] and not everyone.replace  # this tokenizer only
    a = reader.calls("a", None, 1000)
    assert a.calls == [([1, 2], [3, 4])]
    assert reader.calls("a", a.cursor, 1000).calls == [] and reader.calls(None, everyone.cursor, 1000).calls == []
    assert reader.calls("new-session", None, 1000).calls == []


def test_history_returns_what_other_processes_append_later(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = StoreSessions(open_store(url), "fp"), StoreSessions(open_store(url), "fp")  # two processes
    a_global, a_s = a.calls(None, None, 1000), a.calls("s", None, 1000)
    b_global, b_s = b.calls(None, None, 1000), b.calls("s", None, 1000)
    b.record("s", [1, 2], [3], SpecStats())
    b.record("other", [4], [5], SpecStats())
    a_global, a_s = a.calls(None, a_global.cursor, 1000), a.calls("s", a_s.cursor, 1000)
    assert a_global.calls == [([], [3]), ([], [5])] and a_s.calls == [([1, 2], [3])]
    a.record("s", [1, 2, 3, 6], [7], SpecStats())
    # its own call is not returned to a (its drafter learnt it live); b gets it, but not its own calls
    assert a.calls("s", a_s.cursor, 1000).calls == [] and a.calls(None, a_global.cursor, 1000).calls == []
    assert b.calls("s", b_s.cursor, 1000).calls == [([1, 2, 3, 6], [7])]
    assert b.calls(None, b_global.cursor, 1000).calls == [([], [7])]


def test_own_record_ids_are_bounded_and_an_old_cursor_gets_a_full_reload(tmp_path):
    sessions = StoreSessions(open_store(f"sqlite:///{tmp_path / 'b.db'}"), "fp", own_records_kept=4)
    first = sessions.calls("s", None, 1000)
    for i in range(50):  # 50 calls in 50 sessions: only the newest 4 ids are kept
        sessions.record(f"session-{i}", [i], [i + 100], SpecStats())
    sessions.record("s", [1], [2], SpecStats())
    assert len(sessions._own) == 4
    assert sessions.calls("s", sessions.calls("s", None, 1000).cursor, 1000).calls == []
    # a cursor from before the forgotten ids cannot be told which calls are its own: everything, to replace
    again = sessions.calls("s", first.cursor, 1000)
    assert again.replace and again.calls == [([1], [2])]
    everyone = sessions.calls(None, first.cursor, 10_000)
    assert everyone.replace and len(everyone.calls) == 51


def _session_drafts(drafter: SuffixDrafter, session: str, prompt: list[int]) -> int:
    drafter.start_request("r", session, prompt)
    tree = drafter.propose("r", 16)
    drafter.stop_request("r")
    return sum(source == Source.SESSION for source in tree.sources)


def test_an_evicted_session_drafts_from_the_store_again(tmp_path):
    """The drafter keeps one session tree (max_sessions=1): after another session evicts it, the
    session is loaded from the store again on its next request, and drafts what it drafted before."""
    url = f"sqlite:///{tmp_path / 'evict.db'}"
    prompt, output = [5, 17, 99, 3, 250, 41], [8, 77, 19, 300, 12, 6, 60, 61, 62]
    open_store(url).append("a", prompt, output, fingerprint="fp")  # an earlier process's call
    drafter = SuffixDrafter(DrafterConfig(max_sessions=1, use_global=False),
                            history=StoreSessions(open_store(url), "fp"))
    again = prompt + output[:3]  # the next call repeats the start of the stored output
    assert _session_drafts(drafter, "a", again) > 0
    assert _session_drafts(drafter, "b", [1, 2, 3]) == 0  # holds "b" now: "a" was evicted
    assert _session_drafts(drafter, "a", again) > 0


def test_session_of_another_tokenizer_is_refused_before_drafting(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    open_store(url).append("s", [1], [2], fingerprint="tok-a")
    sessions = StoreSessions(open_store(url), "tok-b")
    drafter = SuffixDrafter(history=sessions)
    with pytest.raises(TokenizerMismatchError, match="tok-a"):
        drafter.start_request("r", "s", [1, 2])
    with pytest.raises(KeyError):
        drafter.propose("r", 4)  # the request never started
    assert drafter._session("s") is None
    with pytest.raises(TokenizerMismatchError):
        sessions.record("s", [1], [3], SpecStats())
    assert [c.output_ids for c in sessions.store.load_session("s").calls] == [[2]]


def test_a_session_recreated_by_another_tokenizer_is_refused(tmp_path):
    """A reader holds a cursor on a session; another process drops it and re-creates it with another
    tokenizer: the reader's next look refuses it instead of feeding the other tokenizer's ids."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    open_store(url).append("s", [1, 2], [3], fingerprint="fp")
    drafter = SuffixDrafter(history=StoreSessions(open_store(url), "fp"))
    drafter.start_request("r1", "s", [1, 2])
    drafter.stop_request("r1")
    other = open_store(url)
    assert other.delete_session("s")
    other.append("s", [400, 401], [402, 403], fingerprint="another-tokenizer")
    with pytest.raises(TokenizerMismatchError, match="another-tokenizer"):
        drafter.start_request("r2", "s", [1, 2])
    drafter.start_request("r3", "x", [400, 401])
    assert 402 not in drafter.propose("r3", 8).tokens  # the other tokenizer's ids reached no tree


def test_cli_maintenance_commands(tmp_path):
    import json

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
