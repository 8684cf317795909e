"""Tree attention: split (LSE-merged) reference == masked softmax, Triton (interpreter) == reference,
and the registered transformers attention gives SDPA's logits on a tiny Llama."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from agentspec.kernels import dispatch
from agentspec.kernels.reference import masked_attention, split_tree_attention


def tree_mask_from_parents(parents: list[int]) -> torch.Tensor:
    """[T, T] bool: node i sees itself and its ancestors (parents[i] < i, -1 = root)."""
    t = len(parents)
    mask = torch.zeros(t, t, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] = mask[p]
        mask[i, i] = True
    return mask


def random_parents(t: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, t)]


TREES = {
    "single": [-1],
    "chain": [-1, 0, 1, 2, 3],
    "star": [-1, 0, 0, 0, 0, 0],
    "binary": [-1, 0, 0, 1, 1, 2, 2],
    "forest": [-1, -1, 0, 1, -1, 4],  # several roots (siblings of the committed prefix)
    "random20": random_parents(20, random.Random(1)),
}


def qkv(b: int, h: int, hkv: int, t: int, p: int, d: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, hkv, p + t, d, generator=g)
    v = torch.randn(b, hkv, p + t, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def sdpa_tree(q, k, v, tree_mask, p):
    """Independent check: torch SDPA with the full [T, P+T] bool mask and repeated kv heads."""
    n_rep = q.shape[1] // k.shape[1]
    t = q.shape[2]
    full = torch.cat([torch.ones(*tree_mask.shape[:-1], p, dtype=torch.bool), tree_mask], dim=-1)
    full = full.reshape(-1, 1, t, p + t)
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=full)


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("b,h,hkv,p,d", [(1, 1, 1, 0, 8), (2, 4, 2, 7, 16), (1, 6, 1, 33, 32), (3, 4, 4, 1, 8)])
def test_split_reference_equals_masked_softmax(tree, b, h, hkv, p, d):
    mask = tree_mask_from_parents(TREES[tree])
    q, k, v = qkv(b, h, hkv, len(mask), p, d)
    plain = masked_attention(q, k, v, mask, p)
    split = split_tree_attention(q, k, v, mask, p)
    assert plain.shape == q.shape and split.dtype == q.dtype
    torch.testing.assert_close(split, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, sdpa_tree(q, k, v, mask, p), atol=1e-5, rtol=0)


def test_per_batch_tree_masks():
    rng = random.Random(3)
    masks = torch.stack([tree_mask_from_parents(random_parents(9, rng)) for _ in range(3)])  # [B, T, T]
    q, k, v = qkv(3, 4, 2, 9, 5, 8)
    split = split_tree_attention(q, k, v, masks, 5)
    torch.testing.assert_close(split, masked_attention(q, k, v, masks, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(split, sdpa_tree(q, k, v, masks, 5), atol=1e-5, rtol=0)
    # each batch row really uses its own mask
    assert not torch.allclose(split[0], split_tree_attention(q, k, v, masks[1], 5)[0], atol=1e-3)


def test_tree_mask_changes_the_output():
    q, k, v = qkv(1, 2, 1, 5, 4, 8)
    chain, star = tree_mask_from_parents(TREES["chain"]), tree_mask_from_parents([-1, 0, 0, 0, 0])
    a, b = split_tree_attention(q, k, v, chain, 4), split_tree_attention(q, k, v, star, 4)
    torch.testing.assert_close(a[:, :, :2], b[:, :, :2], atol=1e-6, rtol=0)  # rows 0, 1 see the same keys
    assert (a[:, :, 2:] - b[:, :, 2:]).abs().amax() > 1e-3


def test_rows_that_see_nothing_give_zero_not_nan():
    q, k, v = qkv(1, 2, 1, 3, 4, 8)  # P = 4 prefix keys, then 3 tree keys
    mask = torch.zeros(3, 3, dtype=torch.bool)
    tree_k, tree_v = k[:, :, 4:], v[:, :, 4:]
    assert torch.equal(split_tree_attention(q, tree_k, tree_v, mask, 0), torch.zeros_like(q))
    assert torch.equal(masked_attention(q, tree_k, tree_v, mask, 0), torch.zeros_like(q))
    # with a prefix, an empty tree row is attention over the prefix alone
    prefix_k, prefix_v = k[:, :, :4].expand(-1, 2, -1, -1), v[:, :, :4].expand(-1, 2, -1, -1)  # 1 -> 2 heads
    only_prefix = F.scaled_dot_product_attention(q, prefix_k, prefix_v)
    torch.testing.assert_close(split_tree_attention(q, k, v, mask, 4), only_prefix, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "shapes,mask_shape,p,match",
    [
        (((1, 4, 3, 8), (1, 3, 7, 8)), (3, 3), 4, "Hkv dividing H"),
        (((1, 4, 3, 8), (1, 2, 7, 8)), (3, 3), 5, "prefix_len"),
        (((1, 4, 3, 8), (1, 2, 7, 8)), (2, 2), 4, "tree_mask"),
        (((1, 4, 3), (1, 2, 7, 8)), (3, 3), 4, "4D"),
    ],
)
def test_bad_shapes_raise_with_the_shapes(shapes, mask_shape, p, match):
    q, k = torch.zeros(shapes[0]), torch.zeros(shapes[1])
    with pytest.raises(ValueError, match=match):
        split_tree_attention(q, k, k, torch.ones(mask_shape, dtype=torch.bool), p)


def test_dispatch_on_cpu_is_the_fast_cpu_path():
    from agentspec.kernels.cpu import cpu_tree_attention

    mask = tree_mask_from_parents(TREES["binary"])
    q, k, v = qkv(2, 4, 2, 7, 9, 16)
    assert torch.equal(dispatch.tree_attention(q, k, v, mask, 9), cpu_tree_attention(q, k, v, mask, 9))
    torch.testing.assert_close(cpu_tree_attention(q, k, v, mask, 9), split_tree_attention(q, k, v, mask, 9),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- Triton (interpreter on CPU)


# triton decides interpreter vs compiled when it is first imported (its tl.* library functions are
# jitted then), and importing transformers' models imports triton. So the interpreter cases run in
# a fresh process with TRITON_INTERPRET=1 set from the start; in this process they are skipped.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture(scope="module")
def triton_kernel():
    """agentspec.kernels.triton_tree in triton's interpreter (CPU tensors)."""
    if not INTERPRETING:
        pytest.skip("run by test_triton_kernel_in_interpreter_subprocess (needs TRITON_INTERPRET=1 at start-up)")
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    from agentspec.kernels import triton_tree

    assert triton_tree.INTERPRET
    return triton_tree


