"""GGUF k-quant and Q5_0 blocks in the block kernel (kernels/_blockq.cpp, kernels/blockq.py).

The blocks come from a GGUF file's raw bytes. What must hold bit for bit: every weight the kernel
de-quantizes in registers equals ``gguf.quants.dequantize``'s value (checked through the kernel itself:
an identity input returns the weights, on each instruction set; and on every layer of a real file where
one is present). The fp32 product then differs from ``x @ W^T`` by summation order only, and the int8
mode matches a float64 evaluation of its own arithmetic (per block or half block: dw * dx * the exact
integer dot product) within fp32 rounding, with each row independent of the others in the call.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from agentspec.kernels.blockq import (
    _BLOCK_BYTES,
    BLOCK,
    GGUF_TYPES,
    BlockWeight,
    block_linear,
    blocks_available,
    fp32_isas,
    int8_available,
    pack_gguf,
    unpack_gguf,
)
from test_int8_matmul import EPS32, _tolerance, reference_rounding

from agentspec.config import agentspec_home

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.skipif(not blocks_available(), reason="compiled block kernel not built, or no AVX2/FMA")
needs_int8 = pytest.mark.skipif(not int8_available(), reason="the block kernel is not built or no AVX-512 VNNI")

NEW_TYPES = ["Q4_K", "Q5_0", "Q6_K"]
FP16_AT = {"Q4_1": (0, 2), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}  # d (and m / dmin)
ISA_NAMES = list(fp32_isas())


def random_raw(kind: str, n: int, k: int, seed: int) -> np.ndarray:
    """Raw GGUF blocks of type ``kind`` for an ``[n, k]`` tensor: random bytes, with the fp16 scales replaced by
    finite values (normal ones of both signs, some zeros and fp16 subnormals)."""
    per, nbytes = _BLOCK_BYTES[GGUF_TYPES[kind]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, k // per, nbytes), dtype=np.uint8)
    for at in FP16_AT[kind]:
        scales = rng.standard_normal((n, k // per)) * 0.02
        scales[0, 0], scales[-1, -1] = 0.0, 3e-6  # d = 0 and a subnormal
        raw[..., at : at + 2] = scales.astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(n, -1)


def gguf_weight(raw: np.ndarray, kind: str, k: int) -> torch.Tensor:
    """gguf-py's own de-quantization of ``raw``, as an fp32 ``[N, k]`` tensor."""
    return torch.from_numpy(np.ascontiguousarray(gguf.dequantize(raw, GGUF_TYPES[kind]))).reshape(raw.shape[0], k)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality, with -0.0 and +0.0 taken as one (a sum that starts at +0 returns -0 as +0)."""
    return torch.equal((a + 0.0).view(torch.int32), (b + 0.0).view(torch.int32))


def kernel_weights(blocks: BlockWeight, columns: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """Input columns ``columns`` of the weights as the fp32 kernel de-quantizes them: ``[N, len(columns)]``, read
    through the kernel by multiplying unit rows (one 1.0 per row: each output is a single weight, exactly)."""
    eye = torch.zeros(len(columns), blocks.shape[1])
    eye[torch.arange(len(columns)), columns] = 1.0
    return block_linear(eye, blocks, isa=isa).T


# ---------------------------------------------------------------------------------------------- the weights
@pytest.mark.parametrize("kind", NEW_TYPES + ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("isa", ISA_NAMES)
def test_the_kernel_dequantizes_to_gguf_py_bit_for_bit(kind, isa):
    n, k = 24, 768  # three k-quant super-blocks, 24 blocks of 32 (a group of 16 and pairs in the int8 layout)
    raw = random_raw(kind, n, k, seed=len(kind) + len(isa))
    want = gguf_weight(raw, kind, k)
    blocks = unpack_gguf(raw, GGUF_TYPES[kind], k)
    assert blocks is not None and blocks.shape == (n, k)
    assert torch.equal(blocks.dequantize().view(torch.int32), want.view(torch.int32))  # -0.0 included
    assert same_bits(kernel_weights(blocks, torch.arange(k), isa), want)


def test_packed_sizes_and_what_is_refused():
    n, k = 8, 512
    sizes = {kind: unpack_gguf(random_raw(kind, n, k, 0), GGUF_TYPES[kind], k).nbytes() / (n * k) for kind in NEW_TYPES}
    assert sizes == {"Q4_K": 0.75, "Q5_0": 0.75, "Q6_K": 1.25}  # bytes a weight, against 4 in fp32
    raw = random_raw("Q6_K", n, k, 1)
    weight = gguf_weight(raw, "Q6_K", k)
    assert pack_gguf(raw, GGUF_TYPES["Q6_K"], weight) is not None
    off = weight.clone()
    off[3, 100] = torch.nextafter(off[3, 100], torch.tensor(1e9))  # one weight one ulp away
    assert pack_gguf(raw, GGUF_TYPES["Q6_K"], off) is None
    assert pack_gguf(raw, GGUF_TYPES["Q6_K"], weight[:4]) is None  # another tensor's shape
    assert unpack_gguf(raw, 13, k) is None  # Q5_K: not a layout of the kernel
    assert unpack_gguf(random_raw("Q4_K", n, k, 2), GGUF_TYPES["Q4_K"], 288) is None  # not whole super-blocks


@pytest.mark.parametrize("kind", NEW_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_block_linear_matches_x_at_the_gguf_weights(kind, rows):
    n, k = 40, 1024
    raw = random_raw(kind, n, k, seed=rows)
    weight = gguf_weight(raw, kind, k)
    blocks = unpack_gguf(raw, GGUF_TYPES[kind], k)
    x = torch.randn(1, rows, k, generator=torch.Generator().manual_seed(rows))
    want = x.double() @ weight.double().T
    bound = 8 * k * EPS32 * (x.double().abs() @ weight.double().abs().T)  # fp32 sums of k products
    for isa in ISA_NAMES:
        got = block_linear(x, blocks, isa=isa)
        assert got.shape == (1, rows, n)
        assert torch.all((got.double() - want).abs() <= bound), f"{isa}: off by more than fp32 summation"
    assert torch.equal(block_linear(x, blocks), block_linear(x, blocks, isa=ISA_NAMES[0]))  # the default: the best
    with pytest.raises(ValueError, match="isa"):
        block_linear(x, blocks, isa="sse")


# ---------------------------------------------------------------------------------------------- int8 mode
def reference_terms(x: torch.Tensor, raw: np.ndarray, kind: str, k: int) -> torch.Tensor:
    """The terms of the int8 product in float64 ``[rows, N, terms]``, from gguf-py's weights: per block of 32
    (Q6_K: per 16 values) dw * dx * sum(qw * qx), an exact integer dot; plus dmin * m * s per block for Q4_K
    (s = dx * sum(qx): the min's share, as llama.cpp's Q4_K x Q8_K dot subtracts it). dw, qw and the mins
    are read off gguf-py's de-quantization (each block's values are dw * qw (- dmin * m))."""
    qx, dx, s = reference_rounding(x)
    blocks = unpack_gguf(raw, GGUF_TYPES[kind], k)  # only to name dw, qw and m: the values are checked against gguf
    assert torch.equal(blocks.dequantize(), gguf_weight(raw, kind, k))
    n = blocks.shape[0]
    qx = qx.double().reshape(-1, k // BLOCK, BLOCK)
    if kind == "Q4_K":
        qw = blocks.quants().double()
        dots = torch.einsum("rbi,nbi->rnb", qx, qw)
        terms = dots * blocks.scale.double()[None] * dx.double()[:, None, :]
        return torch.cat((terms, s.double()[:, None, :] * blocks.min.double()[None]), dim=-1)
    per = 16 if kind == "Q6_K" else BLOCK
    qw = blocks.quants().double().reshape(n, -1, per)
    dots = torch.einsum("rbi,nbi->rnb", qx.reshape(qx.shape[0], -1, per), qw)
    scale_x = dx.double().repeat_interleave(BLOCK // per, dim=-1)
    return dots * blocks.scale.double()[None] * scale_x[:, None, :]


@needs_int8
@pytest.mark.parametrize("kind", NEW_TYPES)
@pytest.mark.parametrize("k", [512, 768, 1536])  # 16 blocks, 16 + a pair of blocks, three groups of 16
def test_int8_mode_matches_the_fp64_reference_of_its_arithmetic(kind, k):
    n = 33
    raw = random_raw(kind, n, k, seed=k)
    x = torch.randn(11, k, generator=torch.Generator().manual_seed(k)) * 3
    x[3] = 0
    terms = reference_terms(x, raw, kind, k)
    got = block_linear(x, unpack_gguf(raw, GGUF_TYPES[kind], k), int8=True).double()
    err = (got - terms.sum(-1)).abs()
    assert torch.all(err <= _tolerance(terms)), f"max error {err.max():.3g} over tolerance"
    assert torch.equal(got[3], torch.zeros(n, dtype=torch.float64))


@needs_int8
def test_int8_q6_k_rows_are_independent_of_the_call():
    k = 768
    blocks = unpack_gguf(random_raw("Q6_K", 29, k, 5), GGUF_TYPES["Q6_K"], k)
    x = torch.randn(11, k, generator=torch.Generator().manual_seed(6))
    many = block_linear(x, blocks, int8=True)
    for row in range(11):
        assert torch.equal(block_linear(x[row : row + 1], blocks, int8=True)[0], many[row]), f"row {row}"
    layout = blocks.int8_layout  # 24 blocks: a group of 16 and 4 pairs; 32 + 4 * 16 scales a row
    assert layout.packed.shape == (29, 24 * 32) and layout.scale.shape == (29, 32 + 4 * 16)


# ---------------------------------------------------------------------------------------------- real files
def gguf_files() -> list[Path]:
    """GGUF files to check: ``$AGENTSPEC_GGUF`` and those under the model catalog's folders."""
    files = [Path(p) for p in os.environ.get("AGENTSPEC_GGUF", "").split(os.pathsep) if p]
    folder = agentspec_home() / "models"  # the tests' home links the real home's models folder
    files += sorted(folder.rglob("*.gguf")) if folder.is_dir() else []
    return sorted({f.resolve() for f in files if f.is_file()})


