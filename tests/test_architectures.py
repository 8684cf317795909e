"""The lean forward and the engine on the Llama family beyond Llama: Qwen2 (q/k/v biases) and Qwen3
(per-head q/k norms), as tiny random models: the same hidden states as transformers' forward, speculative
greedy output equal to plain decoding, and tree search."""

from __future__ import annotations

import copy

import pytest
import torch
from agentspec.kernels.blockq import blocks_available
from doubles import assert_step_matches_transformers, tiny_decoder, write_q4_1_blocks

from agentspec.config import SpeculationConfig
from agentspec.engine import Engine
from agentspec.engine.cpu_fast import skinny_linears
from agentspec.engine.kvcache import TreeKVCache
from agentspec.engine.step_forward import LlamaStepForward, covers

ARCHITECTURES = ["qwen2", "qwen3"]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model(request):
    return tiny_decoder(request.param)


def _as_q4_1_blocks(model):
    """A copy whose linear weights are exact Q4_1 block values, so the block kernel and fused calls run."""
    model = copy.deepcopy(model)
    write_q4_1_blocks(model)
    assert skinny_linears(model) == (14, 14)
    return model


@pytest.mark.parametrize("gguf_blocks", [False, True])
def test_lean_forward_equals_transformers_forward(model, gguf_blocks):
    if gguf_blocks:
        if not blocks_available():
            pytest.skip("compiled block kernel not built, or no AVX2/FMA on this CPU")
        model = _as_q4_1_blocks(model)
    assert covers(model)
    step = LlamaStepForward.for_model(model)
    assert step is not None
    assert all(b is not None for b in step.qkv_bias) == (model.config.model_type == "qwen2")
    assert all(n is not None for n in step.q_norms) == (model.config.model_type == "qwen3")
    assert_step_matches_transformers(model, step)


def test_the_biases_and_norms_matter(model):
    """The comparison above can fail: the step without the architecture's extra parts (Qwen2's biases
    zeroed, Qwen3's head norms skipped) gives other hidden states."""
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for module in broken.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.zero_()
    step = LlamaStepForward.for_model(broken)
    step.q_norms = step.k_norms = [None] * len(step.layers)
    ids = torch.tensor([5, 9, 11, 3])
    with torch.no_grad():
        want = model.model(input_ids=ids[None]).last_hidden_state[0]
        got = step.prefill(ids, TreeKVCache(model.config.num_hidden_layers))
    assert not torch.allclose(got, want, atol=1e-3)


def test_sliding_window_models_keep_transformers_forward(model):
    windowed = copy.deepcopy(model)
    windowed.config.layer_types = ["sliding_attention"] * windowed.config.num_hidden_layers
    assert not covers(windowed)


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_speculative_greedy_equals_plain_decoding(model, default_tokenizer):
    """Drafts from the call's own repetition are verified on the lean forward: output equals HF greedy."""
    prompt = [7, 8, 9, 10, 11] * 6
    truth = _greedy(model, prompt, 24)
    engine = Engine(model, default_tokenizer, speculation=SpeculationConfig(adaptive=False))  # no cost probe
    engine.eos_ids = set()
    first = engine.generate(prompt, max_new_tokens=24, session="s")
    again = engine.generate(prompt, max_new_tokens=24, session="s")  # drafts from the first call's output
    assert first.token_ids == truth and again.token_ids == truth
    assert again.stats.steps < 24


def test_tree_search_runs(model, default_tokenizer):
    engine = Engine(model, default_tokenizer, speculation=SpeculationConfig(adaptive=False))
    engine.eos_ids = {2}
    result = engine.search([5, 6, 7, 8], width=4, policy="rebase", max_new_tokens=12, max_step_tokens=6, seed=0)
    assert 1 <= len(result.trajectories) <= 4
    assert all(0 < len(t.token_ids) <= 12 for t in result.trajectories)
