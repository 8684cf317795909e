"""The search benchmark: its task checker, the bundled task set, and the harness on a tiny model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from agentspec.config import SpeculationConfig
from agentspec.engine import Engine
from agentspec.replay import search_bench as sb
from agentspec.replay.search_tasks import (
    DEFAULT_TASKS,
    SCORERS,
    SearchTask,
    arithmetic_score,
    check,
    first_json_object,
    load_tasks,
    pass_at_k,
    save_tasks,
    wilson,
)

CALL = {"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}


@pytest.mark.parametrize("kind, answer, text, expected", [
    ("number", 85, "37 + 48 = 85", True),
    ("number", 85, "The answer is 85.", True),
    ("number", 85, "85 is wrong, it is 86", False),
    ("number", 1200, "It is 1,200", True),
    ("number", 7, "no number here", False),
    ("word", "tac", "The word backwards is 'tac'.", True),
    ("word", "tac", "tack", False),
    ("regex", r"[a-z]+, ?[a-z]+, ?[a-z]+", "apple, pear, plum.", True),
    ("regex", r"[a-z]+, ?[a-z]+, ?[a-z]+", "Apple, pear, plum", False),
    ("regex", r"[a-z]+, ?[a-z]+, ?[a-z]+", "apple, pear", False),
    ("tool_call", CALL, '{"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}', True),
    ("tool_call", CALL, 'Sure: {"name": "get_user_details", "arguments": {"user_id": " mia_li_3668"}} ok', True),
    ("tool_call", CALL, '{"name": "get_user_details", "arguments": {"user_id": "mia_li"}}', False),
    ("tool_call", CALL, '{"name": "get_reservation_details", "arguments": {"user_id": "mia_li_3668"}}', False),
    ("tool_call", CALL, '{"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"', False),
])
def test_checker(kind, answer, text, expected):
    assert check(kind, answer, text) is expected


def test_first_json_object_skips_broken_braces():
    assert first_json_object('{oops} then {"a": 1}') == {"a": 1}
    assert first_json_object("[1, 2]") is None


def test_bad_kind_and_bad_line_are_named(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        SearchTask("t", [], "vibes", None)
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"id": "a", "messages": [], "kind": "number", "answer": 1}\nnot json\n')
    with pytest.raises(ValueError, match="tasks.jsonl:2"):
        load_tasks(path)


def test_tasks_round_trip(tmp_path):
    tasks = [SearchTask("a", [{"role": "user", "content": "1+1?"}], "number", 2, measured={"pass@1": 0.25})]
    save_tasks(tasks, tmp_path / "t.jsonl")
    assert load_tasks(tmp_path / "t.jsonl") == tasks


def test_pass_at_k_and_wilson():
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - (7 * 6) / (10 * 9))
    lo, hi = wilson(5, 20)
    assert lo < 0.25 < hi and lo == pytest.approx(0.1119, abs=1e-3) and hi == pytest.approx(0.4687, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)


def test_bundled_tasks_meet_the_selection_rule():
    if not DEFAULT_TASKS.exists():
        pytest.skip(f"{DEFAULT_TASKS} is not in this checkout")
    tasks = load_tasks()
    assert len(tasks) >= 10
    assert len({t.id for t in tasks}) == len(tasks)
    assert len({json.dumps(t.messages) for t in tasks}) == len(tasks)
    for t in tasks:
        p1 = t.measured["pass@1"]
        pk = t.measured[f"pass@{t.measured['samples']}"]
        assert 0.05 <= p1 <= 0.60 and pk - p1 >= 0.25, t.id
        assert t.kind in {"number", "word", "regex", "tool_call"}


def test_bundled_multi_step_tasks_are_verified_step_by_step():
    path = DEFAULT_TASKS.with_name("search_tasks_steps.jsonl")
    if not path.exists():
        pytest.skip(f"{path} is not in this checkout")
    tasks = load_tasks(path)
    assert len(tasks) >= 5 and len({t.id for t in tasks}) == len(tasks)
    for t in tasks:
        assert t.kind == "number" and t.scorer == "arithmetic", t.id
        assert 0.05 <= t.measured["pass@1"] <= 0.60 and t.measured["pass@16"] - t.measured["pass@1"] >= 0.25, t.id


@pytest.mark.parametrize("steps, expected", [
    (["48 / 2 = 24 clips.", "So 48 + 24 = 72."], 1.0),  # both right
    (["2 * 3 = 7", "5-1=4"], 0.0),  # one wrong, one right
    (["3 x 4 = 13"], -1.0),
    (["Let us think."], 0.0),  # nothing to check
    (["10 ÷ 0 = 1"], -1.0),  # a division by zero is wrong
    (["It costs $3 × 4 = $12."], 1.0),
])
def test_arithmetic_score_recomputes_what_the_steps_write(steps, expected):
    assert arithmetic_score("q", steps) == expected


def test_a_task_names_a_known_scorer():
    with pytest.raises(ValueError, match="scorer"):
        SearchTask("t", [{"role": "user", "content": "q"}], "number", 1, scorer="oracle")
    assert SearchTask("t", [{"role": "user", "content": "q"}], "number", 1, scorer="arithmetic").scorer in SCORERS


# ---------------------------------------------------------------------------------------- harness
ANY = SearchTask("any", [{"role": "user", "content": "Say something."}], "regex", r"(?s).*")
NEVER = SearchTask("never", [{"role": "user", "content": "Say something."}], "regex", r"impossible answer")


@pytest.fixture
def tiny_engine(tiny_model, default_tokenizer):
    engine = Engine(tiny_model, default_tokenizer, drafter=None, speculation=SpeculationConfig(enabled=False))
    encode = engine.encode_prompt
    engine.encode_prompt = lambda prompt, tools=None: [t % 500 for t in encode(prompt, tools)]  # tiny vocab
    return engine


def _stub_search(texts_by_policy: dict[str, list[str]]):
    """A stand-in for ``engine.search`` with its signature and result shape, recording its calls."""
    calls = []

    def search(prompt, *, policy, width, draft, seed, cluster_distance, **_):
        calls.append({"policy": policy, "width": width, "seed": seed, "draft": draft,
                      "cluster_distance": cluster_distance})
        texts = texts_by_policy[policy]
        kv = {"best_of_n": 400, "beam": 200, "rebase": 300, "ets": 120}[policy]
        stats = SimpleNamespace(generated_tokens=10 * width, wall_seconds=1.0 if draft else 2.0, kv_peak_tokens=kv,
                                kv_mean_tokens=kv / 2, kv_bytes_per_token=100, forwards=5,
                                accepted_draft_tokens=4 if draft else 0)
        trajectories = [SimpleNamespace(text=t, token_ids=[1], score=-i, step_scores=[-i]) for i, t in enumerate(texts)]
        return SimpleNamespace(trajectories=trajectories, stats=stats)

    return search, calls


def test_harness_runs_every_method_and_grades_the_top_answer(tiny_engine, monkeypatch):
    right = SearchTask("t", [{"role": "user", "content": "2+2?"}], "number", 4)
    stub, calls = _stub_search({"best_of_n": ["5", "4"], "beam": ["4", "5"], "rebase": ["4"], "ets": ["3", "4"]})
    monkeypatch.setattr(tiny_engine, "search", stub)
    config = sb.SearchBenchConfig(width=4, max_new_tokens=6, seed=7)
    seen = []
    report = sb.run_bench(tiny_engine, [right], config, sb.METHODS, tasks_path="x", on_run=seen.append)
    assert [r.method for r in report.runs] == list(sb.METHODS) == [r.method for r in seen]
    by = {r.method: r for r in report.runs}
    assert by["beam"].correct and by["rebase"].correct
    assert by["best_of_n"].correct is False and by["best_of_n"].covered  # 4 is there, ranked second
    assert by["loop"].correct is None  # ranks nothing
    assert by["hf"].trajectories == 4 and by["loop"].trajectories == 4
    assert {c["seed"] for c in calls} == {7} and {c["width"] for c in calls} == {4}
    assert [(c["draft"], c["cluster_distance"]) for c in calls if c["policy"] == "ets"] == [
        (True, 0.05), (False, 0.05), (True, sb.COARSE_CLUSTER_DISTANCE)]
    assert by["ets"].kv_peak_tokens == 120 and by["ets-nodraft"].wall_seconds == 2.0


def test_hf_kv_is_width_copies_of_prompt_and_output(tiny_engine):
    config = sb.SearchBenchConfig(width=3, max_new_tokens=5)
    run = sb.run_hf(tiny_engine, ANY, config, seed=0)
    prompt = len(tiny_engine.encode_prompt(ANY.messages))
    assert run.correct and run.covered and 3 <= run.generated_tokens <= 15
    assert run.kv_peak_tokens == 3 * (prompt + 5)  # the random tiny model never says EOS in 5 tokens
    assert run.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16 dims, fp32
    assert sb.run_hf(tiny_engine, NEVER, config, seed=0).covered is False


def test_loop_samples_one_after_another_with_distinct_seeds(tiny_engine):
    run = sb.run_loop(tiny_engine, ANY, sb.SearchBenchConfig(width=3, max_new_tokens=4), seed=1)
    assert run.generated_tokens == 12 and run.trajectories == 3 and run.correct is None and run.covered
    assert run.forwards == 12  # speculation off: a prefill (its first token) and 3 decode steps a sample
    assert run.kv_peak_tokens == len(tiny_engine.encode_prompt(ANY.messages)) + 4


def test_summary_targets_table_plot_and_report(tmp_path):
    report = sb.SearchBenchReport("tasks.jsonl", sb.SearchBenchConfig(width=16))

    def run(method, correct, kv, wall, tokens=160):
        return sb.Run("t", method, correct, True, 16, tokens, wall, kv, kv / 2, 1000)

    for i in range(4):
        report.runs += [run("hf", i < 2, 4000, 4.0), run("loop", None, 300, 8.0),
                        run("best_of_n", i < 2, 800, 1.0), run("rebase", i < 2, 1200, 1.0),
                        run("ets", i < 1, 250, 1.0), run("ets-nodraft", i < 1, 250, 2.0)]
    summary = {s.method: s for s in report.summaries()}
    assert summary["hf"].accuracy == 0.5 and summary["hf"].accuracy_ci == pytest.approx(wilson(2, 4))
    assert summary["loop"].accuracy is None and summary["hf"].tokens_per_second == pytest.approx(40.0)
    assert summary["ets"].kv_peak_mb == pytest.approx(250 * 1000 / 2**20)
    got = {t["target"]: t for t in sb.targets(report.summaries())}
    assert got["ETS peak KV / REBASE peak KV <= 0.5"]["met"] is True
    assert got["ETS accuracy within REBASE's 95% interval"]["met"] is True
    assert got["best_of_n peak KV / hf peak KV <= 0.25"]["met"] is True
    assert got["rebase peak KV / hf peak KV <= 0.25"]["met"] is False
    assert got["best_of_n tokens/s / hf tokens/s >= 3"]["met"] is True
    assert got["best_of_n tokens/s / loop tokens/s >= 4"]["measured"] == pytest.approx(8.0)
    assert got["ets tokens/s with / without drafting >= 1.5"]["measured"] == pytest.approx(2.0)
    table, checks = sb.render_table(report)
    assert table.row_count == 6 and checks.row_count == len(got)
    report.save(tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["config"]["width"] == 16 and len(saved["runs"]) == 24 and saved["targets"]
    sb.plot_report(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_parse_methods():
    assert sb.parse_methods(None) == list(sb.METHODS)
    assert sb.parse_methods("hf, ets-nodraft") == ["hf", "ets-nodraft"]
    with pytest.raises(ValueError, match="dfs"):
        sb.parse_methods("hf,dfs")


def test_harness_on_the_real_search_shares_the_prompt_kv(tiny_engine):
    config = sb.SearchBenchConfig(width=4, max_new_tokens=8, max_step_tokens=4)
    report = sb.run_bench(tiny_engine, [ANY], config, sb.METHODS)
    by = {r.method: r for r in report.runs}
    assert set(by) == set(sb.METHODS)
    for method in sb.POLICIES:
        assert by[method].trajectories >= 1 and by[method].generated_tokens > 0 and by[method].correct
        assert by[method].kv_bytes_per_token == by["hf"].kv_bytes_per_token
        # the prompt once, not once per trajectory
        assert by[method].kv_peak_tokens < by["hf"].kv_peak_tokens, method


def test_cli_search_and_bench_search(tiny_engine, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from agentspec.cli import app
    from agentspec.cli.options import ModelOptions

    monkeypatch.setattr(ModelOptions, "engine", lambda self, store=None: tiny_engine)
    runner = CliRunner()
    out = runner.invoke(app, ["search", "Say something.", "--width", "2", "--max-new-tokens", "4",
                              "--max-step-tokens", "2", "--policy", "rebase", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["stats"]["width"] == 2 and data["trajectories"][0]["token_ids"]
    out = runner.invoke(app, ["search", "hi", "--policy", "dfs"])
    assert out.exit_code != 0 and "dfs" in out.output
    save_tasks([ANY, NEVER], tmp_path / "tasks.jsonl")
    out = runner.invoke(app, ["bench", "--search", "--tasks", str(tmp_path / "tasks.jsonl"), "--limit", "1",
                              "--width", "2", "--max-new-tokens", "4", "--methods", "hf,best_of_n",
                              "--temperature", "0.5",
                              "--report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
    assert out.exit_code == 0, out.output
    assert "tasks: 1 from" in out.output and "tokens/s" in out.output and "temperature 0.5" in out.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [r["method"] for r in saved["runs"]] == ["hf", "best_of_n"] and (tmp_path / "p.png").exists()
    assert saved["config"]["temperature"] == 0.5


# ---------------------------------------------------------------------------------------- n > 1
@pytest.fixture(scope="module")
def vocab_engine(default_tokenizer):
    """A tiny random Llama over the default tokenizer's whole vocabulary (chat prompts fit it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(default_tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    return Engine(model, default_tokenizer, drafter=None, speculation=SpeculationConfig(enabled=False))


def test_n_generations_in_one_chat_result(vocab_engine):
    from agentspec.integrations.langchain import ChatAgentSpec
    from langchain_core.messages import HumanMessage

    llm = ChatAgentSpec(engine=vocab_engine, n=3, temperature=1.0, max_tokens=5, seed=1)
    result = llm.generate([[HumanMessage("hi")]])
    generations = result.generations[0]
    assert len(generations) == 3
    best = generations[0].message
    search = best.response_metadata["search"]
    assert search["policy"] == "best_of_n" and search["width"] == 3
    assert best.usage_metadata["output_tokens"] == search["generated_tokens"] <= 15
    assert best.usage_metadata["input_tokens"] == search["prompt_tokens"]
    assert len(llm.generate([[HumanMessage("hi")]], n=1).generations[0]) == 1  # per call
    assert isinstance(llm.invoke("hi").content, str)  # invoke returns the best of the n