def kquant_files() -> list[Path]:
    from gguf import GGUFReader

    new = {GGUF_TYPES[kind] for kind in NEW_TYPES}
    return [f for f in gguf_files() if any(int(t.tensor_type) in new for t in GGUFReader(f).tensors)]


@pytest.mark.model
def test_every_block_layer_of_a_real_gguf_file_equals_gguf_py():
    """Each of the file's tensors of a type the kernel reads: all weights from the packed blocks, and 8 input
    columns of every output row through the kernel, equal gguf-py's de-quantization bit for bit."""
    from gguf import GGUFReader

    files = kquant_files()
    if not files:
        pytest.skip("no GGUF file with k-quant or Q5_0 tensors: set AGENTSPEC_GGUF=path or pull a Qwen2.5 model "
                    "into $AGENTSPEC_HOME/models")
    for path in files:
        checked = {}
        for tensor in GGUFReader(path).tensors:
            kind = next((name for name, value in GGUF_TYPES.items() if value == int(tensor.tensor_type)), None)
            if kind is None or len(tensor.shape) != 2:
                continue
            k = int(tensor.shape[0])
            want = gguf_weight(tensor.data, kind, k)
            blocks = unpack_gguf(tensor.data, GGUF_TYPES[kind], k)
            assert blocks is not None and torch.equal(blocks.dequantize(), want), f"{path.name}: {tensor.name}"
            columns = torch.linspace(0, k - 1, 8).long()
            assert same_bits(kernel_weights(blocks, columns), want[:, columns]), f"{path.name}: {tensor.name}"
            checked[kind] = checked.get(kind, 0) + 1
        assert set(checked) & set(NEW_TYPES), f"{path.name}: no k-quant tensor checked ({checked})"


