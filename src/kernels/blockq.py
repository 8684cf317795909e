"""Lossless GGUF blocks for CPU decoding: fp32 layers whose weights *are* 4- or 8-bit blocks.

The default model ships as a GGUF file (Q4_1 linear layers, a Q8_0 embedding that is also the
output head) and is de-quantized to fp32 on load. Each such fp32 weight is a block value
(per block of 32 input columns, ``w = d * q + m`` for Q4_1 with q in 0..15, ``w = d * q`` for
Q8_0 with q in -127..127; d and m fp16), so the layer can be stored again in those blocks (an
eighth or a quarter of the bytes) and multiplied by a compiled kernel that de-quantizes in
registers to the very same fp32 values: the same model, only the summation order differs from
an fp32 GEMM.

:func:`pack_blocks` recovers the blocks from an fp32 weight and returns None unless every
value is reproduced bit for bit; :func:`block_linear` multiplies a few rows (decode and
verification steps, where reading the weights is the cost).

``block_linear(x, w, int8=True)`` rounds each row of ``x`` to int8 per block of 32 first (one fp32
scale per block, as llama.cpp's Q8_1) and multiplies with integer dot products (AVX-512 VNNI):
a different, cheaper arithmetic per row (:func:`int8_available`), the same for one row or many.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

BLOCK = 32


@functools.lru_cache(maxsize=1)
def blocks_available() -> bool:
    """True when the compiled kernel is built and this CPU has AVX2 and FMA (or AVX-512)."""
    try:
        from . import _blockq
    except ImportError:
        return False
    return bool(_blockq.avx2_available() or _blockq.avx512_available())


@functools.lru_cache(maxsize=1)
def int8_available() -> bool:
    """True when the compiled kernel is built and this CPU has AVX-512 BW and VNNI (int8 activations)."""
    try:
        from . import _blockq
    except ImportError:
        return False
    return bool(_blockq.int8_available())


@dataclass(frozen=True)
class BlockWeight:
    """A ``[N, K]`` weight as blocks of 32: ``bits`` 4 (Q4_1: packed ``[N, K/32, 16]`` uint8, two
    values per byte) or 8 (Q8_0: ``[N, K/32, 32]`` int8); scale and min ``[N, K/32]`` fp32 (min
    is None for Q8_0)."""

    bits: int
    packed: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * BLOCK

    def nbytes(self) -> int:
        parts = [self.packed, self.scale] + ([self.min] if self.min is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def rows(self, start: int, stop: int) -> BlockWeight:
        """Output rows ``start:stop`` as a view (no copy)."""
        mins = None if self.min is None else self.min[start:stop]
        return BlockWeight(self.bits, self.packed[start:stop], self.scale[start:stop], mins)

    @functools.cached_property
    def int8_layout(self) -> Int8Layout:
        """The blocks re-arranged for the int8 kernel (made on first use, then kept)."""
        return Int8Layout.of(self)

    @functools.cached_property
    def _fp32_call(self) -> tuple:
        """What :func:`block_linear` passes the fp32 kernel for this weight (gathered once, not per call)."""
        from . import _blockq

        return _call_args(_blockq.block_linear, self.bits, self.shape, self)

    @functools.cached_property
    def _int8_call(self) -> tuple:
        """As :attr:`_fp32_call`, for the int8 kernel and :attr:`int8_layout`."""
        from . import _blockq

        return _call_args(_blockq.block_linear_int8, self.bits, self.shape, self.int8_layout)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight ``[N, K]``."""
        if self.bits == 4:
            q = torch.cat((self.packed & 0x0F, self.packed >> 4), dim=-1).float()
            return (q * self.scale[..., None] + self.min[..., None]).reshape(self.shape)
        return (self.packed.float() * self.scale[..., None]).reshape(self.shape)


