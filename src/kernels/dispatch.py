"""Pick the tree-attention backend, and plug it into transformers as ``attn_implementation="agentspec_tree"``.

* :func:`tree_attention` runs the Triton kernel on CUDA tensors when triton imports; on a CPU the
  compiled kernel (:mod:`agentspec.kernels.attention`) where it fits, else torch's fused kernel;
  else the torch reference (:func:`~agentspec.kernels.reference.split_tree_attention`).
* :func:`tree_attention_forward` has the signature of a transformers attention function; it reads
  the engine's 4D mask ``[B, 1, T, P+T]``, checks that the first ``P = S - T`` key columns (the
  committed prefix) are all visible, and runs :func:`tree_attention` with the last ``T`` columns as
  the tree mask. Any other mask (padding, per-head masks) goes through the masked-softmax reference.
* :func:`register_attention` registers it (idempotent)::

      from agentspec.kernels import register_attention
      register_attention()
      model.config._attn_implementation = "agentspec_tree"
"""

from __future__ import annotations

import functools

import torch

from .attention import heads_first, kernel_fits, tree_attention_rows
from .cpu import cpu_tree_attention
from .reference import partial_attention, split_tree_attention

__all__ = ["ATTN_NAME", "register_attention", "tree_attention", "tree_attention_forward", "triton_available",
           "use_triton"]

ATTN_NAME = "agentspec_tree"
MAX_TREE_QUERIES = 256  # longer query blocks (prefill chunks) go to transformers' SDPA


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the Triton kernel module imports (triton installed and importable)."""
    try:
        from . import triton_tree as _  # noqa: F401  (imports triton)
    except Exception:  # ImportError, or a broken triton install
        return False
    return True


def use_triton(q: torch.Tensor) -> bool:
    """Whether :func:`tree_attention` runs the Triton kernel for ``q``: CUDA tensors, triton importable."""
    return q.is_cuda and triton_available()


def tree_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_mask: torch.Tensor, prefix_len: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Tree attention for one decode step, on the best backend for the tensors' device.

    q: [B, H, T, D], k/v: [B, Hkv, P+T, D] (prefix KV then the tree tokens' KV), tree_mask: [T, T]
    or [B, T, T] bool (True = node i sees node j), prefix_len = P. Returns [B, H, T, D] in q's dtype.
    """
    if use_triton(q):
        from .triton_tree import triton_tree_attention

        return triton_tree_attention(q, k, v, tree_mask, prefix_len, scale)
    if kernel_fits(q, k) and v.dtype == k.dtype and v.stride() == k.stride():
        t, d = q.shape[2:]
        scale = d**-0.5 if scale is None else scale
        return heads_first(tree_attention_rows(q, k, v, tree_mask.reshape(t, t), scale), q)
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16):
        return cpu_tree_attention(q, k, v, tree_mask, prefix_len, scale)
    return split_tree_attention(q, k, v, tree_mask, prefix_len, scale)


def _bool_mask(attention_mask: torch.Tensor | None, t: int, s: int, causal: bool, device: torch.device) -> torch.Tensor:
    """The attention mask as bool [B or 1, H or 1, T, S] (True = attend).

    None means causal with the T queries at the end of the S keys (or all keys when not causal);
    a float mask is additive (0 = attend, dtype min or -inf = masked), as transformers builds them.
    """
    if attention_mask is None:
        if not causal:
            return torch.ones(1, 1, t, s, dtype=torch.bool, device=device)
        # query i sits at key position s - t + i and sees keys j <= s - t + i
        rows = torch.arange(t, device=device)[:, None] + (s - t)
        return (torch.arange(s, device=device)[None, :] <= rows)[None, None]
    if attention_mask.dim() != 4:
        raise ValueError(f"expected a 4D attention mask [B, 1, T, S]; got shape {tuple(attention_mask.shape)}")
    mask = attention_mask[..., :s]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask


def tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: query [B, H, T, D], key/value [B, Hkv, S, D] -> ([B, T, H, D], None)."""
    if dropout:
        raise ValueError(f"{ATTN_NAME} attention is for inference; got dropout={dropout} (use model.eval())")
    t, s = query.shape[2], key.shape[2]
    if t > MAX_TREE_QUERIES:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    mask = _bool_mask(attention_mask, t, s, getattr(module, "is_causal", True), query.device)
    p = s - t  # committed prefix length when the last T keys are the queries' own
    if p >= 0 and mask.shape[1] == 1 and bool(mask[..., :p].all()):
        out = tree_attention(query, key, value, mask[:, 0, :, p:], p, scaling)
    else:  # padding or per-head masks: one masked softmax over all S keys
        out = partial_attention(query, key, value, mask, scaling)[0].to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def register_attention(name: str = ATTN_NAME) -> str:
    """Register :func:`tree_attention_forward` with transformers under ``name`` (default "agentspec_tree").

    Also registers SDPA's mask builder under the same name, so a model called with a 2D or no
    attention mask still gets the usual causal/padding mask. Returns ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, tree_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
