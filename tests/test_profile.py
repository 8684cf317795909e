"""The step profile: its timed run computes what the forward computes, and the bytes add up."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from agentspec.kernels.blockq import blocks_available
from typer.testing import CliRunner

from agentspec.config import SpeculationConfig
from agentspec.engine import Engine
from agentspec.engine.cpu_fast import fast_linears
from agentspec.engine.forward import select_forward
from agentspec.engine.profile import (
    PARTS,
    _Clock,
    _random_cache,
    parse_sizes,
    profile_steps,
    step_bytes,
    timed_step,
)
from agentspec.engine.quantize import quantize_model
from agentspec.engine.verify import ancestor_mask


def _engine(model) -> Engine:
    return Engine(model, None, drafter=None, speculation=SpeculationConfig(enabled=False))


@pytest.fixture(scope="module")
def engine(tiny_model):
    return _engine(tiny_model)


@pytest.mark.parametrize("parents", [[-1, 0, 1], [], [-1, 0, 0, 1, -1]])
def test_the_timed_step_computes_exactly_what_the_forward_computes(engine, parents):
    step, head = engine.forward.step, engine.forward.head
    cache = _random_cache(step, 37, 8)
    k = len(parents) + 1
    ids, positions = torch.randint(3, 500, (k,)), torch.arange(37, 37 + k)
    mask = ancestor_mask(parents)
    expected = engine.forward.verify(ids, positions, mask, cache)
    keys = [layer.keys.clone() for layer in cache.layers]
    cache.truncate(37)
    clock = _Clock()
    with torch.no_grad(), fast_linears():
        got = timed_step(step, head, ids, positions, mask, cache, clock)
    assert torch.equal(got, expected)
    assert all(torch.equal(a, layer.keys) for a, layer in zip(keys, cache.layers))
    assert set(clock.parts) == set(PARTS) and all(v >= 0 for v in clock.parts.values())
    assert clock.parts["matmul"] > 0 and clock.parts["attention"] > 0


def test_profile_reports_every_shape_with_bytes_and_floor(engine, tmp_path):
    seen = []
    report = profile_steps(engine, (16, 64), (1, 3), repeats=1, bandwidth=1e9, on_step=seen.append)
    assert [(s.context, s.tree) for s in report.steps] == [(16, 1), (16, 3), (64, 1), (64, 3)] == [
        (s.context, s.tree) for s in seen]
    config = engine.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv_row = config.num_hidden_layers * config.num_key_value_heads * head_dim * 2 * 4
    for s in report.steps:
        assert s.step_seconds > 0 and s.ops > 0 and s.dispatch_seconds > 0
        assert s.bytes["attention"] - (s.context + s.tree) * kv_row == (
            config.num_hidden_layers * s.tree * config.hidden_size * 4)  # keys and values, then the queries
        assert s.bytes["kv_write"] == s.tree * kv_row
        # fp32 weights (random, not GGUF blocks): every linear layer and the head at 4 bytes a value
        layer = engine.model.model.layers[0]
        per_layer = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        assert s.bytes["matmul"] == config.num_hidden_layers * per_layer * 4
        assert s.bytes["head"] == config.vocab_size * config.hidden_size * 4
        assert s.floor_seconds == pytest.approx(s.bytes_read / 1e9)
    assert report.step(64, 3).bytes_read > report.step(16, 3).bytes_read
    path = tmp_path / "profile.json"
    report.save(path)
    data = json.loads(path.read_text())
    assert len(data["steps"]) == 4 and data["bandwidth_bytes_per_second"] == 1e9
    assert set(data["steps"][0]["parts"]) == set(PARTS)


@pytest.mark.skipif(not blocks_available(), reason="the GGUF-block kernel is not built for this CPU")
def test_block_weights_are_counted_as_stored(tiny_model):
    model = quantize_model(copy.deepcopy(tiny_model), "int8")  # every linear layer: exact Q8_0 blocks
    engine = _engine(model)
    step, head = engine.forward.step, engine.forward.head
    cache = _random_cache(step, 8, 4)
    nbytes = step_bytes(step, head, 8, 2, cache)
    layer = model.model.layers[0]
    values = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert nbytes["matmul"] == model.config.num_hidden_layers * values * (1 + 4 / 32)  # int8 + an fp32 scale / 32


def test_profile_refuses_an_engine_without_the_lean_forward(tiny_model):
    engine = Engine(tiny_model, None, drafter=None, speculation=SpeculationConfig(enabled=False),
                    forward=select_forward(tiny_model, fast_cpu=False))
    with pytest.raises(ValueError, match="lean CPU forward"):
        profile_steps(engine, (8,), (1,), bandwidth=1e9)


def test_parse_sizes():
    assert parse_sizes("1k, 3000,6k") == [1000, 3000, 6000]
    assert parse_sizes("1,4,8,16") == [1, 4, 8, 16]
    for bad in ("", "0", "a", "-3"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


def test_cli_profile_writes_the_report(engine, monkeypatch, tmp_path):
    from agentspec.cli import app
    from agentspec.cli.options import ModelOptions
    from agentspec.engine import profile

    monkeypatch.setattr(ModelOptions, "engine", lambda self, store=None: engine)
    monkeypatch.setattr(profile, "memory_bandwidth", lambda nbytes: 1e10)
    out = tmp_path / "p.json"
    result = CliRunner().invoke(app, ["bench", "--profile", "--contexts", "32", "--tree-sizes", "1,2",
                                      "--report", str(out)])
    assert result.exit_code == 0, result.output
    assert "step/floor" in result.output and "verification step profile" in result.output
    assert [s["tree"] for s in json.loads(out.read_text())["steps"]] == [1, 2]
    bad = CliRunner().invoke(app, ["bench", "--profile", "--contexts", "zero"])
    assert bad.exit_code == 2 and "zero" in bad.output

