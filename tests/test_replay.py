"""Replay: simulate and live modes, report, plot and the ``agentspec replay`` command."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agentspec.replay.live import replay_live
from agentspec.replay.report import ReplayedCall, ReplayReport, plot_report, render_methods, render_summary
from agentspec.replay.simulate import replay_simulate
from agentspec.replay.trajectories import load_sessions
from agentspec.stats import SpecStats

DATA = Path(__file__).parent / "data"


# ------------------------------------------------------------------------------ a fake engine
@dataclass
class FakeResult:
    token_ids: list[int]
    stats: SpecStats


@dataclass
class FakeEngine:
    """The Engine API surface replay uses; refuses prompts over the window like the real one."""

    tokenizer: object
    context_window: int = 8192
    model_name: str = "fake"
    eos_ids: set = field(default_factory=lambda: {2})
    seen: list = field(default_factory=list)

    def generate(self, prompt, *, session=None, max_new_tokens=256, **_):
        assert all(isinstance(t, int) for t in prompt)
        if len(prompt) + max_new_tokens > self.context_window:
            raise AssertionError(f"replay sent {len(prompt)} + {max_new_tokens} tokens into {self.context_window}")
        self.seen.append((session, len(prompt)))
        n = max_new_tokens
        stats = SpecStats(prompt_tokens=len(prompt), output_tokens=n, steps=n // 2, drafted_tokens=n,
                          accepted_tokens=n // 2, prefill_seconds=0.1, decode_seconds=0.2)
        return FakeResult(list(range(n)), stats)


@pytest.fixture()
def fake_engine(default_tokenizer):
    return FakeEngine(default_tokenizer)


# ------------------------------------------------------------------------------ live
def test_live_replays_every_call_in_order_under_the_trajectory_id(fake_engine):
    sessions = load_sessions(DATA / "jsonl") + load_sessions(DATA / "mini_swe_agent")
    seen = []
    report = replay_live(fake_engine, sessions, max_new_tokens=8, on_call=seen.append)
    expected = [(s.id, k) for s in sessions for k in range(len(s.calls))]
    assert [(c.session, c.index) for c in report.calls] == expected
    assert [sid for sid, _ in fake_engine.seen] == [sid for sid, _ in expected]
    assert seen == report.calls and report.skipped == []
    assert report.stats.output_tokens == 8 * len(expected)
    assert report.stats.tokens_per_step == pytest.approx(2.0) and report.stats.hit_rate == pytest.approx(0.5)
    assert report.speedup() is None and report.speedup(end_to_end=True) is None  # no baseline
    # one definition of tokens per step: the method table's equals the summary's
    assert report.totals("agentspec").tokens_per_step == report.stats.tokens_per_step


def test_live_fits_long_prompts_and_skips_what_cannot_fit(fake_engine):
    fake_engine.context_window = 2048  # tau-bench prompts here run to 5,503 tokens
    sessions = load_sessions(DATA / "tau_bench", limit=1)
    report = replay_live(fake_engine, sessions, max_new_tokens=16)
    assert len(report.calls) + len(report.skipped) == len(sessions[0].calls) == 15
    assert len(report.calls) >= 12 and sum(c.fitted for c in report.calls) >= 8  # old turns dropped
    assert report.calls[0].fitted is False and report.calls[-1].fitted is True
    assert all("cannot be fitted to 2032 tokens" in note for note in report.skipped)  # a huge last tool output
    assert all(c.prompt_tokens <= 2048 - 16 for c in report.calls)
    # OpenHands prompts (949, 1034, 1058 tokens) are one user message: nothing to drop
    fake_engine.context_window = 1000
    report = replay_live(fake_engine, load_sessions(DATA / "openhands"), max_new_tokens=16)
    assert [c.index for c in report.calls] == [0]
    assert len(report.skipped) == 2 and report.skipped[0].startswith("BrowsingAgent/test_browse_internet call 1: ")
    assert "1034 tokens cannot be fitted to 984 tokens" in report.skipped[0]


def test_live_baseline_gives_speedups_and_identity(fake_engine):
    calls = []

    def fake_hf(prompt_ids, session, max_new_tokens):
        calls.append(len(prompt_ids))
        ids = list(range(max_new_tokens)) if len(calls) % 2 else [7] * max_new_tokens
        return ids, 0.4, 0.6, max_new_tokens - 1  # decode s, total s, steps

    sessions = load_sessions(DATA / "jsonl")
    report = replay_live(fake_engine, sessions, max_new_tokens=8, baseline=True, runners={"hf": fake_hf})
    assert calls == [c.prompt_tokens for c in report.calls]  # same prompt ids, same calls
    assert [c.identical for c in report.calls] == [True, False, True]
    assert report.speedup() == pytest.approx(2.0)  # 7 tokens in 0.2 s vs 0.4 s
    assert report.speedup(end_to_end=True) > 1  # 0.6 s a call against a fake engine's microseconds
    assert report.tokens_per_second() == pytest.approx(7 / 0.2)  # decode: the tokens after the first
    summary = report.to_dict()
    assert summary["summary"]["identical"] == 2
    assert summary["methods"]["hf"]["compared"] == 0  # the reference is not compared with itself
    assert summary["methods"]["agentspec"]["decode_speedup_vs_hf"] == pytest.approx(2.0)


def test_a_16_bit_kv_or_int8_matmul_engine_is_checked_against_its_own_plain_decoding(fake_engine):
    import torch

    fake_engine.kv_dtype = torch.float16  # HF keeps fp32 KV: its greedy output is not the reference then

    def run(output):
        return lambda prompt_ids, session, n: (output(n), 0.2, 0.3, n - 1)

    runners = {"hf": run(lambda n: [7] * n), "agentspec_nospec": run(lambda n: list(range(n)))}
    report = replay_live(fake_engine, load_sessions(DATA / "jsonl"), max_new_tokens=8, runners=runners)
    assert [c.identical for c in report.calls] == [True, True, True]  # equal to speculation off, not to HF
    fake_engine.kv_dtype = None
    report = replay_live(fake_engine, load_sessions(DATA / "jsonl"), max_new_tokens=8, runners=runners)
    assert [c.identical for c in report.calls] == [False, False, False]  # fp32 KV: HF greedy is the reference
    fake_engine.matmul = "int8"  # int8-rounded matmul inputs: HF is not the reference either
    report = replay_live(fake_engine, load_sessions(DATA / "jsonl"), max_new_tokens=8, runners=runners)
    assert [c.identical for c in report.calls] == [True, True, True]


def test_live_compares_several_methods_call_by_call(fake_engine, tmp_path):
    order = []

    def runner(name, ids_out):
        def run(prompt_ids, session, max_new_tokens):
            order.append(name)
            return ids_out(max_new_tokens), 0.8 if name == "hf" else 0.4, 1.0, max_new_tokens - 1
        return run

    runners = {"hf": runner("hf", lambda n: list(range(n))), "hf_pld": runner("hf_pld", lambda n: [1] * n),
               "hf_int8": runner("hf_int8", lambda n: [2] * n), "agentspec_int8": runner("agentspec_int8",
                                                                                   lambda n: [2] * n)}
    saved = []
    report = ReplayReport("live")
    sessions = load_sessions(DATA / "jsonl")

    def save(_record):
        report.save(tmp_path / "r.json")
        saved.append(json.loads((tmp_path / "r.json").read_text())["summary"]["calls"])

    replay_live(fake_engine, sessions, max_new_tokens=8, compare=list(runners), calls_per_session=1,
                runners=runners, on_call=save, report=report)
    assert [(c.session, c.index) for c in report.calls] == [("weather-1", 0), ("weather-2", 0)]  # 1 call each
    assert saved == [1, 2]  # the report on disk grows call by call
    assert order == list(runners) * 2  # interleaved: every method on call k before call k+1
    assert report.speedup("hf_pld", "hf") == pytest.approx(2.0)
    assert report.totals("hf_pld").identical == 0 and report.totals("hf_pld").compared == 2
    assert report.totals("hf").compared == 0  # the reference
    assert report.totals("hf_int8").compared == 2 and report.totals("hf_int8").identical == 0  # int8 vs fp32
    # int8 is held to plain greedy decoding of the same int8 weights, not to the fp32 model's
    assert report.totals("agentspec_int8").identical == report.totals("agentspec_int8").compared == 2
    from rich.console import Console

    console = Console(width=160, record=True)
    console.print(render_methods(report))
    text = console.export_text()
    assert "HF prompt lookup" in text and "2.00x" in text
    with pytest.raises(ValueError, match="unknown comparison methods"):
        replay_live(fake_engine, sessions, max_new_tokens=8, compare=["vllm"])


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 0}, "max_new_tokens must be positive"),
    ({"max_new_tokens": 64, "max_context": 64}, "leaves no room"),
])
def test_live_rejects_bad_settings(fake_engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        replay_live(fake_engine, load_sessions(DATA / "jsonl"), **kwargs)


# ------------------------------------------------------------------------------ simulate
def test_simulate_records_match_the_shared_simulation(default_tokenizer):
    sessions = load_sessions(DATA / "swe_agent") + load_sessions(DATA / "jsonl")
    ticks = []
    report = replay_simulate(sessions, default_tokenizer, on_call=ticks.append)
    sim = report.info["simulation"]
    n_calls = sum(len(s.calls) for s in sessions)
    assert len(report.calls) == len(ticks) == sim["calls"] == n_calls
    assert [(c.session, c.index) for c in report.calls] == [(s.id, k) for s in sessions for k in range(len(s.calls))]
    stats = report.stats
    for name in ("output_tokens", "steps", "accepted_tokens", "drafted_tokens", "tokens_per_step", "hit_rate"):
        assert getattr(stats, name) == pytest.approx(sim[name]), name
    assert stats.accepted_by_source == sim["accepted_by_source"]
    assert report.modelled_speedup() == pytest.approx(sim["speedup"])
    assert report.tokens_per_second() == pytest.approx(sim["modelled_tokens_per_second"])
    assert stats.tokens_per_step > 1.2 and 0 < stats.hit_rate < 1  # repetition is found and used
    # each step commits its accepted tokens plus one bonus token (none when the drafts ran to the end)
    assert all(c.stats.steps + c.stats.accepted_tokens - 1 <= c.stats.output_tokens
               <= c.stats.steps + c.stats.accepted_tokens for c in report.calls)


def test_simulate_skips_calls_that_cannot_fit(default_tokenizer):
    sessions = load_sessions(DATA / "jsonl")
    ticks = []
    report = replay_simulate(sessions, default_tokenizer, max_prompt_tokens=10, on_call=ticks.append)
    assert report.calls == [] and len(report.skipped) == 3 and ticks == [None] * 3
    assert report.stats.tokens_per_step == 0.0 and report.stats.hit_rate == 0.0


# ------------------------------------------------------------------------------ output
def _call(session: str, index: int, output: int, steps: int, drafted: int = 0, accepted: int = 0) -> ReplayedCall:
    stats = SpecStats(output_tokens=output, steps=steps, drafted_tokens=drafted, accepted_tokens=accepted)
    return ReplayedCall(session, index, 100, stats, modelled_seconds=0.1 * steps)


def _small_report() -> ReplayReport:
    calls = [_call("a", 0, 10, 10), _call("a", 1, 20, 5, drafted=30, accepted=15), _call("b", 0, 8, 4, 8, 4)]
    return ReplayReport("simulate", calls=calls, skipped=["x call 3: too long"], info={"modelled_speedup": 1.5})


def test_report_json_round_trip(tmp_path):
    report = _small_report()
    report.save(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"]["calls"] == 3 and data["summary"]["sessions"] == 2
    assert data["summary"]["tokens_per_step"] == pytest.approx(38 / 19)
    assert data["summary"]["hit_rate"] == pytest.approx(19 / 38)
    assert data["summary"]["tokens_per_second"] == pytest.approx(38 / 1.9)  # modelled: 19 steps of 0.1 s
    assert data["calls"][1]["tokens_per_step"] == 4.0 and data["skipped"] == ["x call 3: too long"]


def test_summary_table_and_plot(tmp_path):
    from rich.console import Console

    report = _small_report()
    console = Console(record=True, width=100)
    console.print(render_summary(report))
    text = console.export_text()
    assert "2.00" in text and "50.0%" in text and "1.50x" in text and "20.0" in text  # tokens/s
    out = plot_report(report, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


# ------------------------------------------------------------------------------ CLI
@pytest.fixture()
def cli():
    from agentspec.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["replay", *map(str, args)])


def test_cli_simulate_writes_report_and_plot(cli, tmp_path):
    result = cli(DATA / "jsonl", DATA / "mini_swe_agent", "--report", tmp_path / "r.json", "--plot", tmp_path / "p.png")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["mode"] == "simulate" and data["summary"]["calls"] == 7
    assert (tmp_path / "p.png").stat().st_size > 0
    assert "tokens / verification step" in result.output


def test_cli_skips_bad_files_and_fails_only_when_nothing_replays(cli, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    result = cli(tmp_path)
    assert result.exit_code == 1
    assert "bad.json" in result.output and "not valid JSON" in result.output
    (tmp_path / "good.jsonl").write_text((DATA / "jsonl/weather.jsonl").read_text())
    result = cli(tmp_path, "--limit", "1")
    assert result.exit_code == 0, result.output
    assert "bad.json" in result.output and "1 sessions" in result.output
    assert cli(tmp_path / "missing.traj").exit_code == 1


def test_cli_rejects_unknown_mode(cli):
    result = cli(DATA / "jsonl", "--mode", "fast")
    assert result.exit_code == 2 and "simulate" in result.output


# ------------------------------------------------------------------------------ the real model
@pytest.mark.model
def test_live_on_the_real_model_matches_plain_greedy(default_engine):
    sessions = load_sessions(DATA / "jsonl")  # short prompts: seconds on a CPU
    report = replay_live(default_engine, sessions, max_new_tokens=8, baseline=True)
    assert report.skipped == [] and [(c.session, c.index) for c in report.calls] == [
        ("weather-1", 0), ("weather-1", 1), ("weather-2", 0)]
    assert all(c.identical for c in report.calls)  # lossless: token for token plain greedy
    assert all(0 < c.stats.output_tokens <= 8 and c.stats.steps > 0 for c in report.calls)
    assert report.speedup() is not None and report.speedup(end_to_end=True) is not None


@pytest.mark.model
def test_llamacpp_prompt_lookup_equals_its_plain_greedy_in_fewer_steps(default_engine):
    pytest.importorskip("llama_cpp", reason="the llama.cpp baselines need llama-cpp-python (an optional extra)")
    from agentspec.replay.baselines import comparison_runner

    plain, lookup = (comparison_runner(name, default_engine, 2048) for name in ("llamacpp", "llamacpp_pld"))
    text = "def add(a, b):\n    return a + b\n\n" * 60  # over 512 tokens: more than one llama.cpp batch
    prompt = default_engine.encode_prompt(f"Repeat this code exactly:\n{text}")
    ids, _, _, steps = plain(prompt, "s", 48)
    pld_ids, _, _, pld_steps = lookup(prompt, "s", 48)
    assert pld_ids == ids and steps == len(ids) - 1
    assert 0 < pld_steps < steps  # drafts from the prompt were accepted


def test_swebench_example_runs(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "examples" / "swebench_replay.py"
    out = subprocess.run([sys.executable, str(script), str(DATA / "swe_agent"), "--limit", "1", "--plot",
                          str(tmp_path / "p.png")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "1 sessions, 4 calls" in out.stdout and "tokens / verification step" in out.stdout
    assert (tmp_path / "p.png").is_file()


def test_copies_are_detected_and_figures_reported_without_them(fake_engine):
    from agentspec.replay.report import copied_share

    assert copied_share([5, 6, 7, 8, 9], [1, 5, 6, 7, 8, 2]) == pytest.approx(0.8)
    assert copied_share([5, 6, 7, 8, 9], [5, 6, 1, 7, 8, 9]) == pytest.approx(0.6)
    assert copied_share([], [1]) == 0.0

    def nospec(prompt_ids, session, n):
        return list(range(n)), 0.4, 1.0, n - 1  # twice agentspec's decode time (0.2 s, fake engine)

    sessions = load_sessions(DATA / "jsonl")
    report = replay_live(fake_engine, sessions, max_new_tokens=8, compare=["agentspec_nospec"],
                         runners={"agentspec_nospec": nospec})
    assert all(c.copied is not None for c in report.calls)
    report.calls[0].copied = 0.9  # the first call copies its prompt; with the others at 0.5
    for c in report.calls[1:]:
        c.copied = 0.5
    report.calls[0].stats.decode_seconds = 0.1  # ... and runs four times faster than speculation off
    assert report.speedup("agentspec", "agentspec_nospec", not_copies=True) == pytest.approx(2.0)
    assert report.speedup("agentspec", "agentspec_nospec") > 2.0
    assert report.totals("agentspec", not_copies=True).calls == len(report.calls) - 1
    summary = report.to_dict()["summary"]
    assert summary["copies"] == 1 and summary["speculation_gain_not_copies"] == pytest.approx(2.0)
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_methods(report))
    text = " ".join(console.export_text().split())
    assert "speculation off" in text and "2.00x (not copies)" in text and "covers less than 80%" in text
