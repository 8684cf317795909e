"""CPU fast paths the engine decides on once, at start (the model's weights are not changed).

* the output projection (``lm_head``, 49152 x 576 for the default model: the largest matrix)
  runs through oneDNN with a pre-packed copy of the weight: for the 1-32 rows of a
  verification step it costs about half of the MKL path transformers uses (and where its
  weight is exact Q8_0 blocks, as the default model's is, small inputs use the block kernel);
* the decoder's linear layers, inside the engine's own forwards only (:func:`fast_linears`),
  compute inputs of a few rows as ``W @ x^T`` instead of ``x @ W^T``: for 1-7 rows this is
  one skinny GEMM that reads each weight once, where the stock path (a GEMV for one row, a
  small-M GEMM above) costs up to 3x more on this CPU (measured over the default model's 210
  linear layers, 2 threads: 1 row 40 ms -> 18 ms padded to 2, 2-4 rows 55-65 ms -> 18-29 ms);
* where those weights are exactly GGUF blocks (the default model comes from a Q4_1 GGUF file
  and is de-quantized on load; k-quants and Q5_0 are taken from the file's raw blocks, see
  :func:`exact_blocks`), the same layers keep a packed copy and, for fewer than
  :data:`BLOCK_ROWS` rows, run the compiled kernel of :mod:`agentspec.kernels.blockq`: it reads an
  eighth of the bytes and de-quantizes in registers to the very same fp32 weights;
* verification steps use tree attention (``agentspec.kernels``): the committed prefix through
  torch's fused flash kernel with grouped-query heads, no mask and no repeated KV (switched on
  around the engine's own forwards only: the model's config is left as it was).

All are fp32 and equal to the stock path up to summation order (the greedy fidelity tests
allow a divergence only at near-ties).

The *matmul* mode (:data:`MATMULS`, chosen once per forward backend and passed to :func:`fast_linears`)
says how block weights are multiplied: ``"float32"`` as above, or ``"int8"``: each input row rounded
to int8 per block of 32 and integer dot products (AVX-512 VNNI), for inputs of every size, so a
verification step's rows cost less and each equals the one-token step bit for bit. That is a
slightly different model (activations rounded as llama.cpp rounds them): outputs equal plain
decoding in the same mode, not fp32 decoding.
"""

from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from agentspec.kernels import register_attention
from agentspec.kernels.blockq import (
    BlockWeight,
    block_linear,
    blocks_available,
    int8_available,
    pack_blocks,
    pack_gguf,
)

logger = logging.getLogger(__name__)

SKINNY_ROWS = 8  # from this many rows on, the stock x @ W^T is as fast
BLOCK_ROWS = 20  # below this many rows the block kernel beats the fp32 GEMM in the model (3k context, AVX-512)
MATMULS = ("float32", "int8")  # how block weights are multiplied (see the module docstring)


def narrow_matmul(matmul: str) -> str:
    """The matmul mode that will run for ``matmul``: ValueError for an unknown name; ``"int8"`` falls back
    to ``"float32"`` (with a warning saying why) where the kernel is not built or the CPU lacks AVX-512 VNNI."""
    if matmul not in MATMULS:
        raise ValueError(f"matmul must be one of {', '.join(MATMULS)}; got {matmul!r}")
    if matmul == "int8" and not int8_available():
        logger.warning("matmul='int8' needs the compiled block kernel and a CPU with AVX-512 BW and VNNI; "
                       "running the fp32 block kernel instead")
        return "float32"
    return matmul


