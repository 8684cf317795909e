"""The ``agentspec`` command: option checking, exit codes, reports, and persistence across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agentspec.cli import app

DATA = Path(__file__).parent / "data"


@pytest.fixture()
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTSPEC_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_version(cli):
    from agentspec import __version__

    result = cli("--version")
    assert result.exit_code == 0 and result.output.strip() == f"agentspec {__version__}"


@pytest.mark.parametrize("args,choices", [
    (("run", "--dtype", "fp8"), "'float32', 'bfloat16'"),
    (("run", "--dtype", "float16"), "'float32', 'bfloat16'"),
    (("run", "--quantize", "int4"), "'int8'"),
    (("replay", "--mode", "fast"), "'simulate', 'live'"),
    (("bench", "--methods", "vllm,hf"), "agentspec, hf, hf_pld, llamacpp, llamacpp_pld, agentspec_int8, hf_int8"),
])
def test_enumerated_options_are_refused_with_their_choices(cli, args, choices):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert choices in " ".join(result.output.replace("│", " ").split())  # the error may be boxed and wrapped
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_stats_never_creates_a_store(cli, tmp_path):
    missing = tmp_path / "nowhere" / "c.db"
    result = cli("stats", "--store", f"sqlite:///{missing}")
    assert result.exit_code == 2 and str(missing) in " ".join(result.output.split())
    assert not missing.parent.exists()
    result = cli("stats")  # the default store, never written to
    assert result.exit_code == 2 and "cache.db" in result.output
    assert not (tmp_path / "home" / "cache.db").exists()


def test_stats_of_an_unknown_session_exits_1(cli, tmp_path):
    from agentspec.stores import open_store

    url = f"sqlite:///{tmp_path / 'c.db'}"
    open_store(url)
    assert cli("stats", "--store", url).exit_code == 0
    result = cli("stats", "--store", url, "--session", "nosuch")
    assert result.exit_code == 1 and "nosuch" in result.output


def test_bench_simulate_writes_its_report_and_says_what_it_read(cli, tmp_path):
    out = tmp_path / "sim.json"
    result = cli("bench", "--simulate", DATA / "jsonl", "--report", out, "--calls", "1")
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["calls"] == 2 and report["sessions"] == 2  # two sessions, one call each
    assert report["tokens_per_step"] == pytest.approx(report["output_tokens"] / report["steps"])
    assert f"read 2 sessions from {(DATA / 'jsonl').resolve()}" in " ".join(result.output.split())
    assert "modelled tokens / s" in result.output


def test_replay_calls_limits_each_session(cli):
    result = cli("replay", DATA / "jsonl", "--calls", "1")
    assert result.exit_code == 0, result.output
    assert "2 sessions, 2 calls" in result.output and "modelled tokens / s" in result.output


@pytest.mark.model
def test_run_then_stats_in_another_process(tmp_path):
    """A call made by `agentspec run` is in the default store for the next process."""
    from agentspec.config import agentspec_home

    home = tmp_path / "home"
    home.mkdir()
    models = agentspec_home() / "models"
    if models.is_dir():  # reuse the converted model instead of converting it again
        (home / "models").symlink_to(models.resolve())
    env = os.environ | {"AGENTSPEC_HOME": str(home)}
    cmd = [sys.executable, "-m", "agentspec.cli"]
    run = subprocess.run([*cmd, "run", "--prompt", "Name a colour.", "--max-new-tokens", "4"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    stats = subprocess.run([*cmd, "stats", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert stats.returncode == 0, stats.stderr
    rows = json.loads(stats.stdout)
    assert rows["run"]["calls"] == 1 and 0 < rows["run"]["output_tokens"] <= 4


class _Stop(Exception):
    pass


@pytest.fixture()
def engine_store(monkeypatch):
    """The store each command builds its engine with (the engine itself is not built)."""
    from agentspec.cli.options import ModelOptions

    seen = []

    def engine(self, store=None):
        seen.append(store or self.store_url)
        raise _Stop

    monkeypatch.setattr(ModelOptions, "engine", engine)
    return seen


def test_run_writes_to_the_default_store_unless_told(cli, tmp_path, engine_store):
    cli("run", "--prompt", "hi")
    cli("run", "--prompt", "hi", "--store", "memory")
    assert engine_store == [f"sqlite:///{tmp_path / 'home' / 'cache.db'}", "memory"]


def test_bench_uses_a_scratch_store_and_says_so(cli, tmp_path, engine_store):
    result = cli("bench", DATA / "jsonl", "--methods", "agentspec")
    assert len(engine_store) == 1 and engine_store[0].endswith("/bench.db")
    assert "home" not in engine_store[0] and "scratch store" in result.output
