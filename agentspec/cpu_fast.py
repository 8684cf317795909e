"""CPU fast paths the engine decides on once, at start (the model's weights are not changed).

* the output projection (``lm_head``, 49152 x 576 for the default model: the largest matrix)
  runs through oneDNN with a pre-packed copy of the weight: for the 1-32 rows of a
  verification step it costs about half of the MKL path transformers uses;
* verification steps use tree attention (``agentspec.kernels``): the committed prefix through
  torch's fused flash kernel with grouped-query heads, no mask and no repeated KV (switched on
  around the engine's own forwards only: the model's config is left as it was).

Both are fp32 and equal to the stock path up to summation order (the greedy fidelity tests
allow a divergence only at near-ties).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)


class PackedLinear(torch.nn.Module):
    """``x @ W^T`` through oneDNN with a pre-packed weight; input ``[..., in]`` (fp32, CPU)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        import warnings

        from torch.utils import mkldnn

        self.out_features = linear.out_features
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script_method inside to_mkldnn
            self.inner = mkldnn.to_mkldnn(torch.nn.Sequential(_plain_linear(linear)))[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.inner(x.reshape(-1, shape[-1]).contiguous()).reshape(*shape[:-1], self.out_features)


def _plain_linear(linear: torch.nn.Linear) -> torch.nn.Linear:
    copy = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        copy.weight.copy_(linear.weight)
        if linear.bias is not None:
            copy.bias.copy_(linear.bias)
    return copy.eval()


def output_head(model) -> torch.nn.Module:
    """The module that turns hidden states into logits: a packed copy where that is faster."""
    head = model.get_output_embeddings()
    usable = (
        isinstance(head, torch.nn.Linear) and head.weight.device.type == "cpu"
        and head.weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
    )
    if not usable:
        return head
    try:
        return PackedLinear(head)
    except (RuntimeError, NotImplementedError) as exc:  # an old CPU without oneDNN support
        logger.warning("oneDNN output head unavailable (%s); using the stock one", exc)
        return head


def tree_attention_name(model) -> str | None:
    """The attention implementation verification steps should use on this model, or None to keep its own.

    CPU models with SDPA get agentspec's tree attention. The model's config is not changed: the
    engine switches to it only around its own verification forwards (see :func:`attention`).
    """
    if model.device.type != "cpu" or model.config._attn_implementation != "sdpa":
        return None
    from agentspec.kernels import register_attention

    return register_attention()


@contextmanager
def attention(model, implementation: str | None):
    """Run ``model`` with ``implementation`` (None: leave it as it is), restoring it afterwards."""
    if implementation is None:
        yield model
        return
    previous = model.config._attn_implementation
    model.config._attn_implementation = implementation
    try:
        yield model
    finally:
        model.config._attn_implementation = previous
