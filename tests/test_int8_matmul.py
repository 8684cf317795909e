"""The int8-activation block kernel (``block_linear(..., int8=True)``, kernels/_blockq.cpp) and the
engine's ``matmul="int8"`` mode.

The kernel is checked against a float64 evaluation of the *same* quantized arithmetic: the rounding of
the activations (q, d, s) must match a torch reference bit for bit, and each block's integer dot product
is exact in both, so the only difference left is the fp32 scaling and summation of a few dozen terms
per output. That is bounded by a small multiple of fp32's epsilon times the sum of the terms' magnitudes
(see :func:`_tolerance`), tight enough that one wrong lane, scale or min term fails it; bit equality with
a float64 sum is not possible. What must be bit-exact is a row against itself: the same row inside a
call of many rows, alone, or on another thread count (that is what makes a verification step equal
plain decoding), and the engine's speculative output against its own plain decoding in this mode.
"""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch
from agentspec.kernels.blockq import (
    BLOCK,
    BlockWeight,
    block_linear,
    int8_available,
    pack_blocks,
    q8_0_split,
    round_activations,
)
from test_engine import ScriptedDrafter

from agentspec.config import SpeculationConfig
from agentspec.engine import Engine, cpu_fast
from agentspec.engine.cpu_fast import narrow_matmul
from agentspec.engine.kvcache import TreeKVCache
from agentspec.engine.quantize import quantize_model
from agentspec.engine.verify import ancestor_mask

needs_int8 = pytest.mark.skipif(not int8_available(), reason="the block kernel is not built or no AVX-512 VNNI")
EPS32 = 2.0**-24


