"""Quantized targets for CPU: int8 weights, GGUF Q8_0 style, with fp32 activations.

``quantize_model(model, "int8")`` rounds every linear layer's weight to Q8_0 blocks (per block
of 32 input columns, ``w = d * q`` with q in -127..127 and d an fp16 scale) and stores the
de-quantized values back in fp32. That *is* the quantized model: plain HF decoding of it uses
those weights, and the engine's fast path (:mod:`agentspec.engine.cpu_fast`) recognises them as exact
blocks and reads them as int8 in its compiled kernel. Activations stay fp32, so speculative
decoding of the quantized model is identical to plain decoding of it, with the same near-tie
rule as fp32.

Why not torch's dynamic quantization (int8 activations too): there a token's activations are
scaled with the whole call's, so a token verified inside a tree is computed differently from
the same token decoded alone, and requantizing every layer turns even summation-order
differences into different roundings. Measured on 6 tau-bench calls: 0 of 6 outputs (per-tensor
activation scales) and 1 of 6 (per-token scales, int32 accumulation) equal to plain decoding of
the same int8 model.

The default model already runs on its own 4-bit blocks (it ships as Q4_1), so int8 makes it
neither faster nor smaller; it is for models that come in fp32 or bf16.
"""

from __future__ import annotations

import torch

from agentspec.kernels.blockq import BLOCK, q8_0_split

SUPPORTED = ("int8",)


def q8_0_round(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[N, K]`` rounded to Q8_0 block values (fp32). ``K`` must be a multiple of 32."""
    n, k = weight.shape
    q, scale = q8_0_split(weight.detach().float().reshape(n, k // BLOCK, BLOCK))
    return (q * scale[..., None]).reshape(n, k)


def quantize_model(model: torch.nn.Module, scheme: str) -> torch.nn.Module:
    """Round ``model``'s linear weights to Q8_0 blocks in place (``scheme='int8'``); returns ``model``.

    Layers whose input width is not a multiple of 32 stay as they are.
    """
    if scheme not in SUPPORTED:
        raise ValueError(f"unknown quantization {scheme!r}; expected one of {SUPPORTED}")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 quantization runs on the CPU only")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.in_features % BLOCK == 0:
                module.weight.copy_(q8_0_round(module.weight).to(module.weight.dtype))
    return model
