"""The compiled tree-attention kernel (kernels/_attn.cpp) and 16-bit KV in the engine.

The kernel must match the fp64 reference to rounding, and give each query row the very same bits
whether it is computed inside a step of T tokens or alone once its ancestors are committed (that
is what makes a verification step equal plain decoding). Each test runs once per instruction set
(AVX-512 with BF16, AVX-512, AVX2) this CPU has; AVX-512 and AVX2 must agree bit for bit, and the
BF16 one with them except on bf16 KV (which it multiplies in bf16).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from agentspec.kernels.attention import (
    ISA_ENV,
    ISAS,
    attention_available,
    cpu_isas,
    kernel_isa,
    narrow_kv_dtype,
    rms_norm,
    rope_store,
    tree_attention_rows,
)
from agentspec.kernels.blockq import blocks_available
from agentspec.kernels.reference import masked_attention
from test_engine import ScriptedDrafter, make_engine

from agentspec.config import SpeculationConfig
from agentspec.engine import Engine
from agentspec.engine.cpu_fast import fast_linears
from agentspec.engine.forward import select_forward
from agentspec.engine.kvcache import TreeKVCache
from agentspec.engine.quantize import quantize_model
from agentspec.engine.step_forward import LlamaStepForward, _rotate_half
from agentspec.engine.verify import ancestor_mask

needs_kernel = pytest.mark.skipif(not attention_available(), reason="the _attn extension is not built or no AVX2")
EACH_ISA = pytest.mark.parametrize("isa", [
    pytest.param(isa, marks=pytest.mark.skipif(isa not in cpu_isas(), reason=f"no {isa} kernel on this CPU"))
    for isa in ISAS
])
KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TREES = {
    "one token": [],
    "chain of 8": list(range(-1, 6)),
    "branching 9": [-1, 0, 1, 0, 3, 3, 5, -1],
    "chain of 16": list(range(-1, 14)),
}


def _kv(hkv: int, n: int, d: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(1, hkv, n, d, generator=g).to(dtype) for _ in range(2))
    return k, v


def _reference(q, k, v, mask, prefix, scale):
    out = masked_attention(q.double(), k.double(), v.double(), mask, prefix, scale)
    return out.transpose(1, 2).reshape(1, q.shape[2], -1).float()


@EACH_ISA
@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("tree", list(TREES), ids=str)
@pytest.mark.parametrize("prefix", [0, 5, 255, 700])
def test_kernel_matches_the_fp64_reference(isa, dtype, tree, prefix):
    mask = ancestor_mask(TREES[tree])
    t = mask.shape[0]
    q = torch.randn(1, 9, t, 64, generator=torch.Generator().manual_seed(prefix))
    k, v = _kv(3, prefix + t, 64, dtype, prefix + 1)
    got = tree_attention_rows(q, k, v, mask, 0.125, isa=isa)
    if isa == "avx512bf16" and dtype == torch.bfloat16:  # the query and the softmax weights rounded to bf16
        reference = _reference(q.bfloat16().float(), k, v, mask, prefix, 0.125)
        torch.testing.assert_close(got, reference, atol=8e-3, rtol=1e-2)
        assert not torch.equal(got, tree_attention_rows(q, k, v, mask, 0.125, isa="avx512")) or prefix + t < 2
    else:
        torch.testing.assert_close(got, _reference(q, k, v, mask, prefix, 0.125), atol=2e-6, rtol=2e-5)


@EACH_ISA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [16, 32, 128])
def test_kernel_covers_each_head_dim(isa, dtype, head_dim):
    mask = ancestor_mask([-1, 0, 0])
    q = torch.randn(1, 4, 4, head_dim)
    k, v = _kv(2, 40 + 4, head_dim, dtype, 0)
    got = tree_attention_rows(q, k, v, mask, head_dim**-0.5, isa=isa)
    if isa == "avx512bf16" and dtype == torch.bfloat16 and head_dim > 16:
        reference = _reference(q.bfloat16().float(), k, v, mask, 40, head_dim**-0.5)
        torch.testing.assert_close(got, reference, atol=8e-3, rtol=1e-2)
    else:
        torch.testing.assert_close(got, _reference(q, k, v, mask, 40, head_dim**-0.5), atol=2e-6, rtol=2e-5)


@pytest.mark.skipif({"avx512", "avx2"} - set(cpu_isas()), reason="needs a CPU with both AVX-512 and AVX2")
@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_avx2_and_avx512_give_the_same_bits(dtype, head_dim):
    """Same operations in the same order: a row's result does not depend on the instruction set (nor
    on BF16 support, except for bf16 KV with head dims of 32 and up, which that multiplies in bf16)."""
    for prefix, tree in [(0, "chain of 8"), (300, "branching 9"), (1000, "one token"), (600, "chain of 16")]:
        mask = ancestor_mask(TREES[tree])
        t = mask.shape[0]
        q = 4 * torch.randn(1, 6, t, head_dim, generator=torch.Generator().manual_seed(prefix))  # wide score ranges
        k, v = _kv(2, prefix + t, head_dim, dtype, prefix + 2)
        wide, narrow = (tree_attention_rows(q, k, v, mask, head_dim**-0.5, isa=isa) for isa in ("avx512", "avx2"))
        assert torch.equal(wide, narrow), f"{tree} after {prefix} keys: AVX2 differs from AVX-512"
        if "avx512bf16" in cpu_isas() and (dtype != torch.bfloat16 or head_dim == 16):
            assert torch.equal(wide, tree_attention_rows(q, k, v, mask, head_dim**-0.5, isa="avx512bf16"))


def _alone(q, k, v, mask, prefix, row, scale, **kwargs):
    """Row ``row`` of the step computed as a one-token step after its ancestors were committed:
    the prefix, then the ancestors' K/V rows in order, then its own."""
    seen = [prefix + j for j in range(mask.shape[0]) if mask[row, j]]
    keep = torch.tensor(list(range(prefix)) + seen)
    k1, v1 = k.index_select(2, keep).contiguous(), v.index_select(2, keep).contiguous()
    return tree_attention_rows(q[:, :, row : row + 1], k1, v1, torch.ones(1, 1, dtype=torch.bool), scale, **kwargs)


