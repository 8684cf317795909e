"""Trajectory formats -> sessions of ordered calls; bad files are reported and skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agentspec import chat
from agentspec.replay.trajectories import (
    Call,
    Session,
    default_data_dir,
    load_sessions,
    tokenize_call,
    tokenize_sessions,
)

DATA = Path(__file__).parent / "data"
# the full recorded data set (SWE-agent, tau-bench, OpenHands, Spec-Bench): $AGENTSPEC_DATA, else
# ../shared/data beside the repository (.ci/run sets AGENTSPEC_DATA when it is there)
SHARED = Path(os.environ.get("AGENTSPEC_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


class Errors(list):
    """on_error callback that records (path, reason) pairs."""

    def __call__(self, path: str, reason: str) -> None:
        self.append((path, reason))


# ------------------------------------------------------------------------------ formats
FORMATS = [
    # path, format, sessions, calls
    ("swe_agent", "swe-agent", 3, 14),
    ("tau_bench/gpt-4o-airline-first3.json", "tau-bench", 3, 31),
    ("openhands", "openhands", 1, 3),
    ("openhands/eventstream_runtime/BrowsingAgent/test_browse_internet", "openhands", 1, 3),
    ("mini_swe_agent/textutils__slugify-trailing-dash.traj.json", "mini-swe-agent", 1, 4),
    ("jsonl/weather.jsonl", "jsonl", 2, 3),
]


@pytest.mark.parametrize("rel,fmt,n_sessions,n_calls", FORMATS, ids=[f[1] + ":" + f[0] for f in FORMATS])
def test_each_format_loads(rel, fmt, n_sessions, n_calls):
    errors = Errors()
    sessions = load_sessions(DATA / rel, on_error=errors)
    assert errors == []
    assert len(sessions) == n_sessions
    assert sum(len(s.calls) for s in sessions) == n_calls
    assert {s.format for s in sessions} == {fmt}
    assert len({s.id for s in sessions}) == n_sessions
    for session in sessions:
        assert isinstance(session, Session) and session.calls
        for call in session.calls:
            assert isinstance(call, Call)
            assert call.messages and all(isinstance(m["role"], str) for m in call.messages)
            assert call.completion["role"] == "assistant"
            assert call.messages[-1]["role"] != "assistant"


@pytest.mark.parametrize("rel", ["swe_agent", "tau_bench", "mini_swe_agent"])
def test_linear_chats_grow_call_by_call(rel):
    """The prompt of call k+1 starts with the prompt of call k plus completion k."""
    for session in load_sessions(DATA / rel):
        for prev, nxt in zip(session.calls, session.calls[1:]):
            n = len(prev.messages)
            assert nxt.messages[:n] == prev.messages
            assert nxt.messages[n] == prev.completion


def test_swe_agent_demonstrations_stay_in_prompt():
    (session,) = load_sessions(DATA / "swe_agent" / next(p.name for p in (DATA / "swe_agent").glob("gpt4__*")))
    raw = json.loads(next((DATA / "swe_agent").glob("gpt4__*")).read_text())["history"]
    assert raw[1].get("is_demo") and raw[1]["role"] == "user"
    first = session.calls[0]
    assert first.messages[1]["content"] == raw[1]["content"]  # the demonstration was sent
    assert "is_demo" not in first.messages[1]  # only chat keys are kept


def test_swe_agent_demo_assistant_messages_are_not_calls(tmp_path):
    history = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "demo task", "is_demo": True},
        {"role": "assistant", "content": "demo answer", "is_demo": True},
        {"role": "user", "content": "real task"},
        {"role": "assistant", "content": "real answer"},
    ]
    (tmp_path / "a.traj").write_text(json.dumps({"history": history, "trajectory": []}))
    (session,) = load_sessions(tmp_path / "a.traj")
    assert [c.completion["content"] for c in session.calls] == ["real answer"]
    assert [m["content"] for m in session.calls[0].messages] == ["sys", "demo task", "demo answer", "real task"]


def test_swe_agent_step_queries_are_the_prompts(tmp_path):
    history = [{"role": "system", "content": "sys"}, {"role": "user", "content": "task"},
               {"role": "assistant", "content": "a1"}, {"role": "user", "content": "obs1"},
               {"role": "assistant", "content": "a2"}]
    queries = [[{"role": "system", "content": "sys"}, {"role": "user", "content": "task"}],
               [{"role": "system", "content": "sys"}, {"role": "user", "content": "(shortened) obs1"}]]
    steps = [{"response": "a1", "query": queries[0]}, {"response": "a2", "query": queries[1]}]
    (tmp_path / "q.traj").write_text(json.dumps({"history": history, "trajectory": steps}))
    (session,) = load_sessions(tmp_path / "q.traj")
    assert [c.messages for c in session.calls] == queries
    assert [c.completion["content"] for c in session.calls] == ["a1", "a2"]
    # queries alone (no history) still work
    (tmp_path / "q.traj").write_text(json.dumps({"trajectory": steps}))
    (session,) = load_sessions(tmp_path / "q.traj")
    assert [c.completion["content"] for c in session.calls] == ["a1", "a2"]


def test_function_calling_completions_render_tool_calls():
    (session,) = load_sessions(DATA / "swe_agent" / "function_calling_simple.traj")
    text = session.calls[0].completion_text
    assert "<tool_call>" in text and '"name": "find_file"' in text
    tau = load_sessions(DATA / "tau_bench")
    tool_completions = [c for s in tau for c in s.calls if c.completion.get("tool_calls")]
    assert tool_completions and all("<tool_call>" in c.completion_text for c in tool_completions)


def test_mini_swe_agent_drops_extra_and_keeps_order():
    (session,) = load_sessions(DATA / "mini_swe_agent")
    assert session.id == "textutils__slugify-trailing-dash"
    assert all("extra" not in c.completion for c in session.calls)
    assert session.calls[0].completion["content"].startswith("THOUGHT: I need to find")
    assert [m["role"] for m in session.calls[0].messages] == ["system", "user"]


def test_jsonl_groups_calls_by_session_in_order():
    a, b = load_sessions(DATA / "jsonl")
    assert (a.id, b.id) == ("weather-1", "weather-2")
    assert a.calls[0].completion["tool_calls"][0]["function"]["name"] == "get_weather"
    assert a.calls[1].completion == {"role": "assistant", "content": "It is 18 °C and cloudy in Paris."}
    assert b.calls[0].completion["content"] == "Let me check the forecast for Oslo."


def test_openhands_prompt_is_one_user_message_in_call_order():
    (session,) = load_sessions(DATA / "openhands")
    folder = DATA / "openhands/eventstream_runtime/BrowsingAgent/test_browse_internet"
    assert session.id == "BrowsingAgent/test_browse_internet"
    for k, call in enumerate(session.calls, 1):
        assert call.messages == [{"role": "user", "content": (folder / f"prompt_{k:03d}.log").read_text()}]
        assert call.completion["content"] == (folder / f"response_{k:03d}.log").read_text()


def test_limit_caps_sessions():
    assert len(load_sessions(DATA, limit=2)) == 2
    assert len(load_sessions(DATA / "tau_bench", limit=1)) == 1
    assert len(load_sessions(DATA)) == 10


def test_duplicate_session_ids_are_made_unique(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "same.traj").write_text(json.dumps({"history": [
            {"role": "user", "content": "t"}, {"role": "assistant", "content": "a"}]}))
    ids = [s.id for s in load_sessions(tmp_path)]
    assert ids == ["same", "same#2"]


# ------------------------------------------------------------------------------ real data
needs_shared = pytest.mark.skipif(
    not (SHARED / "swe_agent").is_dir(),
    reason=f"needs the full recorded data set (swe_agent, tau_bench, openhands): not found at {SHARED}; "
    "set AGENTSPEC_DATA to its folder")


@needs_shared
@pytest.mark.parametrize("rel,limit,n_sessions,n_calls", [
    ("swe_agent", None, 22, 230),
    ("tau_bench/gpt-4o-airline.json", 60, 60, 790),
    ("tau_bench/gpt-4o-airline.json", None, 200, 2454),
    ("openhands", None, 18, 93),
])
def test_reference_call_counts(rel, limit, n_sessions, n_calls):
    errors = Errors()
    sessions = load_sessions(SHARED / rel, limit=limit, on_error=errors)
    assert errors == []
    assert (len(sessions), sum(len(s.calls) for s in sessions)) == (n_sessions, n_calls)


@needs_shared
def test_whole_shared_folder_reports_only_non_trajectory_files():
    errors = Errors()
    sessions = load_sessions(SHARED, on_error=errors)
    assert len(sessions) == 22 + 200 + 18
    assert sorted(Path(p).name for p, _ in errors) == ["MockAirlineDomainEnv-few_shot.jsonl", "question.jsonl"]
    assert "Spec-Bench" in dict((Path(p).name, r) for p, r in errors)["question.jsonl"]


# ------------------------------------------------------------------------------ bad input
BAD_FILES = [
    ("broken.json", '{"history": [', "not valid JSON"),
    ("object.json", '{"foo": 1}', "unknown trajectory format"),
    ("numbers.json", "[1, 2, 3]", "unknown trajectory format"),
    ("empty.jsonl", "", "empty file"),
    ("garbage.jsonl", "not json\nalso not", "no line is valid JSON"),
    ("other.jsonl", '{"question_id": 1, "turns": ["hi"]}\n', "Spec-Bench"),
    ("badmsg.traj", '{"history": [{"content": "no role"}, {"role": "assistant", "content": "x"}]}', "role"),
    ("tau.json", '[{"traj": "not a list"}]', "record 0"),
    ("binary.traj", b"\xff\xfe\x00\x81", "cannot read"),
]


@pytest.mark.parametrize("name,content,reason", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_are_reported_and_skipped(tmp_path, name, content, reason):
    bad = tmp_path / name
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "LICENSE").write_text("MIT")  # ignored silently
    good = DATA / "mini_swe_agent/textutils__slugify-trailing-dash.traj.json"
    (tmp_path / "good.traj.json").write_text(good.read_text())
    errors = Errors()
    sessions = load_sessions(tmp_path, on_error=errors)
    assert [s.id for s in sessions] == ["textutils__slugify-trailing-dash"]
    assert len(errors) == 1
    path, why = errors[0]
    assert path == str(bad) and reason in why
    # the bad file alone: nothing loaded, still reported, no exception
    errors.clear()
    assert load_sessions(bad, on_error=errors) == [] and len(errors) == 1


def test_jsonl_bad_lines_are_reported_good_lines_kept(tmp_path):
    good = (DATA / "jsonl/weather.jsonl").read_text().splitlines()
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good[0], "{oops", '{"session": "s", "messages": [], "completion": "x"}', good[1]]))
    errors = Errors()
    sessions = load_sessions(path, on_error=errors)
    assert [s.id for s in sessions] == ["weather-1", "weather-2"]
    assert sorted(p for p, _ in errors) == [f"{path}:line 2", f"{path}:line 3"]


def test_session_without_calls_and_openhands_missing_response(tmp_path):
    (tmp_path / "nocall.traj").write_text(json.dumps({"history": [{"role": "user", "content": "t"}]}))
    oh = tmp_path / "oh" / "agent_test"
    oh.mkdir(parents=True)
    (oh / "prompt_001.log").write_text("p1")
    (oh / "response_001.log").write_text("r1")
    (oh / "prompt_002.log").write_text("p2")  # no response
    errors = Errors()
    sessions = load_sessions(tmp_path, on_error=errors)
    assert [(s.id, len(s.calls)) for s in sessions] == [("oh/agent_test", 1)]
    reasons = {Path(p).name: r for p, r in errors}
    assert "no response_002.log" in reasons["prompt_002.log"]
    assert "no assistant call" in reasons["nocall.traj"]


def test_missing_path_raises_with_the_path():
    with pytest.raises(FileNotFoundError, match="nowhere.traj"):
        load_sessions("/nonexistent/nowhere.traj")


def test_default_on_error_logs_a_warning(tmp_path, caplog):
    (tmp_path / "x.json").write_text("{")
    assert load_sessions(tmp_path) == []
    assert "x.json" in caplog.text and "not valid JSON" in caplog.text


def test_default_data_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTSPEC_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv("AGENTSPEC_DATA", str(tmp_path / "missing"))
    assert default_data_dir() != tmp_path / "missing"
    assert default_data_dir().is_dir()


# ------------------------------------------------------------------------------ tokens
def test_tokenize_call_prompt_and_completion(default_tokenizer):
    tok = default_tokenizer
    session = load_sessions(DATA / "tau_bench", limit=1)[0]
    call = next(c for c in session.calls if c.completion.get("tool_calls"))
    prompt, completion = tokenize_call(tok, call)
    assert prompt == chat.prompt_ids(tok, call.messages)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert completion[-1] == tok.eos_token_id
    assert tok.decode(completion[:-1]) == chat.assistant_text(call.completion)


def test_tokenize_call_fits_the_window(default_tokenizer):
    tok = default_tokenizer
    call = load_sessions(DATA / "tau_bench", limit=1)[0].calls[-1]
    full, _ = tokenize_call(tok, call)
    budget = len(full) // 2
    fitted, _ = tokenize_call(tok, call, max_prompt_tokens=budget)
    assert len(fitted) <= budget < len(full)
    assert fitted[:20] == full[:20]  # the system prompt is kept
    assert tokenize_call(tok, call, max_prompt_tokens=10) is None


def test_tokenize_sessions_skips_calls_that_cannot_fit(default_tokenizer):
    sessions = load_sessions(DATA / "jsonl")
    skipped = Errors()
    out = tokenize_sessions(default_tokenizer, sessions, max_prompt_tokens=10, on_skip=skipped)
    assert out == [[], []] and len(skipped) == 3 and skipped[0][0] == "weather-1 call 0"
    out = tokenize_sessions(default_tokenizer, sessions)
    assert [len(s) for s in out] == [2, 1]
