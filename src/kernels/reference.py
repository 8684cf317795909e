"""Torch reference of tree attention for one decode step (the test twin of the Triton kernel).

A verification step feeds T tree tokens to the target model. Their queries attend to

* the committed prefix KV, keys ``0 .. P-1``: every tree token sees all of it, no mask;
* the tree tokens' own KV, keys ``P .. P+T-1``, under the tree mask ``M[i, j]`` (True = node i
  sees node j: itself and its ancestors).

Shapes (GQA: head ``h`` reads kv head ``h // (H // Hkv)``)::

    q: [B, H, T, D]    k, v: [B, Hkv, P+T, D]    tree_mask: [T, T] or [B, T, T] (bool)
    out: [B, H, T, D]  (dtype of q; all maths in fp32)

Two equivalent forms:

* :func:`masked_attention`, one softmax over the concatenated ``P+T`` keys;
* :func:`split_tree_attention` (LongSpec), a softmax over each part, each giving an output ``O`` and
  its log-sum-exp ``L = log sum_j exp(s_j)``, merged by ``w = sigmoid(L_prefix - L_tree)``,
  ``O = w * O_prefix + (1 - w) * O_tree``. Since ``w = e^Lp / (e^Lp + e^Lt)`` this is exactly the
  softmax over the union of keys.

A query row that sees no key at all gets output 0 and LSE ``-inf`` (no NaN).
"""

from __future__ import annotations

import math

import torch

__all__ = ["expand_tree_mask", "masked_attention", "merge_attention", "partial_attention", "split_tree_attention"]


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a ValueError naming the shapes when q/k/v do not fit [B, H, T, D] / [B, Hkv, S, D]."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        shapes = ", ".join(str(tuple(x.shape)) for x in (q, k, v))
        raise ValueError(f"expected 4D q, k, v ([B, H, T, D]); got {shapes}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    (b, h, _, d), (bk, hkv, _, dk) = q.shape, k.shape
    if b != bk or d != dk or h % hkv:
        raise ValueError(
            f"expected q [B, H, T, D] and k/v [B, Hkv, S, D] with Hkv dividing H; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]: each kv head serves n_rep consecutive query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def expand_tree_mask(tree_mask: torch.Tensor, batch: int, prefix_len: int) -> torch.Tensor:
    """Full key mask [B, 1, T, P+T] (bool): all prefix keys visible, the tree part from ``tree_mask``."""
    t = tree_mask.shape[-1]
    tree = tree_mask.to(torch.bool).expand(batch, t, t)
    prefix = torch.ones(batch, t, prefix_len, dtype=torch.bool, device=tree_mask.device)
    return torch.cat([prefix, tree], dim=-1)[:, None]


def partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over one block of keys, returning the output and its log-sum-exp.

    q: [B, H, T, D], k/v: [B, Hkv, S, D], mask: bool broadcastable to [B, H, T, S] (True = attend)
    or None (attend to all). Returns ``O``: [B, H, T, D] fp32 and ``L``: [B, H, T] fp32 with
    ``s = scale * q k^T``, ``L = log sum_j exp(s_j)``, ``O = sum_j exp(s_j - L) v_j``.
    """
    _check_shapes(q, k, v)
    n_rep = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qf, kf, vf = q.float(), _repeat_kv(k.float(), n_rep), _repeat_kv(v.float(), n_rep)
    s = scale * (qf @ kf.transpose(-1, -2))  # [B, H, T, S]
    if mask is not None:
        s = s.masked_fill(~mask.to(torch.bool), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)  # [B, H, T, 1], -inf on rows that see nothing
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)  # exp(-inf) = 0 on masked keys
    denom = p.sum(dim=-1, keepdim=True)  # l = sum_j exp(s_j - m): [B, H, T, 1]
    out = (p @ vf) / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (m + torch.log(denom)).squeeze(-1)  # L = m + log l; log(0) = -inf on empty rows
    return out, lse


def merge_attention(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint key sets (fp32).

    ``w = sigmoid(L_a - L_b)``, ``O = w O_a + (1 - w) O_b``, ``L = logaddexp(L_a, L_b)``.
    When both sides are empty (``L = -inf``) the output is 0 and ``L = -inf``.
    """
    both_empty = torch.isneginf(lse_a) & torch.isneginf(lse_b)
    diff = torch.where(both_empty, torch.zeros_like(lse_a), lse_a - lse_b)  # avoid -inf - -inf = nan
    w = torch.sigmoid(diff)[..., None]  # [B, H, T, 1]
    out = w * o_a + (1.0 - w) * o_b
    return out, torch.logaddexp(lse_a, lse_b)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_mask: torch.Tensor, prefix_len: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Tree attention as one masked softmax over the concatenated [P+T] keys. Returns [B, H, T, D] in q's dtype."""
    _check_tree_args(q, k, tree_mask, prefix_len)
    mask = expand_tree_mask(tree_mask, q.shape[0], prefix_len)  # [B, 1, T, P+T]
    out, _ = partial_attention(q, k, v, mask, scale)
    return out.to(q.dtype)


def split_tree_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_mask: torch.Tensor, prefix_len: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Tree attention as prefix part + tree part merged by their LSE (LongSpec). Returns [B, H, T, D] in q's dtype."""
    _check_tree_args(q, k, tree_mask, prefix_len)
    p, t = prefix_len, q.shape[2]
    tree = tree_mask.to(torch.bool).reshape(-1, 1, t, t)  # [1 or B, 1, T, T]
    o_tree, lse_tree = partial_attention(q, k[:, :, p:], v[:, :, p:], tree, scale)
    if p == 0:
        return o_tree.to(q.dtype)
    o_prefix, lse_prefix = partial_attention(q, k[:, :, :p], v[:, :, :p], None, scale)
    out, _ = merge_attention(o_prefix, lse_prefix, o_tree, lse_tree)
    return out.to(q.dtype)


def _check_tree_args(q: torch.Tensor, k: torch.Tensor, tree_mask: torch.Tensor, prefix_len: int) -> None:
    """Check that k holds exactly P + T keys and the tree mask is [T, T] or [B, T, T]."""
    _check_shapes(q, k, k)
    b, _, t, _ = q.shape
    if prefix_len < 0 or k.shape[2] != prefix_len + t:
        raise ValueError(
            f"expected k/v with prefix_len + T = {prefix_len} + {t} keys; got {k.shape[2]} (k {tuple(k.shape)})"
        )
    if tree_mask.shape not in ((t, t), (b, t, t), (1, t, t)):
        raise ValueError(f"expected tree_mask [T, T] or [B, T, T] with T={t}, B={b}; got {tuple(tree_mask.shape)}")
