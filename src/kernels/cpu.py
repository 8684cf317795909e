"""Fast CPU tree attention: the prefix through torch's fused flash-attention kernel.

transformers' SDPA path cannot use GQA with a mask, so for a tree step it copies every kv head
``H / Hkv`` times and runs a masked softmax over the whole prefix. Here the prefix needs no
mask, so the ``H / Hkv`` query heads that share a kv head are folded into the query axis::

    q: [B, H, T, D] -> [B, Hkv, (H/Hkv) * T, D]     (no copy of K or V)

and torch's fused CPU kernel returns the output with its log-sum-exp; the tree part (T keys) is
a tiny masked softmax; the two merge by their LSE (LongSpec), in fp32.
"""

from __future__ import annotations

import math

import torch

from .reference import merge_attention, partial_attention

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's fused CPU attention with its log-sum-exp: q [B, N, T, D] over k/v [B, N, S, D] (as many
    heads), additive ``mask`` broadcast to [B, N, T, S] or None; returns (O [B, N, T, D], L [B, N, T])."""
    out, lse = _flash_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)[:2]
    return out, lse


def _folded_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel with grouped-query heads folded into the query axis: q [B, H, T, D] over
    k/v [B, Hkv, S, D], additive ``mask`` [.., (H/Hkv) * T, S] or None: (O [B, H, T, D], L [B, H, T])."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, (h // hkv) * t, d)  # heads h = g * (H/Hkv) + r read kv head g
    out, lse = flash_attention(qg, k, v, mask, scale)
    return out.reshape(b, h, t, d), lse.reshape(b, h, t)


def prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention of q [B, H, T, D] over k/v [B, Hkv, P, D]: (O [B, H, T, D] fp32, L [B, H, T] fp32)."""
    out, lse = _folded_flash(q, k, v, None, scale)
    return out.float(), lse.float()


def cpu_tree_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_mask: torch.Tensor, prefix_len: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Same contract as :func:`agentspec.kernels.reference.split_tree_attention`, faster on CPU."""
    p, t = prefix_len, q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    tree = tree_mask.to(torch.bool).reshape(-1, 1, t, t)
    o_tree, lse_tree = partial_attention(q, k[:, :, p:], v[:, :, p:], tree, scale)
    if p == 0:
        return o_tree.to(q.dtype)
    o_prefix, lse_prefix = prefix_attention(q, k[:, :, :p], v[:, :, :p], scale)
    out, _ = merge_attention(o_prefix, lse_prefix, o_tree, lse_tree)
    return out.to(q.dtype)


def folded_tree_mask(tree_mask: torch.Tensor, prefix_len: int, groups: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask ``[1, 1, groups * T, P + T]`` for :func:`folded_tree_attention`, or None
    when every token sees every key (one token). Build it once per step: it serves every layer."""
    t = tree_mask.shape[-1]
    if t == 1:
        return None
    allowed = torch.ones(t, prefix_len + t, dtype=torch.bool)
    allowed[:, prefix_len:] = tree_mask.to(torch.bool)
    mask = torch.zeros(t, prefix_len + t, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    return mask.repeat(groups, 1)[None, None]


def folded_tree_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Tree attention in one fused-kernel call: q [1, H, T, D] over k/v [1, Hkv, P+T, D] (the
    tree's own KV last) with ``mask`` from :func:`folded_tree_mask`; returns [1, H, T, D].

    The ``H / Hkv`` query heads that share a kv head are folded into the query axis, as in
    :func:`prefix_attention`, so K and V are read once and never repeated; for the few tokens
    of a verification step this costs one call per layer instead of a prefix call, a small
    masked softmax and a merge.
    """
    return _folded_flash(q, k, v, mask, scale)[0]


def causal_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int, scale: float):
    """Prefill attention of a chunk: q [1, H, T, D] at positions P..P+T-1 over k/v [1, Hkv, P+T, D]
    (the chunk's own KV last), causal within the chunk; returns [1, H, T, D].

    The prefix (no mask) goes through the fused kernel with the grouped-query heads folded, the
    chunk's own T x T causal block through it with ``is_causal`` (square, so aligned), and the
    two merge by their log-sum-exp.
    """
    p, groups = prefix_len, q.shape[1] // k.shape[1]
    q = q.contiguous()  # the fused CPU kernel reads wrong values from a q whose last dim is strided
    own_k = k[:, :, p:].repeat_interleave(groups, dim=1)
    own_v = v[:, :, p:].repeat_interleave(groups, dim=1)
    out, lse = flash_attention(q, own_k, own_v, None, scale, causal=True)
    if p == 0:
        return out
    o_prefix, lse_prefix = prefix_attention(q, k[:, :, :p], v[:, :, :p], scale)
    merged, _ = merge_attention(o_prefix, lse_prefix, out.float(), lse.float())
    return merged.to(q.dtype)
