"""Compiled CPU tree attention over fp32, fp16 or bf16 KV (``agentspec.kernels._attn``, optional).

One call per layer attends ``T`` query tokens (a verification step's tree, or a causal prefill
chunk) over the committed prefix (no mask) and the step's own keys (under a ``[T, T]`` mask), with
grouped-query heads sharing their kv head's reads: each K/V row is read once per step for all
query rows. The keys may also be read by slot from a pool of rows (a search's leaves, each over its
own path: see :func:`tree_attention_rows`). fp16 KV is widened to fp32 in registers and the arithmetic is fp32.

The kernel runs with AVX-512F or, on CPUs without it (AMD Zen 2/3, most Intel client CPUs), with
AVX2 + FMA + F16C: :func:`kernel_isa` picks the best this CPU has, or the one the environment
variable ``AGENTSPEC_CPU_ISA`` (one of :data:`ISAS`, read once) names. The two perform the same
fp32 operations in the same order and give the same bits (the tests check it on CPUs that have
both), so outputs do not depend on which one ran.

bf16 KV on a CPU with AVX512-BF16 (``avx512bf16``: AMD Zen 4/5, Intel Cooper Lake, Sapphire Rapids
and later; head dims 32, 64, 128) runs attention in bf16, as GPUs do: the query and the softmax
weights are rounded to bf16 and multiplied with ``vdpbf16ps`` (two products per fp32 lane, fp32
sums), about half the multiply work per key and query row. That is a different rounding from the
fp32 arithmetic the other instruction sets run on bf16 KV (``AGENTSPEC_CPU_ISA=avx512`` keeps it),
so outputs differ between such CPUs, while on each a verification step still equals plain decoding.

A row's result depends only on the keys it sees (fixed chunks and blocks along that sequence,
per-row accumulators): a row computed inside a step of ``T`` tokens is bit-identical to the same
token computed alone once its ancestors are committed, so speculative decoding equals plain
decoding through this kernel, whatever the tree or the thread count.

The extension also holds the lean forward's per-layer glue around attention, one call each instead
of a dozen torch ops: :func:`rope_store` (rotary embedding of q and k and the KV write) and
:func:`rms_norm`.
"""

from __future__ import annotations

import functools
import os

import torch

CHUNK = 256  # keys per partial softmax; the folding order depends on it, never on T or the threads
KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
HEAD_DIMS = (16, 32, 64, 128)
ISAS = ("avx512bf16", "avx512", "avx2")  # the kernel's instruction sets, best first
ISA_ENV = "AGENTSPEC_CPU_ISA"


@functools.cache
def cpu_isas() -> tuple[str, ...]:
    """The instruction sets of :data:`ISAS` the kernel can run with here, best first (empty when the
    extension is not built)."""
    try:
        from . import _attn  # optional compiled extension
    except ImportError:
        return ()
    return tuple(_attn.cpu_isas())


@functools.cache
def kernel_isa() -> str | None:
    """The instruction set the kernel runs with: ``$AGENTSPEC_CPU_ISA`` when set (read once; an error
    if this CPU lacks it), else the best this CPU has; None when the kernel cannot run here."""
    wanted = os.environ.get(ISA_ENV)
    if not wanted:
        return next(iter(cpu_isas()), None)
    if wanted not in ISAS:
        raise ValueError(f"{ISA_ENV}={wanted!r}: expected one of {', '.join(ISAS)}")
    if wanted not in cpu_isas():
        raise RuntimeError(f"{ISA_ENV}={wanted}, but the attention kernel can run only with "
                           f"{', '.join(cpu_isas()) or 'nothing'} here")
    return wanted


def attention_available() -> bool:
    """True when the compiled kernel is built and this CPU has AVX-512F or AVX2 + FMA + F16C."""
    return kernel_isa() is not None


def bf16_dot_products(kv_dtype: torch.dtype | None) -> bool:
    """True when the kernel multiplies KV of ``kv_dtype`` in bf16 here (bf16 KV, ``avx512bf16``)."""
    return kv_dtype == torch.bfloat16 and kernel_isa() == "avx512bf16"


def narrow_kv_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The 16-bit KV dtype ``name`` asks for (``"float16"``, ``"bfloat16"`` or a dtype), or None for
    ``"float32"`` / None (KV kept as the model computes it); ValueError for anything else."""
    dtype = KV_DTYPES.get(name, name) if isinstance(name, str) else name
    if dtype is not None and dtype not in _KINDS:
        raise ValueError(f"unsupported KV dtype {name!r}; expected one of {', '.join(KV_DTYPES)}")
    return None if dtype in (None, torch.float32) else dtype


def kernel_fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True when :func:`tree_attention_rows` can run on these q ``[1, H, T, D]`` / k ``[1, Hkv, S, D]``."""
    return (attention_available() and q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[0] == 1
            and q.shape[-1] in HEAD_DIMS and k.dtype in _KINDS and k.stride(-1) == 1 and k.stride(-2) == k.shape[-1])