@pytest.mark.model
def test_every_linear_layer_of_a_kquant_model_runs_on_blocks():
    """Loaded through agentspec (GGUF -> fp32 -> the raw blocks found again), every decoder linear layer and the
    output head of a k-quant model is on the block kernel, and a step's logits match the stock fp32 forward."""
    from agentspec.engine.cpu_fast import BlockHead, fast_linears, output_head, skinny_linears
    from agentspec.engine.model import load_model

    files = kquant_files()
    if not files:
        pytest.skip("no GGUF file with k-quant or Q5_0 tensors: set AGENTSPEC_GGUF=path or pull a Qwen2.5 model "
                    "into $AGENTSPEC_HOME/models")
    model, tokenizer = load_model(files[0])
    ids = torch.tensor([tokenizer.encode("def fibonacci(n):")])
    with torch.no_grad():
        want = model(ids).logits[0, -1]
    changed, packed = skinny_linears(model)
    assert changed == packed == 7 * model.config.num_hidden_layers
    kinds = {module.blocks.bits for module in model.get_decoder().modules() if getattr(module, "blocks", None)}
    assert {4, 5, 6} <= kinds  # Q4_K, Q5_0 and Q6_K layers among them
    head = output_head(model)
    assert isinstance(head, BlockHead)
    with torch.no_grad(), fast_linears():
        got = head(model.get_decoder()(ids).last_hidden_state[0, -1:])[0]
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
    assert int(got.argmax()) == int(want.argmax())


