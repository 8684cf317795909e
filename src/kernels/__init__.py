"""Tree attention for verification steps: a torch reference and a Triton kernel (LongSpec).

``tree_attention(q, k, v, tree_mask, prefix_len)`` picks the backend (Triton on CUDA, else torch);
``register_attention()`` makes it available to transformers as ``attn_implementation="agentspec_tree"``.
The Triton module (``agentspec.kernels.triton_tree``) is imported only when it is used.
"""

from .dispatch import ATTN_NAME, register_attention, tree_attention, tree_attention_forward, triton_available
from .reference import masked_attention, split_tree_attention

__all__ = [
    "ATTN_NAME", "masked_attention", "register_attention", "split_tree_attention", "tree_attention",
    "tree_attention_forward", "triton_available",
]