@dataclass(frozen=True)
class Int8Layout:
    """A :class:`BlockWeight`'s blocks as the int8 kernel reads them (see ``_blockq.cpp``): per output
    row, groups of 16 blocks whose 4-value steps interleave (lane L of a vpdpbusd = block L), then the
    remaining blocks in pairs (padded with a zero block); Q8_0 bytes stored + 128. ``packed``
    ``[N, padded * bytes per block]`` uint8, ``scale`` and ``min`` ``[N, padded]`` fp32, zero in the padding."""

    packed: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor | None

    @classmethod
    def of(cls, weight: BlockWeight) -> Int8Layout:
        n, k = weight.shape
        nb = k // BLOCK
        grouped = nb // 16 * 16
        padded = grouped + (nb - grouped + 1) // 2 * 2
        if weight.bits == 4:
            q = torch.cat((weight.packed & 0x0F, weight.packed >> 4), dim=-1)  # [N, nb, 32] values 0..15
        else:
            q = (weight.packed.view(torch.uint8) ^ 0x80)  # qw + 128
        q = torch.cat((q, q.new_zeros(n, padded - nb, BLOCK)), dim=1)
        groups = q[:, :grouped].reshape(n, -1, 16, 8, 4).transpose(2, 3)  # [N, g, step j, lane L, 4 values]
        if weight.bits == 4:  # lanes 0-7 in the low nibbles, 8-15 in the high ones: 32 bytes a step
            groups = groups[..., :8, :] | (groups[..., 8:, :] << 4)
            pairs = q[:, grouped:, :16] | (q[:, grouped:, 16:] << 4)  # the natural Q4_1 bytes
        else:
            pairs = q[:, grouped:]
        packed = torch.cat((groups.reshape(n, -1), pairs.reshape(n, -1)), dim=1).contiguous()

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat((t, t.new_zeros(n, padded - nb)), dim=1).contiguous()

        return cls(packed, pad(weight.scale), None if weight.min is None else pad(weight.min))