@EACH_ISA
@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
@pytest.mark.parametrize("prefix", [3, 250, 300, 1000])  # 250: the ancestors cross a 256-key chunk boundary
def test_a_row_inside_a_step_is_bit_identical_to_the_token_decoded_alone(isa, dtype, prefix):
    parents = [-1, 0, 1, 0, 3, 3, 5]  # 8 tokens with branches: row 7 sees 0, 3, 5, 7 (not in cache order)
    mask = ancestor_mask(parents)
    t = mask.shape[0]
    q = torch.randn(1, 9, t, 64, generator=torch.Generator().manual_seed(7))
    k, v = _kv(3, prefix + t, 64, dtype, 8)
    step = tree_attention_rows(q, k, v, mask, 0.125, isa=isa)
    for row in range(t):
        alone = _alone(q, k, v, mask, prefix, row, 0.125, isa=isa)
        assert torch.equal(step[:, row], alone[:, 0]), f"row {row} differs from the token decoded alone"
    # and the thread count changes nothing
    assert torch.equal(tree_attention_rows(q, k, v, mask, 0.125, threads=1, isa=isa),
                       tree_attention_rows(q, k, v, mask, 0.125, threads=2, isa=isa))


@EACH_ISA
@pytest.mark.parametrize("dtype", KV_DTYPES, ids=str)
def test_rows_read_from_a_pool_by_slot_equal_the_same_keys_held_in_order(isa, dtype):
    """A search's leaves: each token sees the prefix rows and its own leaf's rows, scattered in a pool
    (shared ancestors, a path right after the prefix, one long enough to cross a 256-key chunk)."""
    k, v = _kv(3, 900, 64, dtype, 12)
    start, count = 40, 300  # prefix rows 40..339
    leaves = [([340, 341, 342, 700], [850, 851]), ([340, 341, 342, 650], [852]),
              ([800, *range(3, 40, 2)], [853, 854, 855])]
    slots, owners = [], []
    for w, (path, new) in enumerate(leaves):
        slots += path + new
        owners += [(w, i) for i in range(len(path) + len(new))]
    rows = [(w, i) for w, (path, new) in enumerate(leaves) for i in range(len(path), len(path) + len(new))]
    mask = torch.tensor([[ow == w and oi <= i for ow, oi in owners] for w, i in rows])
    q = torch.randn(1, 9, len(rows), 64, generator=torch.Generator().manual_seed(13))
    got = tree_attention_rows(q, k, v, mask, 0.125, isa=isa, slots=torch.tensor(slots), prefix=(start, count))
    for r in range(len(rows)):
        seen = list(range(start, start + count)) + [s for s, m in zip(slots, mask[r].tolist()) if m]
        keep = torch.tensor(seen)
        k1, v1 = k.index_select(2, keep).contiguous(), v.index_select(2, keep).contiguous()
        alone = tree_attention_rows(q[:, :, r : r + 1], k1, v1, torch.ones(1, 1, dtype=torch.bool), 0.125, isa=isa)
        assert torch.equal(got[:, r], alone[:, 0]), f"row {r} differs from its keys held in order"
    outside = torch.tensor(slots[:-1] + [900])
    with pytest.raises(ValueError, match="rows of k/v"):
        tree_attention_rows(q, k, v, mask, 0.125, isa=isa, slots=outside, prefix=(start, count))
    with pytest.raises(ValueError, match="tree_mask must be"):
        tree_attention_rows(q, k, v, mask[:, :-1], 0.125, isa=isa, slots=torch.tensor(slots), prefix=(start, count))


