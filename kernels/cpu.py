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


def prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention of q [B, H, T, D] over k/v [B, Hkv, P, D]: (O [B, H, T, D] fp32, L [B, H, T] fp32)."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, (h // hkv) * t, d)  # heads h = g * (H/Hkv) + r read kv head g
    out, lse = _flash_cpu(qg, k, v, 0.0, False, attn_mask=None, scale=scale)[:2]
    return out.reshape(b, h, t, d).float(), lse.reshape(b, h, t).float()


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
