"""Triton tree attention for one decode step: the prefix split across programs, the tree part, merged by log-sum-exp.

Same contract as :func:`agentspec.kernels.reference.split_tree_attention`::

    q: [B, H, T, D]   k, v: [B, Hkv, P+T, D]   tree_mask: [T, T] or [B, T, T] (bool, True = attend)
    out: [B, H, T, D] in q's dtype; fp32 accumulation; bf16 / fp16 / fp32 inputs; GQA (h -> h // (H/Hkv))

A step has few query rows (T tree tokens times the H/Hkv query heads of a kv head) and a long
prefix, so the work is spread over the keys, as flash-decoding does: each program takes one kv head,
all of its query rows (the grouped heads folded into rows, so each key is read once for all of them)
and one slice of the committed prefix ``0 .. P-1``, and runs an online softmax over it without a
mask, giving a partial ``(O_s, L_s)``. One more program per kv head runs the tree keys
``P .. P+T-1`` under the tree mask. A second kernel merges the partials in fp32:
``O = sum_s e^(L_s - L) O_s`` with ``L = logsumexp_s L_s``. Rows that see no key give 0.

This module imports triton at the top: import it lazily (``agentspec.kernels.dispatch`` does, only
when it uses it). triton picks compiled or interpreted kernels when it is first imported in the
process (its ``tl`` library functions are jitted then), so ``TRITON_INTERPRET=1`` must be set before
anything imports triton (importing transformers' models does); the kernel then runs on CPU tensors
(slow; for tests). ``INTERPRET`` records the mode.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import _check_tree_args

__all__ = ["INTERPRET", "triton_tree_attention"]

INTERPRET: bool = bool(triton.knobs.runtime.interpret)


@triton.jit
def _attend(q, k_base, v_base, m_base, start, stop, row_ok, mask_row, offs_n, offs_d, D, stride_ks, stride_vs,
            stride_mi, stride_mj, scale, USE_MASK: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online softmax of q [BLOCK_M, BLOCK_D] over keys start..stop-1 -> (O [BLOCK_M, BLOCK_D], L [BLOCK_M]) fp32."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp(s - m_i) v
    d_ok = offs_d < D
    for n0 in range(start, stop, BLOCK_N):
        keys = n0 + offs_n  # [BLOCK_N] absolute key positions
        n_ok = keys < stop
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + keys[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:  # fp32 dots (the interpreter's bf16 tl.dot is wrong)
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_M, BLOCK_N] fp32
        seen = n_ok[None, :] & row_ok[:, None]
        if USE_MASK:  # tree mask M[i, j], i = the row's tree node, j = key - start
            tm = tl.load(m_base + mask_row[:, None] * stride_mi + (keys - start)[None, :] * stride_mj,
                         mask=seen, other=0)
            seen = seen & (tm != 0)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        alpha = tl.exp(m_i - m_safe)  # rescales the old sums; 0 when m_i = -inf
        p = tl.exp(s - m_safe[:, None])  # 0 on unseen keys
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    seen_any = l_i > 0
    out = acc / tl.where(seen_any, l_i, 1.0)[:, None]
    lse = tl.where(seen_any, m_i + tl.log(tl.where(seen_any, l_i, 1.0)), float("-inf"))  # L = m + log l
    return out, lse


@triton.jit
def _partial_fwd(
    Q, K, V, M, Opart, Lpart,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mi, stride_mj, stride_ob, stride_os, stride_or, stride_lb, stride_ls,
    Hkv, T, P, D, n_rep, scale, keys_per_split, n_splits,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (row block, key slice, batch x kv head): slices 0..n_splits-1 cut the prefix, slice n_splits is the tree."""
    pid_r, pid_s, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hk = pid_bh // Hkv, pid_bh % Hkv
    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)  # folded rows: r = (query head - hk * n_rep) * T + tree node
    row_ok = rows < n_rep * T
    head, node = hk * n_rep + rows // T, rows % T
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + node[:, None] * stride_qt + offs_d[None, :],
                mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_base = M + b * stride_mb
    if pid_s < n_splits:  # a slice of the committed prefix, no mask
        start = pid_s * keys_per_split
        o, lse = _attend(q, k_base, v_base, m_base, start, tl.minimum(start + keys_per_split, P), row_ok, node,
                         offs_n, offs_d, D, stride_ks, stride_vs, stride_mi, stride_mj, scale, False, UPCAST,
                         BLOCK_M, BLOCK_N, BLOCK_D)
    else:  # the tree tokens, under the tree mask
        o, lse = _attend(q, k_base, v_base, m_base, P, P + T, row_ok, node, offs_n, offs_d, D, stride_ks, stride_vs,
                         stride_mi, stride_mj, scale, True, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
    base = pid_bh * stride_ob + pid_s * stride_os
    tl.store(Opart + base + rows[:, None] * stride_or + offs_d[None, :], o, mask=q_mask)
    tl.store(Lpart + pid_bh * stride_lb + pid_s * stride_ls + rows, lse, mask=row_ok)


@triton.jit
def _merge_fwd(
    Opart, Lpart, Out, stride_ob, stride_os, stride_or, stride_lb, stride_ls, stride_xb, stride_xh, stride_xt,
    Hkv, T, D, n_rep, n_parts, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Out rows of one (row block, batch x kv head) = the log-sum-exp weighted mean of its n_parts partials."""
    pid_r, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // Hkv, pid_bh % Hkv
    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rep * T
    offs_d = tl.arange(0, BLOCK_D)
    o_mask = row_ok[:, None] & (offs_d[None, :] < D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(n_parts):
        lse = tl.load(Lpart + pid_bh * stride_lb + s * stride_ls + rows, mask=row_ok, other=float("-inf"))
        o = tl.load(Opart + pid_bh * stride_ob + s * stride_os + rows[:, None] * stride_or + offs_d[None, :],
                    mask=o_mask, other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, w = tl.exp(m_i - m_safe), tl.exp(lse - m_safe)  # 0 for empty partials
        acc = acc * alpha[:, None] + w[:, None] * o
        l_i = l_i * alpha + w
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    head, node = hk * n_rep + rows // T, rows % T
    tl.store(Out + b * stride_xb + head[:, None] * stride_xh + node[:, None] * stride_xt + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=o_mask)


def _num_splits(prefix_len: int, programs: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """``(slices, keys per slice)`` for the prefix: enough programs to fill the device twice over,
    each slice at least four key blocks long."""
    if prefix_len == 0:
        return 0, block_n
    if INTERPRET:  # small slices, so that the tests exercise the merge
        target = max(1, -(-prefix_len // block_n))
    else:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    wanted = max(1, target // max(programs, 1))
    keys = max(4 * block_n if not INTERPRET else block_n, -(-prefix_len // wanted))
    keys = -(-keys // block_n) * block_n  # whole key blocks
    return -(-prefix_len // keys), keys


def triton_tree_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_mask: torch.Tensor, prefix_len: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Tree attention with the Triton kernels. Shapes as in the module docstring; returns [B, H, T, D]."""
    _check_tree_args(q, k, tree_mask, prefix_len)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"expected q, k, v all fp32, fp16 or bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, t, d = q.shape
    hkv = k.shape[1]
    n_rep = h // hkv
    # the kernels index the head dim with stride 1
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    mask = tree_mask.to(device=q.device, dtype=torch.uint8).reshape(-1, t, t).contiguous()  # [1 or B, T, T]
    stride_mb = mask.stride(0) if mask.shape[0] > 1 else 0
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    rows = n_rep * t
    # tl.dot needs blocks >= 16; small blocks keep the interpreter fast
    block_m = 16 if INTERPRET else max(16, min(64, 1 << (rows - 1).bit_length()))
    block_n = 16 if INTERPRET else 64
    block_d = max(16, 1 << (d - 1).bit_length())
    row_blocks = (rows + block_m - 1) // block_m
    splits, keys_per_split = _num_splits(prefix_len, b * hkv * row_blocks, block_n, q.device)
    parts = splits + 1  # the prefix slices and the tree
    o_part = torch.empty(b * hkv, parts, rows, d, device=q.device, dtype=torch.float32)
    l_part = torch.empty(b * hkv, parts, rows, device=q.device, dtype=torch.float32)
    upcast = INTERPRET or q.dtype == torch.float32
    _partial_fwd[(row_blocks, parts, b * hkv)](
        q, k, v, mask, o_part, l_part,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), stride_mb, mask.stride(1), mask.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), l_part.stride(0), l_part.stride(1),
        hkv, t, prefix_len, d, n_rep, scale, keys_per_split, splits,
        UPCAST=upcast, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    _merge_fwd[(row_blocks, b * hkv)](
        o_part, l_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2), l_part.stride(0),
        l_part.stride(1), out.stride(0), out.stride(1), out.stride(2), hkv, t, d, n_rep, parts,
        BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return out
