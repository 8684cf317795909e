"""Forward backends: the model's prefill and tree-verification forwards, decided once per engine.

The engine needs two forwards (:class:`ForwardBackend`); which code runs them depends on the
model and the device, and is decided once, at construction (:func:`select_forward`):

* :class:`LeanForward` -- CPU, Llama-family models (Llama, Qwen2, Qwen3): agentspec's own lean decoder forward
  (:mod:`agentspec.engine.step_forward`) with the CPU fast paths (:mod:`agentspec.engine.cpu_fast`);
* :class:`HFForward` -- any other model: transformers' own decoder with a 4D tree mask. With
  ``attention="agentspec_tree"`` tree steps go through :func:`agentspec.kernels.tree_attention`,
  which is the Triton kernel on CUDA and the compiled CPU kernel (or torch's fused one) on a CPU.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

from agentspec.engine.cpu_fast import (
    attention,
    fast_linears,
    narrow_matmul,
    output_head,
    skinny_linears,
    tree_attention_name,
)
from agentspec.engine.kvcache import TreeKVCache
from agentspec.engine.step_forward import LlamaStepForward
from agentspec.engine.verify import tree_mask_4d
from agentspec.kernels import register_attention, triton_available

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 2048  # prompt tokens per prefill forward (bounds attention memory)


class ForwardBackend(Protocol):
    """The two forwards the engine runs. Both write the new tokens' KV into ``cache`` after its
    ``cache.length`` committed positions."""

    name: str  # what runs the forwards, for logs and tests (e.g. "lean-cpu", "hf+triton")
    matmul: str  # how block weights are multiplied ("float32" or "int8", see agentspec.engine.cpu_fast)

    def prefill(self, input_ids: list[int], cache: TreeKVCache) -> torch.Tensor:
        """Causal forward over prompt tokens at positions ``cache.length ..``: fp32 logits ``[V]`` of
        the last one, on the CPU."""

    def verify(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor, cache: TreeKVCache
    ) -> torch.Tensor:
        """Forward over a token tree: ``input_ids``, ``position_ids`` ``[T]``; ``tree_mask`` ``[T, T]``
        bool (True = token i sees token j; every token sees all committed positions). fp32 logits ``[T, V]``,
        on the CPU (where the engine accepts and samples)."""


class LeanForward:
    """:class:`LlamaStepForward` and the packed output head (CPU), block weights multiplied in ``matmul`` mode."""

    name = "lean-cpu"

    def __init__(self, step: LlamaStepForward, head: torch.nn.Module, device: torch.device,
                 matmul: str = "float32") -> None:
        self.step, self.head, self.device, self.matmul = step, head, device, matmul

    def prefill(self, input_ids: list[int], cache: TreeKVCache) -> torch.Tensor:
        with torch.no_grad(), fast_linears(self.matmul):
            for start in range(0, len(input_ids), PREFILL_CHUNK):
                hidden = self.step.prefill(torch.tensor(input_ids[start : start + PREFILL_CHUNK]), cache)
            return self.head(hidden[-1:])[0].float()

    def verify(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor, cache: TreeKVCache
    ) -> torch.Tensor:
        with torch.no_grad(), fast_linears(self.matmul):
            return self.head(self.step(input_ids, position_ids, tree_mask, cache)).float()


class HFForward:
    """transformers' decoder with a 4D tree mask; tree steps run under ``attention`` (an attention
    implementation name, or None to keep the model's own)."""

    def __init__(self, model: Any, head: torch.nn.Module, attention: str | None, matmul: str = "float32") -> None:
        self.model, self.head, self.attention, self.matmul = model, head, attention, matmul
        self.decoder = model.get_decoder()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        triton = model_device(model).type == "cuda" and triton_available()
        self.name = "hf" + (f"+{'triton' if triton else attention}" if attention else "")

    def prefill(self, input_ids: list[int], cache: TreeKVCache) -> torch.Tensor:
        with torch.no_grad(), fast_linears(self.matmul):
            for start in range(0, len(input_ids), PREFILL_CHUNK):
                chunk = input_ids[start : start + PREFILL_CHUNK]
                past = cache.length
                hidden = self.decoder(
                    input_ids=torch.tensor([chunk], device=self.device),
                    position_ids=torch.arange(past, past + len(chunk), device=self.device)[None],
                    cache=cache, use_cache=True,
                ).last_hidden_state
            return self.head(hidden[0, -1:])[0].float().cpu()

    def verify(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor, cache: TreeKVCache
    ) -> torch.Tensor:
        with torch.no_grad(), fast_linears(self.matmul):
            kwargs: dict[str, Any] = {}
            if len(input_ids) > 1:
                kwargs["attention_mask"] = tree_mask_4d(tree_mask, cache.length, self.dtype).to(self.device)
            with attention(self.model, self.attention if kwargs else None):
                out = self.decoder(input_ids=input_ids.to(self.device)[None],
                                   position_ids=position_ids.to(self.device)[None],
                                   cache=cache, use_cache=True, **kwargs)
            # the engine accepts, samples and applies processors on the host: one copy of the logits per step
            return self.head(out.last_hidden_state[0]).float().cpu()


def model_device(model: Any) -> torch.device:
    """The device ``model``'s weights are on (where its forwards run)."""
    return next(model.parameters()).device


def select_forward(model: Any, *, fast_cpu: bool = True, matmul: str = "float32") -> ForwardBackend:
    """The backend for ``model`` on its device, decided once.

    CUDA: transformers' forward with tree steps through the Triton tree-attention kernel (the torch
    reference where triton is missing). CPU: the lean Llama-family forward where it applies, else
    transformers' forward with the CPU tree attention; ``fast_cpu=False`` keeps the stock
    CPU layers and attention (a reference for tests). ``matmul="int8"``: the CPU block weights take
    int8-rounded inputs (see :mod:`agentspec.engine.cpu_fast`; fp32 where the CPU cannot).
    """
    matmul = narrow_matmul(matmul)
    device = model_device(model)
    if device.type == "cuda":
        if not triton_available():
            logger.warning("triton is not importable: tree attention runs the torch reference on CUDA")
        return HFForward(model, model.get_output_embeddings(), register_attention())
    if not fast_cpu:
        return HFForward(model, model.get_output_embeddings(), None)
    skinny_linears(model)
    head = output_head(model)
    name = tree_attention_name(model)
    step = LlamaStepForward.for_model(model) if name is not None else None
    if step is not None:
        return LeanForward(step, head, device, matmul)
    return HFForward(model, head, name, matmul)