class PackedLinear(torch.nn.Module):
    """``x @ W^T`` through oneDNN with a pre-packed weight; input ``[..., in]`` (fp32, CPU)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        import warnings

        from torch.utils import mkldnn

        self.out_features = linear.out_features
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script_method inside to_mkldnn
            self.inner = mkldnn.to_mkldnn(torch.nn.Sequential(_plain_linear(linear)))[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.inner(x.reshape(-1, shape[-1]).contiguous()).reshape(*shape[:-1], self.out_features)


def _plain_linear(linear: torch.nn.Linear) -> torch.nn.Linear:
    copy = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        copy.weight.copy_(linear.weight)
        if linear.bias is not None:
            copy.bias.copy_(linear.bias)
    return copy.eval()


def output_head(model) -> torch.nn.Module:
    """The module that turns hidden states into logits: a packed copy where that is faster."""
    head = model.get_output_embeddings()
    usable = (
        isinstance(head, torch.nn.Linear) and head.weight.device.type == "cpu"
        and head.weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
    )
    if not usable:
        return head
    fallback = head
    try:
        fallback = PackedLinear(head)
    except (RuntimeError, NotImplementedError) as exc:  # an old CPU without oneDNN support
        logger.warning("oneDNN output head unavailable (%s); using the stock one", exc)
    blocks = exact_blocks(head) if blocks_available() else None
    return BlockHead(blocks, fallback) if blocks is not None else fallback


class BlockHead(torch.nn.Module):
    """The output head with its weight as GGUF blocks for inputs of fewer than :data:`BLOCK_ROWS`
    rows (a decode or verification step), ``fallback`` for longer ones."""

    def __init__(self, blocks: BlockWeight, fallback: torch.nn.Module) -> None:
        super().__init__()
        self.blocks, self.fallback = blocks, fallback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if blocks_fit(x.reshape(-1, x.shape[-1]).shape[0]):
            return block_matmul(x, self.blocks)
        return self.fallback(x)


def exact_blocks(linear: torch.nn.Module) -> BlockWeight | None:
    """``linear``'s weight as GGUF blocks, or None: from the raw blocks the loader attached
    (``gguf_tensor``, see :func:`agentspec.engine.model.attach_gguf_tensors`; k-quants and Q5_0) where they
    reproduce the weight bit for bit, else recovered from the fp32 values (Q4_1, Q8_0)."""
    raw = getattr(linear, "gguf_tensor", None)
    blocks = pack_gguf(raw.data, raw.qtype, linear.weight) if raw is not None else None
    return blocks if blocks is not None else pack_blocks(linear.weight)


_skinny: contextvars.ContextVar[str | None] = contextvars.ContextVar("agentspec_skinny_linears", default=None)


def blocks_fit(rows: int) -> bool:
    """Whether an input of ``rows`` rows runs on the block kernel: always in int8 mode (every row then has
    the same arithmetic), below :data:`BLOCK_ROWS` rows in fp32 mode."""
    return _skinny.get() == "int8" or rows < BLOCK_ROWS


def block_matmul(x: torch.Tensor, blocks: BlockWeight) -> torch.Tensor:
    """``x @ W^T`` on the block kernel, in the matmul mode of the enclosing :func:`fast_linears`."""
    return block_linear(x, blocks, int8=_skinny.get() == "int8")


class SkinnyLinear(torch.nn.Linear):
    """An ``nn.Linear`` (same weights, same state dict) that, inside :func:`fast_linears`, runs
    inputs of fewer than :data:`SKINNY_ROWS` rows as ``(W @ x^T)^T``; everywhere else it is the
    stock layer, so the model behaves as before outside the engine's own forwards."""

    blocks: BlockWeight | None = None  # the same weights as GGUF blocks, where they are exactly that

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _skinny.get() is None or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if self.blocks is not None and blocks_fit(n):
            out = block_matmul(rows, self.blocks)
        elif n >= SKINNY_ROWS:
            return F.linear(x, self.weight, self.bias)
        else:  # one row is padded to two: a GEMV is slower than a two-column GEMM here
            padded = torch.cat((rows, rows)) if n == 1 else rows
            out = torch.mm(self.weight, padded.t())[:, :n].t().contiguous()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def skinny_linears(model, blocks: bool = True) -> tuple[int, int]:
    """Make the fp32 CPU decoder's ``nn.Linear`` layers :class:`SkinnyLinear` (in place: the
    class changes, the weights and state dict do not); with ``blocks``, those whose weights are
    exactly GGUF blocks (a model loaded from a GGUF file: :func:`exact_blocks`) also keep a packed copy for the
    compiled kernel. Idempotent (a second call re-packs from the current weights). Returns
    (layers changed, layers with a block copy)."""
    if model.device.type != "cpu":
        return 0, 0
    blocks = blocks and blocks_available()
    changed = packed = 0
    for module in model.get_decoder().modules():
        if type(module) in (torch.nn.Linear, SkinnyLinear) and module.weight.dtype == torch.float32:
            module.__class__ = SkinnyLinear
            module.blocks = exact_blocks(module) if blocks else None
            changed += 1
            packed += module.blocks is not None
    if packed:
        logger.info("block kernel for %d of %d linear layers (their weights are exact GGUF blocks)", packed, changed)
    return changed, packed


@contextmanager
def fast_linears(matmul: str = "float32"):
    """Switch :class:`SkinnyLinear` layers to their skinny path for the forwards in this block, block
    weights multiplied in ``matmul`` mode (one of :data:`MATMULS`, already narrowed: see :func:`narrow_matmul`)."""
    token = _skinny.set(matmul)
    try:
        yield
    finally:
        _skinny.reset(token)


def tree_attention_name(model) -> str | None:
    """The attention implementation verification steps should use on this model, or None to keep its own.

    CPU models with SDPA get agentspec's tree attention. The model's config is not changed: the
    engine switches to it only around its own verification forwards (see :func:`attention`).
    """
    if model.device.type != "cpu" or model.config._attn_implementation != "sdpa":
        return None
    return register_attention()


@contextmanager
def attention(model, implementation: str | None):
    """Run ``model`` with ``implementation`` (None: leave it as it is), restoring it afterwards."""
    if implementation is None:
        yield model
        return
    previous = model.config._attn_implementation
    model.config._attn_implementation = implementation
    try:
        yield model
    finally:
        model.config._attn_implementation = previous
