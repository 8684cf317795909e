"""Lossless GGUF blocks for CPU decoding: fp32 layers whose weights *are* GGUF blocks.

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

The k-quants and Q5_0 of other GGUF files are read from the file's raw blocks instead
(:func:`unpack_gguf`, :func:`pack_gguf`) into the same three layouts: Q4_K as Q4_1 (per 32
values ``w = a * q - b`` with ``a = d * sc`` and ``b = dmin * m`` exact fp32 products of the
fp16 and 6-bit scales), Q5_0 in its own (the file's 5-bit quants; Q8_0's layout for int8 inputs) and
Q6_K in its own (q in -32..31 as int8, ``a = d * sc`` per 16 values). Each value equals
``gguf.quants.dequantize``'s bit for bit.

``block_linear(x, w, int8=True)`` rounds each row of ``x`` to int8 per block of 32 first (one fp32
scale per block, as llama.cpp's Q8_1) and multiplies with integer dot products (AVX-512 VNNI):
a different, cheaper arithmetic per row (:func:`int8_available`), the same for one row or many.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32
SUPER_BLOCK = 256  # values per k-quant block
# GGML tensor types read from raw GGUF blocks (gguf.GGMLQuantizationType's values), and the bytes of one block
GGUF_TYPES = {"Q4_1": 3, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
_BLOCK_BYTES = {3: (BLOCK, 20), 6: (BLOCK, 22), 8: (BLOCK, 34), 12: (SUPER_BLOCK, 144), 14: (SUPER_BLOCK, 210)}
ISAS = {"avx512": 2, "avx2": 1, "scalar": 0}  # the fp32 kernel's code paths (block_linear's isa=)


@functools.lru_cache(maxsize=1)
def blocks_available() -> bool:
    """True when the compiled kernel is built and this CPU has AVX2 and FMA (or AVX-512)."""
    try:
        from . import _blockq
    except ImportError:
        return False
    return bool(_blockq.avx2_available() or _blockq.avx512_available())


@functools.lru_cache(maxsize=1)
def fp32_isas() -> tuple[str, ...]:
    """The fp32 kernel's code paths this CPU can run (names of :data:`ISAS`), best first; none without the kernel."""
    try:
        from . import _blockq
    except ImportError:
        return ()
    usable = {"avx512": _blockq.avx512_available(), "avx2": _blockq.avx2_available(), "scalar": True}
    return tuple(name for name in ISAS if usable[name])


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
    """A ``[N, K]`` weight as blocks of 32: ``bits`` 4 (Q4_1, Q4_K: packed ``[N, K/32, 16]`` uint8, two
    values per byte, ``w = scale * q + min``), 8 (Q8_0: ``[N, K/32, 32]`` int8, ``w = scale * q``),
    5 (Q5_0: ``[N, K/32, 20]`` uint8, the file's 32 high bits then 16 bytes of low nibbles, q in -16..15)
    or 6 (Q6_K: ``[N, K/32, 32]`` int8, one scale per 16 values); scale ``[N, K/32]`` fp32 (``[N, K/16]``
    for 6), min ``[N, K/32]`` fp32 for 4, else None."""

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

        bits = 8 if self.bits == 5 else self.bits  # Q5_0's int8 layout is Q8_0's
        return _call_args(_blockq.block_linear_int8, bits, self.shape, self.int8_layout)

    def quants(self) -> torch.Tensor:
        """The integer quants ``[N, K/32, 32]`` (uint8 0..15 for bits 4, else int8)."""
        if self.bits == 4:
            return _nibbles(self.packed)
        if self.bits == 5:
            n, nb = self.packed.shape[:2]
            high = (self.packed[..., :4, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # bit i of byte i // 8
            return (_nibbles(self.packed[..., 4:]) | (high.reshape(n, nb, BLOCK) << 4)).to(torch.int8) - 16
        return self.packed

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight ``[N, K]``."""
        if self.bits == 5:
            return (self.quants().float() * self.scale[..., None]).reshape(self.shape)
        if self.bits == 4:
            q = torch.cat((self.packed & 0x0F, self.packed >> 4), dim=-1).float()
            return (q * self.scale[..., None] + self.min[..., None]).reshape(self.shape)
        if self.bits == 6:
            n = self.shape[0]
            return (self.packed.float().reshape(n, -1, 16) * self.scale[..., None]).reshape(self.shape)
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
            q = weight.quants()  # [N, nb, 32] values 0..15
        else:
            q = (weight.quants().view(torch.uint8) ^ 0x80)  # qw + 128 (Q8_0, Q5_0, Q6_K)
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

        if weight.bits == 6:  # per group: 16 first-half scales, then 16 second-half ones; per pair: each lane's
            halves = torch.cat((weight.scale.reshape(n, nb, 2), weight.scale.new_zeros(n, padded - nb, 2)), dim=1)
            groups = halves[:, :grouped].reshape(n, -1, 16, 2).transpose(2, 3)  # [N, g, half, 16 blocks]
            pairs = halves[:, grouped:].reshape(n, -1, 2, 2)  # [N, p, block, half]
            pairs = pairs.repeat_interleave(4, dim=-1)  # lanes 0-3 block 0's first half, 4-7 its second, ...
            scale = torch.cat((groups.reshape(n, -1), pairs.reshape(n, -1)), dim=1).contiguous()
            return cls(packed, scale, None)
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


def block_linear(x: torch.Tensor, weight: BlockWeight, *, int8: bool = False, isa: str | None = None) -> torch.Tensor:
    """``x @ W^T`` for fp32 CPU ``x [..., K]`` with ``W`` a :class:`BlockWeight` (needs :func:`blocks_available`);
    ``int8``: each row of ``x`` rounded to int8 blocks, integer dot products (needs :func:`int8_available`);
    ``isa``: the fp32 kernel's code path (one of :data:`ISAS`; default the best this CPU has)."""
    kernel, bits, n, k, packed, scale, mins, _ = weight._int8_call if int8 else weight._fp32_call
    _check_input(x, k)
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty((*x.shape[:-1], n), dtype=torch.float32)
    args = (bits, x.data_ptr(), x.numel() // k, k, packed, scale, mins, n, out.data_ptr(), torch.get_num_threads())
    if isa is None:
        kernel(*args)
    elif int8 or isa not in ISAS:
        raise ValueError(f"isa is one of {', '.join(ISAS)}, for the fp32 kernel only; got {isa!r}")
    else:
        kernel(*args, ISAS[isa])
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


def unpack_gguf(raw, qtype: int, k: int) -> BlockWeight | None:
    """The blocks of a GGUF tensor ``[N, K]`` from its raw bytes (``GGUFReader``'s ``tensor.data``: uint8
    ``[N, K / values per block * bytes per block]``, numpy or torch) of GGML type ``qtype`` (a value of
    :data:`GGUF_TYPES`), or None for another type or a width that is not whole blocks. Each value of
    ``.dequantize()`` then equals ``gguf.quants.dequantize(raw, qtype)``'s bit for bit."""
    if qtype not in _BLOCK_BYTES or k % _BLOCK_BYTES[qtype][0]:
        return None
    per, nbytes = _BLOCK_BYTES[qtype]
    if isinstance(raw, np.ndarray) and not raw.flags.writeable:  # a memory-mapped file: torch wants its own bytes
        raw = raw.copy()
    raw = torch.as_tensor(raw).view(torch.uint8)
    blocks = raw.reshape(raw.shape[0], k // per, nbytes)
    if blocks.shape[0] * k // per * nbytes != raw.numel():
        return None
    return {3: _q4_1, 6: _q5_0, 8: _q8_0, 12: _q4_k, 14: _q6_k}[qtype](blocks)


def pack_gguf(raw, qtype: int, weight: torch.Tensor) -> BlockWeight | None:
    """:func:`unpack_gguf` of a GGUF tensor, kept only if it reproduces the fp32 ``weight [N, K]`` (the same
    tensor as the model loaded it) bit for bit; else None."""
    if weight.dim() != 2 or weight.dtype != torch.float32:
        return None
    blocks = unpack_gguf(raw, qtype, weight.shape[1])
    if blocks is None or blocks.shape != tuple(weight.shape) or not torch.equal(blocks.dequantize(), weight.detach()):
        return None
    return blocks


def _fp16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte ``start`` of each block, as fp32 ``[N, blocks]`` (exact)."""
    return blocks[..., start : start + 2].contiguous().view(torch.float16)[..., 0].float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """GGUF's 16 bytes of a 32-value block -> values ``[..., 32]``: low nibbles 0..15, high ones 16..31."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _q4_1(blocks: torch.Tensor) -> BlockWeight:
    return BlockWeight(4, blocks[..., 4:].contiguous(), _fp16(blocks, 0), _fp16(blocks, 2))


def _q8_0(blocks: torch.Tensor) -> BlockWeight:
    return BlockWeight(8, blocks[..., 2:].contiguous().view(torch.int8), _fp16(blocks, 0), None)


def _q5_0(blocks: torch.Tensor) -> BlockWeight:
    """Q5_0: d fp16, 32 high bits (little-endian), 16 bytes of low nibbles; q = (low | high << 4) - 16."""
    return BlockWeight(5, blocks[..., 2:].contiguous(), _fp16(blocks, 0), None)


def _q4_k(blocks: torch.Tensor) -> BlockWeight:
    """Q4_K: d, dmin fp16, 12 bytes of eight 6-bit scales and mins, 128 bytes of quants (32 bytes hold two
    sub-blocks: low nibbles, then high ones); w = (d * sc) * q - dmin * m, as Q4_1 with min = -(dmin * m)."""
    n, sb = blocks.shape[:2]
    d, dmin = _fp16(blocks, 0), _fp16(blocks, 2)
    scales = blocks[..., 4:16].reshape(n, sb, 3, 4)
    low, mid, top = scales[..., 0, :], scales[..., 1, :], scales[..., 2, :]  # gguf's Q4_K.get_scale_min
    sc = torch.cat((low & 0x3F, (top & 0x0F) | ((low >> 2) & 0x30)), dim=-1).float()
    mins = torch.cat((mid & 0x3F, (top >> 4) | ((mid >> 2) & 0x30)), dim=-1).float()
    qs = blocks[..., 16:].reshape(n, sb, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(2, 1)
    q = (qs & 0x0F).reshape(n, sb * 8, BLOCK)  # sub-block 2j: low nibbles of bytes 32j.., 2j + 1: high ones
    packed = q[..., :16] | (q[..., 16:] << 4)  # the Q4_1 layout
    scale = (d[..., None] * sc).reshape(n, -1)
    return BlockWeight(4, packed.contiguous(), scale, -(dmin[..., None] * mins).reshape(n, -1))


def _q6_k(blocks: torch.Tensor) -> BlockWeight:
    """Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, d fp16; w = (d * sc) * q, q in
    -32..31, one scale per 16 values (the arrangement of gguf's Q6_K.dequantize_blocks)."""
    n, sb = blocks.shape[:2]
    low = blocks[..., :128].reshape(n, sb, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(2, 1)
    high = blocks[..., 128:192].reshape(n, sb, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(4, 1)
    q = ((low & 0x0F).reshape(n, sb, 8, 32) | ((high & 0x03).reshape(n, sb, 8, 32) << 4)).to(torch.int8) - 32
    scale = _fp16(blocks, 208)[..., None] * blocks[..., 192:208].contiguous().view(torch.int8).float()
    return BlockWeight(6, q.reshape(n, sb * 8, BLOCK).contiguous(), scale.reshape(n, -1).contiguous(), None)