@EACH_ISA
def test_a_token_that_sees_nothing_gets_zeros_and_a_chunk_size_must_fit_blocks(isa):
    q = torch.randn(1, 2, 2, 16)
    k, v = _kv(1, 2, 16, torch.float32, 0)
    mask = torch.tensor([[True, False], [False, False]])
    out = tree_attention_rows(q, k, v, mask, 0.25, isa=isa)
    assert torch.equal(out[0, 1], torch.zeros(32)) and out[0, 0].abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of 16"):
        tree_attention_rows(q, k, v, mask, 0.25, chunk=40, isa=isa)


@pytest.fixture(params=ISAS)
def forced_isa(request, monkeypatch):
    """The kernel's instruction set forced through the environment (what a whole engine then runs)."""
    if request.param not in cpu_isas():
        pytest.skip(f"no {request.param} kernel on this CPU")
    monkeypatch.setenv(ISA_ENV, request.param)
    kernel_isa.cache_clear()
    yield request.param
    kernel_isa.cache_clear()  # the environment is restored after this


@needs_kernel
def test_the_environment_picks_the_instruction_set(forced_isa, monkeypatch):
    assert kernel_isa() == forced_isa
    for wanted, error in [("sse2", ValueError), *[(isa, RuntimeError) for isa in set(ISAS) - set(cpu_isas())]]:
        monkeypatch.setenv(ISA_ENV, wanted)
        kernel_isa.cache_clear()
        with pytest.raises(error, match=ISA_ENV):
            kernel_isa()
    monkeypatch.delenv(ISA_ENV)
    kernel_isa.cache_clear()
    assert kernel_isa() == cpu_isas()[0]


def test_kv_dtype_names():
    assert narrow_kv_dtype(None) is None and narrow_kv_dtype("float32") is None
    assert narrow_kv_dtype("float16") is torch.float16 and narrow_kv_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="float16"):
        narrow_kv_dtype("int8")


def test_16_bit_kv_is_stored_rounded(tiny_model):
    cache = TreeKVCache(2, capacity=8, dtype=torch.float16)
    k = torch.randn(1, 2, 3, 16)
    keys, _ = cache.layers[0].update(k, k)
    assert keys.dtype == torch.float16 and torch.equal(keys, k.half())
    engine = make_engine(tiny_model, None, None, prefix_cache_bytes=2**20)
    assert engine.kv_dtype is None and engine.prefix_cache.pool.dtype == torch.float32
    engine = kv_engine(tiny_model, "bfloat16")
    assert engine.prefix_cache.pool.dtype == torch.bfloat16


def kv_engine(model, kv_dtype, **kwargs):
    """An engine on ``model`` with ``kv_dtype`` KV (no adaptive lookahead); ``spec``: SpeculationConfig fields."""
    spec = SpeculationConfig(adaptive=False, **kwargs.pop("spec", {}))
    return Engine(model, kwargs.pop("tokenizer", None), speculation=spec, kv_dtype=kv_dtype, **kwargs)


def test_16_bit_kv_needs_the_lean_forward(tiny_model):
    with pytest.raises(ValueError, match="lean CPU forward"):
        kv_engine(tiny_model, "float16", forward=select_forward(tiny_model, fast_cpu=False))


@pytest.fixture(scope="module")
def int8_model(tiny_model):
    """Every linear layer exact Q8_0 blocks: with the block kernel each row's matmul is row-independent."""
    return quantize_model(copy.deepcopy(tiny_model), "int8")