def pack_blocks(weight: torch.Tensor) -> BlockWeight | None:
    """The Q4_1 or Q8_0 blocks of an fp32 ``[N, K]`` weight, or None if it is not exactly made of them.

    Q4_1 stores m = the block's minimum and d = (max - min) / 15, so a block's smallest value is
    m and its largest 15 d + m; Q8_0 stores d = max |w| / 127. d and m are fp16. The recovered
    blocks are then checked value by value, bit for bit.
    """
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % BLOCK:
        return None
    n, k = weight.shape
    blocks = weight.detach().reshape(n, k // BLOCK, BLOCK)
    for pack in (_pack_q4_1, _pack_q8_0):  # the whole weight checked only where its first row fits (seconds a layer)
        if pack(blocks[:1]) is not None and (packed := pack(blocks)) is not None:
            return packed
    return None


def _pack_q4_1(blocks: torch.Tensor) -> BlockWeight | None:
    lo, hi = blocks.amin(dim=-1), blocks.amax(dim=-1)
    scale = ((hi - lo) / 15).half().float()
    q = torch.round((blocks - lo[..., None]) / torch.where(scale > 0, scale, 1.0)[..., None]).clamp_(0, 15)
    q = torch.where(scale[..., None] > 0, q, 0.0)
    if not torch.equal(q * scale[..., None] + lo[..., None], blocks):
        return None
    q = q.to(torch.uint8)
    return BlockWeight(4, (q[..., :16] | (q[..., 16:] << 4)).contiguous(), scale.contiguous(), lo.contiguous())


def q8_0_split(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 rounding of fp32 ``blocks [..., 32]``: (q in -127..127 as fp32, d ``[...]`` an fp16 value).

    d = max |w| / 127 rounded to fp16; the rounding moves d by at most 2^-11, so each block's
    largest |w| still maps to +-127 and d is recovered exactly from ``d * q``."""
    scale = (blocks.abs().amax(dim=-1) / 127).half().float()
    q = torch.round(blocks / torch.where(scale > 0, scale, 1.0)[..., None]).clamp_(-127, 127)
    return q, scale


def _pack_q8_0(blocks: torch.Tensor) -> BlockWeight | None:
    q, scale = q8_0_split(blocks)
    if not torch.equal(q * scale[..., None], blocks):
        return None
    return BlockWeight(8, q.to(torch.int8).contiguous(), scale.contiguous(), None)


def block_linear(x: torch.Tensor, weight: BlockWeight, *, int8: bool = False) -> torch.Tensor:
    """``x @ W^T`` for fp32 CPU ``x [..., K]`` with ``W`` a :class:`BlockWeight` (needs :func:`blocks_available`);
    ``int8``: each row of ``x`` rounded to int8 blocks, integer dot products (needs :func:`int8_available`)."""
    kernel, bits, n, k, packed, scale, mins, _ = weight._int8_call if int8 else weight._fp32_call
    _check_input(x, k)
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
    kernel(bits, x.data_ptr(), x.numel() // k, k, packed, scale, mins, n, out.data_ptr(), torch.get_num_threads())
    return out


def _call_args(kernel, bits: int, shape: tuple[int, int], blocks) -> tuple:
    """``(kernel, bits, N, K, packed, scale, min pointers, blocks)`` for a block kernel call; the last
    item keeps the tensors behind the pointers alive."""
    mins = blocks.min.data_ptr() if blocks.min is not None else 0
    return kernel, bits, shape[0], shape[1], blocks.packed.data_ptr(), blocks.scale.data_ptr(), mins, blocks


def round_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int8 rounding ``block_linear(..., int8=True)`` applies to fp32 CPU rows ``x [..., K]``: q ``[..., K]``
    int8 with, per block of 32, d = max|x| / 127 and q = round-half-even(x * (1 / d)) (fp32 operations), and
    s = d * sum(q); d and s ``[..., K/32]`` fp32 (needs :func:`int8_available`)."""
    from . import _blockq

    k = x.shape[-1]
    rows = _rows(x, k)
    q = torch.empty(rows.shape, dtype=torch.int8)
    d, s = (torch.empty(rows.shape[0], k // BLOCK) for _ in range(2))
    _blockq.quantize_q8(rows.data_ptr(), rows.shape[0], k, q.data_ptr(), d.data_ptr(), s.data_ptr())
    return q.reshape(x.shape), d.reshape(*x.shape[:-1], -1), s.reshape(*x.shape[:-1], -1)


def _check_input(x: torch.Tensor, k: int) -> None:
    """ValueError unless ``x`` is an fp32 CPU ``[..., k]`` (``k`` a multiple of the block)."""
    if x.dtype != torch.float32 or x.shape[-1] != k or x.device.type != "cpu" or k % BLOCK:
        raise ValueError(f"expected an fp32 CPU input [..., {k}] (a multiple of {BLOCK}); got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x [..., k]`` as contiguous fp32 rows ``[rows, k]``, or ValueError."""
    _check_input(x, k)
    return x.reshape(-1, k).contiguous()


def concat_blocks(weights: list[BlockWeight | None]) -> tuple[BlockWeight, list[BlockWeight]] | None:
    """One weight whose output rows are those of ``weights`` in order (e.g. q, k and v projections
    run as one call) and, for each part, a view of its rows in it (use those instead of the parts,
    so the blocks are held once); None unless all are blocks of the same kind and width. Exact:
    each output row is computed from its own blocks only."""
    if not weights or any(w is None for w in weights):
        return None
    first = weights[0]
    if any(w.bits != first.bits or w.shape[1] != first.shape[1] for w in weights):
        return None
    mins = None if first.min is None else torch.cat([w.min for w in weights])
    fused = BlockWeight(first.bits, torch.cat([w.packed for w in weights]), torch.cat([w.scale for w in weights]), mins)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + w.shape[0])
    return fused, [fused.rows(a, b) for a, b in zip(bounds, bounds[1:])]