# ---------------------------------------------------------------------------------------------- references
def q4_1_round(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` rounded to Q4_1 blocks (fp16 d and m, q in 0..15), as fp32 values."""
    n, k = weight.shape
    b = weight.reshape(n, k // BLOCK, BLOCK)
    lo = b.amin(-1).half().float()
    d = ((b.amax(-1) - lo) / 15).half().float()
    q = torch.round((b - lo[..., None]) / torch.where(d > 0, d, 1.0)[..., None]).clamp(0, 15)
    return (q * d[..., None] + lo[..., None]).reshape(n, k)


def q8_0_round(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    q, d = q8_0_split(weight.reshape(n, k // BLOCK, BLOCK))
    return (q * d[..., None]).reshape(n, k)


def reference_rounding(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's Q8_1 rounding in torch fp32: d = max|x| / 127, q = round-half-even(x * (1/d)), s = d * sum(q)."""
    b = x.reshape(*x.shape[:-1], -1, BLOCK)
    d = b.abs().amax(-1) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.round(b * inv[..., None])
    return q.reshape(x.shape), d, d * q.sum(-1)


def reference_terms(x: torch.Tensor, w: BlockWeight) -> torch.Tensor:
    """The per-block terms of the int8 product in float64 ``[rows, N, terms]``: dw * dx * sum(qw * q) per
    block (exact integers), plus m * s per block for Q4_1. Their sum is the exact result."""
    q, d, s = reference_rounding(x)
    n, k = w.shape
    qx = q.double().reshape(-1, k // BLOCK, BLOCK)
    qw = torch.cat((w.packed & 0x0F, w.packed >> 4), -1) if w.bits == 4 else w.packed
    dots = torch.einsum("rbi,nbi->rnb", qx, qw.double())
    terms = dots * w.scale.double()[None] * d.double()[:, None, :]
    if w.bits == 4:
        terms = torch.cat((terms, s.double()[:, None, :] * w.min.double()[None]), dim=-1)
    return terms


def _tolerance(terms: torch.Tensor) -> torch.Tensor:
    """fp32 rounding of each term's scale (1 eps) and of a sum of at most ~nb / 16 + 8 additions per lane
    plus a 16-lane reduction: 64 eps of the magnitudes' sum is a generous bound that still catches any
    wrong term (a term is ~1 / nb of the sum, far above 64 eps)."""
    return 64 * EPS32 * terms.abs().sum(-1)


def _blocks(bits: int, n: int, k: int, seed: int = 0) -> BlockWeight:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    blocks = pack_blocks(q4_1_round(w) if bits == 4 else q8_0_round(w))
    assert blocks is not None and blocks.bits == bits
    return blocks


# 96: one pair and an odd block; 576: a group of 16 and a pair (the default model's hidden size);
# 1536: three groups (its MLP width); 544: a group and one odd block
SHAPES = [(40, 96), (33, 576), (17, 1536), (24, 544)]


# ---------------------------------------------------------------------------------------------- the kernel
@needs_int8
@pytest.mark.parametrize("k", [32, 96, 576, 1536])
def test_the_rounding_matches_the_reference_bit_for_bit(k):
    scales = torch.tensor([1e-3, 1.0, 30.0, 1e4, 0.2])[:, None]
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(k)) * scales
    x[1, :BLOCK] = 0  # an all-zero block: d = 0, q = 0
    got, want = round_activations(x), reference_rounding(x)
    assert got[0].dtype == torch.int8 and got[0].abs().max() <= 127
    assert torch.equal(got[0].float(), want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@needs_int8
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_the_fp64_reference_of_the_same_arithmetic(bits, shape):
    n, k = shape
    w = _blocks(bits, n, k)
    x = torch.randn(11, k, generator=torch.Generator().manual_seed(1)) * 3
    x[3] = 0  # a zero row gives exact zeros (Q8_0) or exactly the min terms' zero (Q4_1)
    terms = reference_terms(x, w)
    got = block_linear(x, w, int8=True).double()
    err = (got - terms.sum(-1)).abs()
    assert torch.all(err <= _tolerance(terms)), f"max error {err.max():.3g} over tolerance"
    assert torch.equal(got[3], torch.zeros(n, dtype=torch.float64))
    # and it is a different arithmetic from the fp32 kernel: the rounding of x shows
    assert not torch.equal(block_linear(x, w).double(), got)


@needs_int8
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_is_the_same_bits_alone_inside_many_rows_and_on_any_thread_count(bits, threads):
    w = _blocks(bits, 77, 576)
    x = torch.randn(11, 576, generator=torch.Generator().manual_seed(2))  # a tile of 8 rows and one of 3
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        many = block_linear(x, w, int8=True)
        eight = block_linear(x[:8], w, int8=True)
        for row in range(11):
            alone = block_linear(x[row : row + 1], w, int8=True)
            assert torch.equal(alone[0], many[row]), f"row {row} differs inside an 11-row call"
            if row < 8:
                assert torch.equal(alone[0], eight[row]), f"row {row} differs inside an 8-row call"
        torch.set_num_threads(1 if threads == 2 else 2)
        assert torch.equal(block_linear(x, w, int8=True), many), "the thread count changed the result"
    finally:
        torch.set_num_threads(before)


@needs_int8
def test_the_int8_layout_is_made_once_and_inputs_are_checked():
    w = _blocks(4, 8, 96)
    assert w.int8_layout is w.int8_layout
    assert w.int8_layout.packed.shape == (8, 4 * 16) and w.int8_layout.scale.shape == (8, 4)  # 3 blocks + 1 pad
    with pytest.raises(ValueError, match="fp32 CPU input"):
        block_linear(torch.randn(2, 96, dtype=torch.float64), w, int8=True)


# ---------------------------------------------------------------------------------------------- the mode
def test_matmul_names_and_the_fallback(monkeypatch, caplog):
    assert narrow_matmul("float32") == "float32"
    with pytest.raises(ValueError, match="float32, int8"):
        narrow_matmul("bf16")
    monkeypatch.setattr(cpu_fast, "int8_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="agentspec.engine.cpu_fast"):
        assert narrow_matmul("int8") == "float32"
    assert "AVX-512 BW and VNNI" in caplog.text


def gguf_like(model):
    """``model`` with the default model's kinds of blocks: decoder linear layers Q4_1, the tied
    embedding / output head Q8_0."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.get_decoder().layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(q4_1_round(module.weight))
        embed = model.get_input_embeddings().weight
        embed.copy_(q8_0_round(embed))
    return model


@pytest.fixture(scope="module", params=["q4_1", "q8_0"])
def block_model(request, tiny_model):
    return gguf_like(tiny_model) if request.param == "q4_1" else quantize_model(copy.deepcopy(tiny_model), "int8")


def int8_engine(model, kv_dtype=None, **kwargs):
    spec = SpeculationConfig(adaptive=False, **kwargs.pop("spec", {}))
    return Engine(model, kwargs.pop("tokenizer", None), speculation=spec, kv_dtype=kv_dtype, matmul="int8", **kwargs)


@needs_int8
def test_the_engine_runs_the_mode_it_was_given(block_model):
    int8 = int8_engine(block_model)
    fp32 = Engine(block_model, None, speculation=SpeculationConfig(adaptive=False))
    assert int8.matmul == "int8" and fp32.matmul == "float32"
    assert all(w is not None for w in int8.forward.step.qkv + int8.forward.step.gate_up)  # the layers are blocks
    prompt = list(range(3, 40))
    caches = [TreeKVCache(block_model.config.num_hidden_layers) for _ in range(2)]
    a, b = int8.forward.prefill(prompt, caches[0]), fp32.forward.prefill(prompt, caches[1])
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.1)  # int8-rounded inputs: close, not equal


@needs_int8
@pytest.mark.parametrize("kv", ["float32", "float16"])
def test_verification_logits_equal_one_token_steps_bit_for_bit(block_model, kv):
    engine = int8_engine(block_model, kv)
    forward, layers = engine.forward, block_model.config.num_hidden_layers
    rng = random.Random(0)
    prompt = [rng.randrange(3, 512) for _ in range(300)]
    parents = [-1, 0, 1, 0, 3, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]  # 25 tokens
    ids = [rng.randrange(3, 512) for _ in range(len(parents) + 1)]
    mask = ancestor_mask(parents)
    step_cache = TreeKVCache(layers, dtype=engine.kv_dtype)
    forward.prefill(prompt, step_cache)
    depths = mask.sum(-1) - 1
    step = forward.verify(torch.tensor(ids), 300 + depths, mask, step_cache)
    for row in range(len(ids)):  # each row as a one-token step after its ancestors, decoded one by one
        cache = TreeKVCache(layers, dtype=engine.kv_dtype)
        forward.prefill(prompt, cache)
        path = [j for j in range(len(ids)) if mask[row, j]]
        for j in path:
            one = forward.verify(torch.tensor([ids[j]]), torch.tensor([300 + int(depths[j])]),
                                 torch.ones(1, 1, dtype=torch.bool), cache)
        assert torch.equal(one[0], step[row]), f"tree row {row} differs from decoding it alone"


@needs_int8
@pytest.mark.parametrize("seed", range(3))
def test_speculative_greedy_equals_its_own_plain_decoding(block_model, default_tokenizer, seed):
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 512) for _ in range(rng.randrange(5, 300))]
    plain = int8_engine(block_model, tokenizer=default_tokenizer, spec={"prefix_cache_bytes": 0})
    plain.eos_ids = set()
    truth = plain.generate(prompt, max_new_tokens=40, speculate=False).token_ids
    engine = int8_engine(block_model, tokenizer=default_tokenizer, drafter=ScriptedDrafter(truth, 512, seed=seed),
                         spec={"prefix_cache_bytes": 2**24})
    engine.eos_ids = set()
    result = engine.generate(prompt, max_new_tokens=40)
    assert result.token_ids == truth
    assert result.stats.accepted_tokens > 0


@needs_int8
def test_a_long_prefill_gives_its_last_token_the_bits_of_that_token_run_alone(block_model):
    """A prompt reused from the prefix cache runs only its last token again: a prefill chunk of more than
    KERNEL_PREFILL_ROWS tokens (torch's attention) must give that token what the one-token step gives."""
    engine = int8_engine(block_model)
    forward, layers = engine.forward, block_model.config.num_hidden_layers
    prompt = [random.Random(3).randrange(3, 512) for _ in range(700)]
    whole, part = TreeKVCache(layers), TreeKVCache(layers)
    logits = forward.prefill(prompt, whole)
    forward.prefill(prompt[:-1], part)
    one = forward.verify(torch.tensor(prompt[-1:]), torch.tensor([699]), torch.ones(1, 1, dtype=torch.bool), part)
    assert torch.equal(logits, one[0])


@needs_int8
def test_a_search_multiplies_in_the_engines_mode_and_equals_its_plain_greedy(block_model, default_tokenizer,
                                                                              monkeypatch):
    engine = int8_engine(block_model, tokenizer=default_tokenizer)
    engine.eos_ids = set()
    prompt = list(range(3, 60))
    plain = engine.generate(prompt, max_new_tokens=16, speculate=False).token_ids
    modes = []
    real = cpu_fast.block_linear
    monkeypatch.setattr(cpu_fast, "block_linear",
                        lambda x, blocks, int8=False: modes.append(int8) or real(x, blocks, int8=int8))
    result = engine.search(prompt, width=3, policy="rebase", temperature=0.0, max_new_tokens=16, max_step_tokens=4)
    assert modes and all(modes), "the search's layers and head must run the engine's int8 mode"
    assert len(result.trajectories) == 3 and all(t.token_ids == plain for t in result.trajectories)