@needs_kernel
@pytest.mark.parametrize("kv", ["float16", "bfloat16", "float32"])
def test_verification_logits_equal_one_token_steps_bit_for_bit(int8_model, kv, forced_isa):
    if not blocks_available():
        pytest.skip("the block kernel (row-independent matmuls) is not built")
    engine = kv_engine(int8_model, kv)
    forward, layers = engine.forward, int8_model.config.num_hidden_layers
    rng = random.Random(0)
    prompt = [rng.randrange(3, 512) for _ in range(300)]
    chain = [rng.randrange(3, 512) for _ in range(8)]
    caches = [TreeKVCache(layers, dtype=engine.kv_dtype) for _ in range(2)]
    for cache in caches:
        forward.prefill(prompt, cache)
    with torch.no_grad(), fast_linears():
        step = forward.verify(torch.tensor(chain), torch.arange(300, 308), ancestor_mask(list(range(-1, 6))),
                              caches[0])
        for i, tok in enumerate(chain):
            one = forward.verify(torch.tensor([tok]), torch.tensor([300 + i]), torch.ones(1, 1, dtype=torch.bool),
                                 caches[1])
            assert torch.equal(one[0], step[i]), f"token {i}: the verification row differs from decoding it alone"


@needs_kernel
@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
@pytest.mark.parametrize("seed", range(2))
def test_greedy_with_16_bit_kv_equals_its_own_plain_decoding(int8_model, default_tokenizer, kv, seed, forced_isa):
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 512) for _ in range(rng.randrange(5, 300))]
    plain = kv_engine(int8_model, kv, tokenizer=default_tokenizer, spec={"prefix_cache_bytes": 0})
    plain.eos_ids = set()
    truth = plain.generate(prompt, max_new_tokens=40, speculate=False).token_ids
    engine = kv_engine(int8_model, kv, tokenizer=default_tokenizer, drafter=ScriptedDrafter(truth, 512, seed=seed),
                            spec={"prefix_cache_bytes": 2**24})
    engine.eos_ids = set()
    result = engine.generate(prompt, max_new_tokens=40)
    assert result.token_ids == truth
    assert result.stats.accepted_tokens > 0
    pool = engine.prefix_cache.pool
    assert pool.dtype == narrow_kv_dtype(kv) and pool.num_used >= len(prompt)  # the request's rows, kept in 16 bits


@needs_kernel
def test_tree_attention_dispatch_runs_the_kernel_on_a_cpu():
    """transformers' forward (models the lean forward does not take) reaches the kernel through
    ``kernels.tree_attention``: the kernel's bits for one sequence of fp32 queries."""
    from agentspec.kernels import dispatch
    from agentspec.kernels.attention import tree_attention_rows

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 5, 64, generator=g)
    k, v = torch.randn(2, 1, 2, 40 + 5, 64, generator=g)
    tree = ancestor_mask([-1, -1, 0, 0])  # 5 nodes: the root, two children, two grandchildren under the first
    got = dispatch.tree_attention(q, k, v, tree, 40)
    alone = tree_attention_rows(q, k, v, tree, 64**-0.5).view(1, 5, 6, 64).transpose(1, 2)
    assert torch.equal(got, alone)
    torch.testing.assert_close(got, masked_attention(q, k, v, tree, 40), atol=1e-5, rtol=1e-5)