# ---------------------------------------------------------------------------------------------- the loader
def test_the_loader_finds_each_layers_blocks_in_the_gguf_file(tmp_path):
    """A tiny Llama whose weights are those transformers loads from a GGUF file (q and k rows permuted back):
    the loader attaches each layer's raw blocks and every linear layer and the tied head run on them."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from agentspec.engine.cpu_fast import BlockHead, fast_linears, output_head, skinny_linears
    from agentspec.engine.model import GGUF_LINEARS, attach_gguf_tensors

    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    unpermute = LlamaTensorProcessor(config=config.to_dict())
    writer = gguf.GGUFWriter(tmp_path / "tiny.gguf", "llama")
    kinds = iter(["Q4_K", "Q6_K", "Q5_0", "Q8_0"] * 4)
    weights = {"token_embd.weight": (model.get_input_embeddings(), "Q8_0")}
    for i, layer in enumerate(model.model.layers):
        weights.update({f"blk.{i}.{name}.weight": (layer.get_submodule(attribute), next(kinds))
                        for name, attribute in GGUF_LINEARS.items()})
    for seed, (name, (module, kind)) in enumerate(weights.items()):
        n, k = module.weight.shape
        raw = random_raw(kind, n, k, seed)
        values = gguf.dequantize(raw, GGUF_TYPES[kind]).reshape(n, k)
        values = unpermute.process(weights=values, name=name).weights  # as transformers loads it
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(values)))
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(GGUF_TYPES[kind]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    assert attach_gguf_tensors(model, tmp_path / "tiny.gguf") == 7 * 2 + 1
    assert skinny_linears(model) == (14, 14)
    assert {m.blocks.bits for m in model.model.modules() if getattr(m, "blocks", None) is not None} == {4, 5, 6, 8}
    head = output_head(model)
    assert isinstance(head, BlockHead) and head.blocks.bits == 8
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        want = model(ids).logits[0]
        with fast_linears():
            got = head(model.model(ids).last_hidden_state[0])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    q_proj = model.model.layers[0].self_attn.q_proj  # a weight that is not the file's any more: fp32 path
    with torch.no_grad():
        q_proj.weight[0, 0] += 1.0
    assert skinny_linears(model) == (14, 13) and q_proj.blocks is None