@pytest.mark.skipif(INTERPRETING, reason="this process is the interpreter run")
def test_triton_kernel_in_interpreter_subprocess():
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton_interp"]
    run = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


@pytest.mark.parametrize(
    "b,h,hkv,tree,p,d",
    [
        (1, 2, 1, "binary", 5, 8),  # GQA 2:1, head dim padded to 16
        (2, 4, 2, "random20", 19, 16),  # two query blocks, prefix not a multiple of the key block
        (1, 2, 2, "chain", 0, 16),  # no prefix: tree part only
        (1, 3, 1, "forest", 40, 24),  # several key blocks, D not a power of two
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_interp_matches_reference(triton_kernel, b, h, hkv, tree, p, d, dtype):
    mask = tree_mask_from_parents(TREES[tree])
    q, k, v = qkv(b, h, hkv, len(mask), p, d, dtype, seed=p + d)
    got = triton_kernel.triton_tree_attention(q, k, v, mask, p)
    want = split_tree_attention(q, k, v, mask, p)  # fp32 maths on the same (rounded) inputs
    assert got.dtype == dtype and got.shape == q.shape
    atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)


def test_triton_interp_batched_mask_and_empty_rows(triton_kernel):
    rng = random.Random(5)
    masks = torch.stack([tree_mask_from_parents(random_parents(6, rng)) for _ in range(2)])
    masks[1, 3] = False  # a row with no tree key: prefix only
    q, k, v = qkv(2, 2, 1, 6, 3, 16)
    got = triton_kernel.triton_tree_attention(q, k, v, masks, 3)
    torch.testing.assert_close(got, split_tree_attention(q, k, v, masks, 3), atol=1e-5, rtol=0)
    empty = triton_kernel.triton_tree_attention(q, k[:, :, 3:], v[:, :, 3:], torch.zeros(6, 6, dtype=torch.bool), 0)
    assert torch.equal(empty, torch.zeros_like(q))


class _TruthDrafter:
    """Drafts the known continuation with a wrong sibling at every level (a 2-wide tree)."""

    def __init__(self, truth: list[int]):
        self.truth, self.done, self.trees = truth, 0, 0

    def start_request(self, request_id, session_id, prompt_ids):
        self.done = 0

    def propose(self, request_id, budget):
        from agentspec.draft.base import DraftTree

        tree, parent = DraftTree(), -1
        for tok in self.truth[self.done : self.done + min(4, budget // 2)]:
            for t in ((tok + 1) % 512, tok):
                tree.tokens.append(t), tree.parents.append(parent), tree.probs.append(0.5), tree.sources.append(0)
            parent = len(tree) - 1
        self.trees += bool(len(tree))
        return tree

    def accept(self, request_id, tree, accepted, new_tokens):
        self.done += len(new_tokens)

    def stop_request(self, request_id):
        pass

    def add_history(self, session_id, prompt_ids, output_ids, *, to_global=True):
        pass


def test_triton_interp_engine_verifies_through_the_kernel(triton_kernel, tiny_model, default_tokenizer, monkeypatch):
    """The engine's CUDA path (transformers' decoder + agentspec_tree attention -> Triton kernel) on CPU
    tensors in the interpreter: greedy output equal to plain decoding, every tree step through the kernel."""
    from agentspec.kernels import register_attention

    from agentspec.config import SpeculationConfig
    from agentspec.engine import Engine
    from agentspec.engine.forward import HFForward

    model = copy.deepcopy(tiny_model)
    calls = []
    kernel = triton_kernel.triton_tree_attention
    monkeypatch.setattr(triton_kernel, "triton_tree_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setattr(dispatch, "use_triton", lambda q: True)  # as for CUDA tensors
    prompt = list(range(30, 50))
    with torch.no_grad():
        truth = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
    drafter = _TruthDrafter(truth)
    engine = Engine(model, default_tokenizer, drafter=drafter,
                    forward=HFForward(model, model.get_output_embeddings(), register_attention()),
                    speculation=SpeculationConfig(adaptive=False, prefix_cache_bytes=0))
    engine.eos_ids = set()
    result = engine.generate(prompt, max_new_tokens=10)
    assert result.token_ids == truth and result.stats.accepted_tokens > 0
    assert drafter.trees and len(calls) == drafter.trees * model.config.num_hidden_layers


# ---------------------------------------------------------------- transformers integration


def _tree_forward_inputs(parents: list[int], past: int, dtype: torch.dtype, vocab: int, seed: int = 0):
    """ids [1, T], position_ids [1, T] (past + depth) and a float 4D mask [1, 1, T, past + T] (0 / dtype min)."""
    t = len(parents)
    tree = tree_mask_from_parents(parents)
    depth = tree.sum(-1) - 1  # number of ancestors
    allowed = torch.cat([torch.ones(t, past, dtype=torch.bool), tree], dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    ids = torch.randint(3, vocab, (1, t), generator=torch.Generator().manual_seed(seed))
    return ids, (past + depth)[None], mask[None, None]


def _prefill_then_tree(model, prompt, tree_ids, positions, mask, spy=None):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=prompt, cache=cache, use_cache=True).logits
        second = model(input_ids=tree_ids, position_ids=positions, attention_mask=mask,
                       cache=cache, use_cache=True).logits
    return first, second


@pytest.fixture
def tree_model(tiny_model, monkeypatch):
    """A copy of the tiny Llama on attn_implementation="agentspec_tree", counting tree-path calls."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert dispatch.register_attention() == "agentspec_tree"
    assert ALL_ATTENTION_FUNCTIONS["agentspec_tree"] is dispatch.tree_attention_forward
    calls = []
    real = dispatch.tree_attention

    def counting(q, k, v, tree_mask, prefix_len, scale=None):
        calls.append((tuple(q.shape), prefix_len))
        return real(q, k, v, tree_mask, prefix_len, scale)

    monkeypatch.setattr(dispatch, "tree_attention", counting)
    model = copy.deepcopy(tiny_model)
    model.config._attn_implementation = "agentspec_tree"
    return model, calls


@pytest.mark.parametrize("tree", ["chain", "binary", "random20"])
def test_registered_attention_matches_sdpa_logits(tiny_model, tree_model, tree):
    model, calls = tree_model
    parents, past = TREES[tree], 11
    prompt = torch.randint(3, 512, (1, past), generator=torch.Generator().manual_seed(7))
    ids, positions, mask = _tree_forward_inputs(parents, past, torch.float32, 512)
    want = _prefill_then_tree(tiny_model, prompt, ids, positions, mask)
    got = _prefill_then_tree(model, prompt, ids, positions, mask)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)  # causal prefill (no mask given)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)  # tree-masked step
    n_layers = model.config.num_hidden_layers
    # prefill: P = 0 with the causal mask as tree; tree step: P = past with the tree mask
    assert calls == [((1, 4, past, 16), 0)] * n_layers + [((1, 4, len(parents), 16), past)] * n_layers


def test_registered_attention_bool_mask_and_padding_fallback(tiny_model, tree_model):
    model, calls = tree_model
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(2))
    pad = torch.ones(2, 10, dtype=torch.long)
    pad[1, :3] = 0  # left padding in row 1

    def prefill_and_step(m):
        from transformers import DynamicCache

        cache = DynamicCache(config=m.config)
        with torch.no_grad():
            first = m(input_ids=ids[:, :9], attention_mask=pad[:, :9], cache=cache).logits
            step = m(input_ids=ids[:, 9:], attention_mask=pad, cache=cache).logits
        return first, step

    (want_1, want_2), (got_1, got_2) = prefill_and_step(tiny_model), prefill_and_step(model)
    torch.testing.assert_close(got_1[0], want_1[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_1[1, 3:], want_1[1, 3:], atol=1e-5, rtol=0)  # padded rows are don't-care
    torch.testing.assert_close(got_2, want_2, atol=1e-5, rtol=0)
    n_layers = model.config.num_hidden_layers
    # prefill: P = 0, the padded causal mask is the "tree" part; step: padded prefix -> masked-softmax fallback
    assert calls == [((2, 4, 9, 16), 0)] * n_layers
    # a bool 4D tree mask gives the same logits as the float one
    parents, past = TREES["binary"], 0
    tids, positions, fmask = _tree_forward_inputs(parents, past, torch.float32, 512)
    with torch.no_grad():
        a = model(input_ids=tids, position_ids=positions, attention_mask=fmask).logits
        b = model(input_ids=tids, position_ids=positions, attention_mask=fmask == 0).logits
        c = tiny_model(input_ids=tids, position_ids=positions, attention_mask=fmask == 0).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)


def test_dropout_is_refused():
    q, k, v = qkv(1, 2, 1, 3, 2, 8)
    with pytest.raises(ValueError, match="dropout"):
        dispatch.tree_attention_forward(torch.nn.Module(), q, k, v, None, dropout=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernel)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_cuda_matches_reference(dtype):
    pytest.importorskip("triton", reason="triton is not installed")
    assert dispatch.triton_available()
    mask = tree_mask_from_parents(random_parents(70, random.Random(0)))
    q, k, v = (x.cuda() for x in qkv(2, 8, 2, 70, 300, 64, dtype))
    got = dispatch.tree_attention(q, k, v, mask.cuda(), 300)
    want = split_tree_attention(q, k, v, mask.cuda(), 300)
    atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernel)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("b", "h", "hkv", "t", "p", "d"), [
    (1, 9, 3, 1, 3000, 64),  # SmolLM2-135M, one token
    (1, 9, 3, 16, 3000, 64),
    (1, 32, 8, 64, 4097, 128),  # Llama-3-8B heads, a 64-node tree
    (2, 4, 4, 7, 0, 64),  # no prefix
    (1, 4, 1, 130, 77, 80),  # ragged blocks, head dim not a power of two
])
def test_triton_cuda_matches_the_fp64_reference(dtype, b, h, hkv, t, p, d):
    q, k, v = (x.cuda() for x in qkv(b, h, hkv, t, p, d, dtype))
    tree = tree_mask_from_parents(random_parents(t, random.Random(t + p)))
    got = dispatch.tree_attention(q, k, v, tree.cuda(), p)
    want = masked_attention(*(x.double() for x in (q, k, v)), tree.cuda(), p)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernel)")
def test_triton_cuda_row_sees_only_its_ancestors():
    """Changing a key a row does not see leaves that row bit for bit."""
    q, k, v = (x.cuda() for x in qkv(1, 4, 2, 8, 500, 64, torch.float16))
    chain = torch.ones(8, 8, dtype=torch.bool).tril()
    chain[5:, 3:5] = False  # rows 5.. skip nodes 3 and 4
    before = dispatch.tree_attention(q, k, v, chain.cuda(), 500)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 503] += 5.0
    v2[:, :, 504] -= 5.0
    after = dispatch.tree_attention(q, k2, v2, chain.cuda(), 500)
    assert torch.equal(before[:, :, :3], after[:, :, :3]) and torch.equal(before[:, :, 5:], after[:, :, 5:])
    assert not torch.equal(before[:, :, 3:5], after[:, :, 3:5])


@pytest.mark.parametrize("heads,kv_heads,prefix,t", [(9, 3, 50, 7), (4, 4, 0, 5), (8, 2, 33, 1), (6, 3, 128, 16)])
def test_cpu_fast_path_matches_masked_softmax(heads, kv_heads, prefix, t):
    from agentspec.kernels.cpu import cpu_tree_attention
    from agentspec.kernels.reference import masked_attention

    g = torch.Generator().manual_seed(heads * 100 + prefix)
    q = torch.randn(1, heads, t, 16, generator=g)
    k = torch.randn(1, kv_heads, prefix + t, 16, generator=g)
    v = torch.randn(1, kv_heads, prefix + t, 16, generator=g)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, t)]
    mask = torch.zeros(t, t, dtype=torch.bool)
    for i, p in enumerate(parents):
        mask[i] = mask[p] if p >= 0 else mask[i]
        mask[i, i] = True
    expected = masked_attention(q, k, v, mask, prefix)
    torch.testing.assert_close(cpu_tree_attention(q, k, v, mask, prefix), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 20])
def test_skinny_linear_equals_linear_and_is_stock_outside_the_engine(rows):
    from agentspec.engine.cpu_fast import SkinnyLinear, fast_linears

    torch.manual_seed(rows)
    stock = torch.nn.Linear(64, 48)
    skinny = copy.deepcopy(stock)
    skinny.__class__ = SkinnyLinear
    assert skinny.state_dict().keys() == stock.state_dict().keys() and isinstance(skinny, torch.nn.Linear)
    x = torch.randn(1, rows, 64)
    with torch.no_grad():
        want = stock(x)
        assert torch.equal(skinny(x), want)  # outside fast_linears(): the very same computation
        with fast_linears():
            got = skinny(x)
        assert got.shape == want.shape == (1, rows, 48)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(skinny(x), want)  # switched off again after the block


def _gguf_weight(bits: int, n: int, k: int, seed: int) -> torch.Tensor:
    """An fp32 weight made of GGUF blocks, as gguf de-quantizes them: Q4_1 (w = d * q + m, q in
    0..15) or Q8_0 (w = d * q, q in -127..127), d and m fp16, one block per 32 input columns."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.02 + 1e-3).half().float()
    if bits == 8:
        q = torch.randint(-127, 128, (n, k // 32, 32), generator=g).float()
        q[..., 0] = 127  # Q8_0 maps each block's largest |w| to +-127
        return (d * q).reshape(n, k)
    m = (-torch.rand(n, k // 32, 1, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 maps each block's min to 0 and its max to 15
    q[0, 0] = 0  # a constant block (d = 0 in the file)
    return (d * q + m).reshape(n, k)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_blocks_recovers_gguf_blocks_bit_for_bit_and_refuses_other_weights(bits):
    from agentspec.kernels.blockq import pack_blocks

    w = _gguf_weight(bits, 48, 96, seed=0)
    packed = pack_blocks(w)
    assert packed is not None and packed.bits == bits and packed.shape == (48, 96)
    assert torch.equal(packed.dequantize(), w)
    assert packed.nbytes() < w.numel() * w.element_size() / (5 if bits == 4 else 3.5)
    assert pack_blocks(torch.randn(48, 96)) is None  # ordinary fp32 weights are left alone
    assert pack_blocks(w[:, :80]) is None  # not whole blocks
    w[-1, 5] += 1e-3
    assert pack_blocks(w) is None  # exact blocks in the first row (checked first) but not in the last


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 20])
def test_block_kernel_matches_the_fp32_matmul(bits, rows):
    from agentspec.kernels.blockq import block_linear, blocks_available, pack_blocks

    if not blocks_available():
        pytest.skip("compiled block kernel not built, or no AVX2/FMA on this CPU")
    w = _gguf_weight(bits, 40, 128, seed=rows)
    x = torch.randn(1, rows, 128)
    got = block_linear(x, pack_blocks(w))
    assert got.shape == (1, rows, 40)
    torch.testing.assert_close(got, F.linear(x, w), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fp32 CPU input"):
        block_linear(x.double(), pack_blocks(w))


def test_skinny_linear_and_head_use_blocks_inside_the_engine_only():
    from agentspec.kernels.blockq import blocks_available

    from agentspec.engine.cpu_fast import BlockHead, SkinnyLinear, fast_linears, output_head, skinny_linears

    if not blocks_available():
        pytest.skip("compiled block kernel not built, or no AVX2/FMA on this CPU")

    class Model(torch.nn.Module):
        device = torch.device("cpu")

        def __init__(self) -> None:
            super().__init__()
            self.q4 = torch.nn.Linear(64, 32, bias=False)
            self.plain = torch.nn.Linear(64, 32, bias=False)
            self.head = torch.nn.Linear(64, 100, bias=False)
            with torch.no_grad():
                self.q4.weight.copy_(_gguf_weight(4, 32, 64, seed=3))
                self.head.weight.copy_(_gguf_weight(8, 100, 64, seed=4))

        def get_decoder(self):
            return torch.nn.ModuleList([self.q4, self.plain])

        def get_output_embeddings(self):
            return self.head

    model = Model()
    assert skinny_linears(model) == (2, 1)
    assert isinstance(model.q4, SkinnyLinear) and model.q4.blocks.bits == 4 and model.plain.blocks is None
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = F.linear(x, model.q4.weight)
        assert torch.equal(model.q4(x), want)
        with fast_linears():
            torch.testing.assert_close(model.q4(x), want, atol=1e-5, rtol=1e-5)
        head = output_head(model)
        assert isinstance(head, BlockHead) and head.blocks.bits == 8
        for rows in (1, 30):  # the block kernel, then the fallback
            h = torch.randn(rows, 64)
            torch.testing.assert_close(head(h), F.linear(h, model.head.weight), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,dim,prefix,t", [(9, 3, 64, 0, 7), (4, 2, 16, 50, 1), (4, 2, 16, 33, 40)])
def test_folded_and_causal_chunk_attention_match_masked_softmax(heads, kv_heads, dim, prefix, t):
    from agentspec.kernels.cpu import causal_chunk_attention, folded_tree_attention, folded_tree_mask

    g = torch.Generator().manual_seed(prefix + t)
    # q with a strided last dim, as a skinny projection can hand it over: the kernels must not misread it
    q = torch.randn(1, heads, dim, t, generator=g).transpose(2, 3)
    k = torch.randn(1, kv_heads, prefix + t, dim, generator=g)
    v = torch.randn(1, kv_heads, prefix + t, dim, generator=g)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    want = masked_attention(q.contiguous(), k, v, causal, prefix, dim**-0.5)
    torch.testing.assert_close(causal_chunk_attention(q, k, v, prefix, dim**-0.5), want, atol=1e-5, rtol=1e-5)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, t)]
    tree = torch.zeros(t, t, dtype=torch.bool)
    for i, p in enumerate(parents):
        tree[i] = tree[p] if p >= 0 else tree[i]
        tree[i, i] = True
    mask = folded_tree_mask(tree, prefix, heads // kv_heads, torch.float32)
    assert (mask is None) == (t == 1)
    want = masked_attention(q.contiguous(), k, v, tree, prefix, dim**-0.5)
    torch.testing.assert_close(folded_tree_attention(q, k, v, mask, dim**-0.5), want, atol=1e-5, rtol=1e-5)