def tree_attention_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_mask: torch.Tensor, scale: float, *,
    chunk: int = CHUNK, threads: int | None = None, isa: str | None = None,
    slots: torch.Tensor | None = None, prefix: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Attention of q ``[1, H, T, D]`` (fp32) over k/v ``[1, Hkv, P + T, D]`` (the step's own keys
    last; rows contiguous, as a :class:`~agentspec.engine.kvcache.TreeKVCache` view holds them):
    every token sees the ``P`` prefix keys and the step's keys ``tree_mask [T, T]`` (bool) allows.
    Returns ``[1, T, H * D]`` fp32 (what the output projection reads). Needs :func:`kernel_fits`.
    ``isa``: one of :func:`cpu_isas` (default :func:`kernel_isa`).

    With ``slots`` (int64 ``[U]``), k/v ``[1, Hkv, S, D]`` is a pool of rows: every token sees the
    prefix rows ``prefix = (first, count)`` and those of the rows ``slots`` that ``tree_mask [T, U]``
    allows, in the order of ``slots`` (a search's leaves, each over its own path).
    """
    from . import _attn  # optional compiled extension

    _, h, t, d = q.shape
    hkv, span = k.shape[1], k.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if v.dtype != k.dtype or v.stride() != k.stride():
        raise ValueError("k and v must share dtype and layout")
    start, p = prefix
    if slots is None:
        start, p, u, slot_ptr = 0, span - t, t, 0
    else:
        slots = slots.to(torch.int64).contiguous()
        u, slot_ptr = slots.numel(), slots.data_ptr()
        if start < 0 or p < 0 or start + p > span or (u and not 0 <= int(slots.min()) <= int(slots.max()) < span):
            raise ValueError(f"prefix {prefix} and slots must lie in the {span} rows of k/v")
    if tuple(tree_mask.shape) != (t, u):
        raise ValueError(f"tree_mask must be [{t}, {u}], got {list(tree_mask.shape)}")
    mask = tree_mask if tree_mask.dtype == torch.uint8 and tree_mask.is_contiguous() else \
        tree_mask.to(torch.uint8).contiguous()
    out = torch.empty(1, t, h * d, dtype=torch.float32)
    _attn.tree_attention(q.data_ptr(), q.stride(1), q.stride(2), k.data_ptr(), v.data_ptr(), k.stride(1),
                         _KINDS[k.dtype], h, hkv, t, d, p, mask.data_ptr(), scale, out.data_ptr(), chunk,
                         threads or torch.get_num_threads(), isa or kernel_isa(), start, u, slot_ptr)
    return out


def heads_first(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """:func:`tree_attention_rows`' ``[1, T, H * D]`` as a ``[1, H, T, D]`` view, the layout of ``q`` (no copy)."""
    _, h, t, d = q.shape
    return out.view(1, t, h, d).transpose(1, 2)


def rope_store(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, k: torch.Tensor,
    v: torch.Tensor, rows: torch.Tensor | None = None, *, threads: int | None = None,
) -> torch.Tensor:
    """One step's rotary embedding and KV write in one call: the rotated queries ``[1, H, T, D]``
    (a view of a new ``[T, H, D]`` tensor, the layout :func:`tree_attention_rows` reads).

    ``qkv``: ``[1, T, (H + 2 Hkv) D]`` fp32, contiguous (the fused q/k/v projection's output);
    ``cos``/``sin``: ``[T, D]`` fp32, contiguous (the model's rotary embedding of the positions). The
    rotated keys and the values go to rows ``rows`` (int64 ``[T]``; default ``0..T-1``) of ``k``/``v``
    ``[Hkv, S, D]`` (rows contiguous; fp32, or fp16 / bf16 rounded to nearest even). Bit-identical
    to torch's ``(x * cos) + (rotate_half(x) * sin)`` followed by a copy into the cache. Needs
    :func:`attention_available`; called once per layer, so it checks only what the kernel cannot.
    """
    from . import _attn  # optional compiled extension

    t, d = cos.shape
    if (qkv.dtype != torch.float32 or qkv.shape[-1] != (heads + 2 * kv_heads) * d or qkv.numel() != t * qkv.shape[-1]
            or not qkv.is_contiguous() or cos.dtype != torch.float32 or sin.shape != cos.shape
            or not (cos.is_contiguous() and sin.is_contiguous())):
        raise ValueError("qkv must be contiguous fp32 [1, T, (H + 2 Hkv) D] and cos/sin contiguous fp32 [T, D]")
    if k.dtype not in _KINDS or v.dtype != k.dtype or v.stride() != k.stride() or k.stride(-1) != 1 \
            or k.stride(-2) != d or k.shape[-3] != kv_heads or k.shape[-1] != d:
        raise ValueError("k and v must be [Hkv, S, D] buffers of one dtype and layout, rows contiguous")
    if rows is not None and (rows.dtype != torch.int64 or rows.numel() != t or not rows.is_contiguous()):
        raise ValueError(f"rows must be {t} contiguous int64 row indices")
    q = torch.empty(t, heads, d, dtype=torch.float32)
    _attn.rope_store(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                     k.stride(-3), _KINDS[k.dtype], heads, kv_heads, t, d, 0 if rows is None else rows.data_ptr(),
                     k.shape[-2], threads or torch.get_num_threads())
    return q.view(1, t, heads, d).transpose(1, 2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in one call: ``weight * (x * rsqrt(mean(x^2) + eps))``, fp32,
    contiguous; needs :func:`attention_available`. Each row depends on that row alone; its mean of
    squares is summed in a fixed order of its own (not torch's), so the result may differ from
    torch's ops in the last bit, as any other summation order would."""
    from . import _attn  # optional compiled extension

    n = x.shape[-1]
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.numel() != n
            or not (x.is_contiguous() and weight.is_contiguous())):
        raise ValueError("x [..., N] and weight [N] must be contiguous fp32")
    out = torch.empty_like(x)
    _attn.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps)
    return out
