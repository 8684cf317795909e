"""Triton tree attention for one decode step: prefix part + tree part, merged by log-sum-exp (LongSpec).

Same contract as :func:`agentspec.kernels.reference.split_tree_attention`::

    q: [B, H, T, D]   k, v: [B, Hkv, P+T, D]   tree_mask: [T, T] or [B, T, T] (bool, True = attend)
    out: [B, H, T, D] in q's dtype; fp32 accumulation; bf16 / fp16 / fp32 inputs; GQA (h -> h // (H/Hkv))

One program per (query block, batch * head). It runs two online-softmax passes over the keys of
its kv head: the prefix keys ``0 .. P-1`` without a mask, giving ``(O_p, L_p)``, then the tree
keys ``P .. P+T-1`` under the tree mask, giving ``(O_t, L_t)``; and merges them in fp32:
``w = sigmoid(L_p - L_t)``, ``O = w O_p + (1 - w) O_t``. Rows that see no key give 0.

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
def _attend(q, k_base, v_base, m_base, start, stop, offs_m, offs_n, offs_d, T, D, stride_ks, stride_vs,
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
        seen = n_ok[None, :] & (offs_m[:, None] < T)
        if USE_MASK:  # tree mask M[i, j], j = key - start
            tm = tl.load(m_base + offs_m[:, None] * stride_mi + (keys - start)[None, :] * stride_mj,
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
def _tree_attention_fwd(
    Q, K, V, M, Out,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mi, stride_mj, stride_ob, stride_oh, stride_ot,
    H, T, P, D, n_rep, scale,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    hk = h // n_rep  # GQA: kv head of query head h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows (tree nodes)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_base = M + b * stride_mb
    # (a) committed prefix, keys 0..P-1, no mask
    o_p, l_p = _attend(q, k_base, v_base, m_base, 0, P, offs_m, offs_n, offs_d, T, D, stride_ks, stride_vs,
                       stride_mi, stride_mj, scale, False, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
    # (b) tree tokens, keys P..P+T-1, tree mask
    o_t, l_t = _attend(q, k_base, v_base, m_base, P, P + T, offs_m, offs_n, offs_d, T, D, stride_ks, stride_vs,
                       stride_mi, stride_mj, scale, True, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
    # merge: w = sigmoid(L_p - L_t) = e^Lp / (e^Lp + e^Lt); both empty -> w = 1/2 of two zeros
    empty = (l_p == float("-inf")) & (l_t == float("-inf"))
    w = tl.sigmoid(tl.where(empty, 0.0, l_p) - tl.where(empty, 0.0, l_t))[:, None]
    out = w * o_p + (1.0 - w) * o_t
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=q_mask)


def triton_tree_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_mask: torch.Tensor, prefix_len: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Tree attention with the Triton kernel. Shapes as in the module docstring; returns [B, H, T, D]."""
    _check_tree_args(q, k, tree_mask, prefix_len)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"expected q, k, v all fp32, fp16 or bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, t, d = q.shape
    # the kernel indexes the head dim with stride 1
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    mask = tree_mask.to(device=q.device, dtype=torch.uint8).reshape(-1, t, t).contiguous()  # [1 or B, T, T]
    stride_mb = mask.stride(0) if mask.shape[0] > 1 else 0
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # tl.dot needs blocks >= 16; small blocks keep the interpreter fast
    block_m = 16 if INTERPRET else max(16, min(64, 1 << (t - 1).bit_length()))
    block_n = 16 if INTERPRET else 64
    block_d = max(16, 1 << (d - 1).bit_length())
    grid = ((t + block_m - 1) // block_m, b * h)
    _tree_attention_fwd[grid](
        q, k, v, mask, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), stride_mb, mask.stride(1), mask.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        h, t, prefix_len, d, h // k.shape[1], scale,
        UPCAST=INTERPRET or q.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out