def _rotary(t: int, d: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's cos/sin ``[T, D]`` for positions ``start ..``."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.arange(start, start + t).float()[:, None] * inv[None]
    emb = torch.cat((angles, angles), -1)
    return emb.cos(), emb.sin()


@needs_kernel
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("t", [1, 9, 40])  # 40: the threaded loop
@pytest.mark.parametrize("by_slot", [False, True])
def test_rope_store_equals_torchs_rotary_and_cache_write_bit_for_bit(dtype, t, by_slot):
    h, hkv, d, span = 9, 3, 64, 64
    g = torch.Generator().manual_seed(t)
    qkv = torch.randn(1, t, (h + 2 * hkv) * d, generator=g) * 4
    cos, sin = _rotary(t, d, 1000)
    q, k, v = (x.view(1, t, -1, d).transpose(1, 2) for x in qkv.split((h * d, hkv * d, hkv * d), -1))
    c, s = cos[None, None], sin[None, None]
    want_q, want_k = (q * c) + (_rotate_half(q) * s), (k * c) + (_rotate_half(k) * s)
    k_buf, v_buf = torch.zeros(hkv, span, d, dtype=dtype), torch.zeros(hkv, span, d, dtype=dtype)
    rows = torch.randperm(span, generator=g)[:t] if by_slot else None
    got = rope_store(qkv, cos, sin, h, hkv, k_buf, v_buf, rows)
    at = rows if by_slot else torch.arange(t)
    assert torch.equal(got, want_q)
    assert torch.equal(k_buf[:, at], want_k[0].to(dtype)) and torch.equal(v_buf[:, at], v[0].to(dtype))
    untouched = torch.ones(span, dtype=torch.bool)
    untouched[at] = False
    assert not k_buf[:, untouched].any() and not v_buf[:, untouched].any()


@needs_kernel
def test_rope_store_rejects_what_it_cannot_write():
    cos, sin = _rotary(2, 16, 0)
    qkv, k = torch.randn(1, 2, 4 * 16), torch.zeros(1, 8, 16)
    with pytest.raises(ValueError, match="qkv"):
        rope_store(qkv[..., :-1].contiguous(), cos, sin, 2, 1, k, k.clone())
    with pytest.raises(ValueError, match="k and v"):
        rope_store(qkv, cos, sin, 2, 1, k, k.half())
    with pytest.raises(ValueError, match="rows"):
        rope_store(qkv, cos, sin, 2, 1, k, k.clone(), torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="outside"):
        rope_store(qkv, cos, sin, 2, 1, k, k.clone(), torch.tensor([0, 8]))


@needs_kernel
@pytest.mark.parametrize("kv", [None, torch.bfloat16])
def test_the_fused_rotary_step_equals_the_torch_ops_bit_for_bit(int8_model, kv, monkeypatch):
    if not blocks_available():
        pytest.skip("the fused path needs the block kernel's fused q/k/v projection")
    engine = Engine(int8_model, None, speculation=SpeculationConfig(adaptive=False), matmul="int8")
    step, layers = engine.forward.step, int8_model.config.num_hidden_layers
    assert all(w is not None for w in step.qkv)  # q/k/v fused as blocks: the path under test runs
    ids, mask = torch.randint(3, 500, (12,)), ancestor_mask([-1, 0, 1, 0, 3, 3, 5, 6, 7, 8, 9])
    positions = 40 + mask.sum(-1) - 1

    def run() -> tuple[torch.Tensor, TreeKVCache]:
        cache = TreeKVCache(layers, dtype=kv)
        step.prefill(torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(1)), cache)
        return step(ids, positions, mask, cache), cache

    calls = []
    monkeypatch.setattr("agentspec.engine.step_forward.rope_store",
                        lambda *a, **k: calls.append(1) or rope_store(*a, **k))
    with fast_linears("int8"):
        fused, fused_cache = run()
        assert len(calls) == 2 * layers  # the prefill and the step, every layer
        monkeypatch.setattr(LlamaStepForward, "_rope_fits", lambda *a: False)  # torch's rotary ops and cache write
        plain, plain_cache = run()
    assert len(calls) == 2 * layers and torch.equal(fused, plain)
    for a, b in zip(fused_cache.layers, plain_cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@needs_kernel
@pytest.mark.parametrize("n", [576, 100])  # 100: a tail after the 16-wide partial sums
def test_rms_norm_matches_torchs_and_a_row_is_the_same_alone(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(1, 300, n, generator=g) * torch.rand(1, 300, 1, generator=g) * 20
    weight = torch.randn(n, generator=g)
    got = rms_norm(x, weight, 1e-5)
    want = weight * (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)).float()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    assert all(torch.equal(rms_norm(x[:, t:t + 1].contiguous(), weight, 1e-5)[0, 0], got[0, t]) for t in (0, 17, 299))
    with pytest.raises(ValueError, match="contiguous fp32"):
        rms_norm(x, weight[:-1], 1e-5)


@needs_kernel
def test_the_glue_kernels_take_a_step_of_no_tokens_as_torchs_ops_do():
    assert rms_norm(torch.empty(1, 0, 32), torch.ones(32), 1e-5).shape == (1, 0, 32)
    k = torch.zeros(1, 4, 16)
    cos, sin = _rotary(0, 16, 0)
    assert rope_store(torch.empty(1, 0, 4 * 16), cos, sin, 2, 1, k, k.clone()).shape == (1, 2, 0, 16)
    assert not k.any()
