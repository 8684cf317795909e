"""A lean forward for verification steps and prefill of Llama-family models on a CPU.

It covers the Llama family as transformers defines it, wherever the layers are the same shape
(:data:`LEAN_ARCHITECTURES`): Llama (optional q/k/v/o and MLP biases), Qwen2 (q/k/v biases, rope theta
1e6) and Qwen3 (an RMSNorm on each head of q and k before the rotation), all with full attention in every
layer. Left out: Gemma 3 (scaled embeddings, a GeLU MLP, four norms a layer, and sliding-window layers
between the global ones, which the tree KV cache does not window) and any model whose config turns
sliding windows on; those run transformers' own forward.

A verification step runs 1 to ~64 tokens through the decoder. At that size transformers'
per-call machinery (mask construction, cache bookkeeping, output capture, keyword plumbing
through 30 layers) costs as much as a fifth of the step on a CPU. :class:`LlamaStepForward`
runs the same modules and arithmetic as ``LlamaModel.forward`` (RMSNorm, rotary embedding,
grouped-query attention, SiLU MLP, residuals); where the compiled kernels are built, the rotation of
q and k with the KV write is one call a layer (bit-identical to torch's ops) and so is each RMSNorm
(its own summation order, row by row). Attention (CPU): a step is one
call per layer of the compiled tree-attention kernel (:mod:`agentspec.kernels.attention`: each
KV row read once for all the step's query rows, fp32/fp16/bf16 KV, each row bit-identical to
the same token decoded alone); without it, one call of torch's fused kernel over prefix and tree
with an additive tree mask built once per step (:func:`agentspec.kernels.cpu.folded_tree_attention`).
A prefill chunk of up to :data:`KERNEL_PREFILL_ROWS` tokens goes through the same kernel (causal
mask); a longer one is the prefix and the chunk's causal block in two fused calls merged by
log-sum-exp (:func:`agentspec.kernels.cpu.causal_chunk_attention`), never a repeated or masked
prefix. 16-bit KV is stored rounded; torch's kernels read it widened to fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from agentspec.engine.cpu_fast import block_matmul, blocks_fit
from agentspec.engine.kvcache import TreeKVCache
from agentspec.kernels.attention import (
    attention_available,
    heads_first,
    kernel_fits,
    rms_norm,
    rope_store,
    tree_attention_rows,
)
from agentspec.kernels.blockq import BlockWeight, concat_blocks
from agentspec.kernels.cpu import causal_chunk_attention, folded_tree_attention, folded_tree_mask

# model_type -> what the lean forward runs of it; anything else keeps transformers' forward
LEAN_ARCHITECTURES = ("llama", "qwen2", "qwen3")

# prefill chunks of up to this many tokens attend through the compiled kernel (faster there: 512 tokens
# after 1,500, 1 thread, 22 vs 26 ms a layer); longer ones through torch's fused kernel (2,048 tokens: 64 vs 89 ms)
KERNEL_PREFILL_ROWS = 512


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """``LlamaRMSNorm.forward``: in fp32 on a CPU one kernel call
    (:func:`~agentspec.kernels.attention.rms_norm`, its own summation order), else op for op."""
    dtype = x.dtype
    if (dtype == torch.float32 and norm.weight.dtype == torch.float32 and x.device.type == "cpu"
            and x.is_contiguous() and attention_available()):
        return rms_norm(x, norm.weight, norm.variance_epsilon)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _no_lap(part: str) -> None:
    """A :meth:`LlamaStepForward._run` lap that times nothing."""


def _project(linear: torch.nn.Module, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """``linear(x)``; straight on the block kernel where the layer's weight is blocks and the rows fit it
    (what :class:`~agentspec.engine.cpu_fast.SkinnyLinear` would do, without its per-call dispatch)."""
    blocks = getattr(linear, "blocks", None)
    if not (fused and blocks is not None):
        return linear(x)
    out = block_matmul(x, blocks)
    return out if linear.bias is None else out + linear.bias


def _fused_bias(projections) -> torch.Tensor | None:
    """The projections' biases side by side (zeros for one without), or None when none has a bias."""
    if all(p.bias is None for p in projections):
        return None
    return torch.cat([p.bias.detach() if p.bias is not None else p.weight.new_zeros(p.out_features)
                      for p in projections])


def _head_norm(x: torch.Tensor, norm: torch.nn.Module | None, head_dim: int) -> torch.Tensor:
    """Qwen3's per-head RMSNorm of q or k: ``x [1, T, heads * D]`` normed over each head's D values."""
    if norm is None:
        return x
    return _rms_norm(x.reshape(-1, head_dim), norm).view(x.shape)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _fuse(projections) -> BlockWeight | None:
    """The projections' blocks as one weight (None unless all have blocks of one kind); each
    projection then reads its rows of it, so the packed weights are held once."""
    fused = concat_blocks([getattr(p, "blocks", None) for p in projections])
    if fused is None:
        return None
    weight, parts = fused
    for projection, part in zip(projections, parts):
        projection.blocks = part
    return weight


def covers(model) -> bool:
    """Whether the lean forward runs ``model`` (any device): a :data:`LEAN_ARCHITECTURES` model with a SiLU
    MLP and full attention in every layer."""
    config = model.config
    if getattr(config, "model_type", None) not in LEAN_ARCHITECTURES or getattr(config, "hidden_act", None) != "silu":
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False
    if getattr(config, "use_sliding_window", False):
        return False
    decoder = model.get_decoder()
    return all(hasattr(decoder, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm"))


class LlamaStepForward:
    """Decoder forward over ``T`` new tokens with a ``[T, T]`` visibility mask among them.

    Build it with :meth:`for_model`, which returns None for models it does not cover (then the
    engine keeps transformers' forward).
    """

    def __init__(self, model) -> None:
        decoder = model.get_decoder()
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.layers = list(decoder.layers[: model.config.num_hidden_layers])
        self.norm = decoder.norm
        self.head_dim = self.layers[0].self_attn.head_dim
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.groups = self.heads // self.kv_heads  # query heads per kv head
        # where the projections are GGUF blocks (see agentspec.engine.cpu_fast.skinny_linears), q/k/v and
        # gate/up each run as one kernel call on small inputs
        self.qkv = [_fuse((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
                    for layer in self.layers]
        self.gate_up = [_fuse((layer.mlp.gate_proj, layer.mlp.up_proj)) for layer in self.layers]
        # biases of the fused calls (Qwen2's q/k/v, Llama's optional ones): added after the block kernel
        self.qkv_bias = [_fused_bias((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj))
                         for layer in self.layers]
        self.gate_up_bias = [_fused_bias((layer.mlp.gate_proj, layer.mlp.up_proj)) for layer in self.layers]
        # Qwen3: each head of q and k is RMS-normed before the rotation
        self.q_norms = [getattr(layer.self_attn, "q_norm", None) for layer in self.layers]
        self.k_norms = [getattr(layer.self_attn, "k_norm", None) for layer in self.layers]

    @classmethod
    def for_model(cls, model) -> LlamaStepForward | None:
        """The lean forward for ``model``, or None unless it is one of :data:`LEAN_ARCHITECTURES` on a CPU."""
        if not covers(model) or next(model.parameters()).device.type != "cpu":
            return None
        return cls(model)

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor, cache: TreeKVCache
    ) -> torch.Tensor:
        """A verification step: hidden states ``[T, hidden]`` after the final norm; writes the
        tokens' KV into ``cache``.

        input_ids, position_ids: ``[T]``; tree_mask: ``[T, T]`` bool (True = token i sees token j);
        every token also sees the ``cache.length`` committed positions before it.
        """
        return self._run(input_ids, position_ids, cache, self.tree_attention(tree_mask, cache.length))

    def tree_attention(self, tree_mask: torch.Tensor, past: int):
        """``attend(q, keys, values, scale) -> [1, H, T, D]`` for one step's layers: the compiled
        kernel where it fits, else torch's fused kernel with a mask built here, once."""
        visible, mask = tree_mask.to(torch.uint8), None

        def attend(q, k, v, scale):
            nonlocal mask
            if kernel_fits(q, k):
                return tree_attention_rows(q, k, v, visible, scale)  # [1, T, H * D]: what o_proj reads
            if mask is None:
                mask = folded_tree_mask(tree_mask, past, self.groups, q.dtype)
            return folded_tree_attention(q, k.to(q.dtype), v.to(q.dtype), mask, scale)

        return attend

    def prefill(self, input_ids: torch.Tensor, cache: TreeKVCache) -> torch.Tensor:
        """A prompt chunk after the cached positions, causal: hidden states ``[T, hidden]``."""
        past, t = cache.length, input_ids.shape[0]
        positions = torch.arange(past, past + t)
        causal = torch.ones(t, t, dtype=torch.uint8).tril() if t <= KERNEL_PREFILL_ROWS else None
        alone = torch.ones(1, 1, dtype=torch.uint8)

        def attend(q, k, v, scale):
            if causal is not None and kernel_fits(q, k):
                return tree_attention_rows(q, k, v, causal, scale)
            out = causal_chunk_attention(q, k.to(q.dtype), v.to(q.dtype), past, scale)
            if kernel_fits(q, k):  # the last token's row as the kernel gives it alone: a later call that reuses
                # this prompt's KV runs just that token again (for its logits), and then gets the same bits
                last = q[:, :, -1:]
                out[:, :, -1:] = heads_first(tree_attention_rows(last, k, v, alone, scale), last)
            return out

        return self._run(input_ids, positions, cache, attend)

    def _rope_fits(self, x: torch.Tensor, cos: torch.Tensor, cache) -> bool:
        """Whether :func:`~agentspec.kernels.attention.rope_store` can rotate and write this step's q/k/v
        (the compiled kernel, fp32 on a CPU, full-width rotary, a cache that lends its rows)."""
        return (attention_available() and x.device.type == "cpu" and x.dtype == torch.float32
                and cos.dtype == torch.float32 and cos.shape[-1] == self.head_dim
                and hasattr(cache.layers[0], "claim_rows"))

    def _run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: TreeKVCache, attend,
             lap: Callable[[str], None] = _no_lap) -> torch.Tensor:
        """The decoder over ``input_ids``; ``lap(part)`` is called after each part of the work (the step
        profile charges the time since the previous call to that part; see :mod:`agentspec.engine.profile`)."""
        t = input_ids.shape[0]
        x = self.embed(input_ids[None])
        lap("elementwise")
        cos, sin = self.rotary(x, position_ids=position_ids[None])
        fused = blocks_fit(t)
        rows_cos = rows_sin = None  # [T, D] where rotary and the KV write run as one kernel call a layer
        if fused and self._rope_fits(x, cos, cache):
            rows_cos, rows_sin = cos[0].contiguous(), sin[0].contiguous()
        cos, sin = cos[:, None], sin[:, None]
        lap("rotary")
        shape = (1, t, -1, self.head_dim)
        q_end, k_end = self.heads * self.head_dim, (self.heads + self.kv_heads) * self.head_dim
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            lap("glue")
            h = _rms_norm(x, layer.input_layernorm)
            lap("norm")
            if rows_cos is not None and self.qkv[i] is not None:
                qkv = block_matmul(h, self.qkv[i])
                if self.qkv_bias[i] is not None:
                    qkv = qkv + self.qkv_bias[i]
                if self.q_norms[i] is not None:
                    qkv = torch.cat((_head_norm(qkv[..., :q_end], self.q_norms[i], self.head_dim),
                                     _head_norm(qkv[..., q_end:k_end], self.k_norms[i], self.head_dim),
                                     qkv[..., k_end:]), dim=-1)
                lap("matmul")
                layer_cache = cache.layers[i]
                k_rows, v_rows, rows = layer_cache.claim_rows(t, self.kv_heads, self.head_dim, x.dtype, x.device)
                lap("glue")
                q = rope_store(qkv, rows_cos, rows_sin, self.heads, self.kv_heads, k_rows, v_rows, rows)
                lap("rotary")
                keys, values = layer_cache.keys, layer_cache.values
            else:
                if fused and self.qkv[i] is not None:
                    qkv = block_matmul(h, self.qkv[i])
                    if self.qkv_bias[i] is not None:
                        qkv = qkv + self.qkv_bias[i]
                    q, k, v = qkv.split((q_end, k_end - q_end, qkv.shape[-1] - k_end), dim=-1)
                else:
                    q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
                q = _head_norm(q, self.q_norms[i], self.head_dim)
                k = _head_norm(k, self.k_norms[i], self.head_dim)
                lap("matmul")
                q, k, v = (y.view(shape).transpose(1, 2) for y in (q, k, v))
                lap("glue")
                q = (q * cos) + (_rotate_half(q) * sin)
                k = (k * cos) + (_rotate_half(k) * sin)
                lap("rotary")
                keys, values = cache.layers[i].update(k, v)
            lap("kv_write")
            out = attend(q, keys, values, attn.scaling)
            lap("attention")
            if out.dim() == 4:  # [1, H, T, D] from torch's attention; the kernel gives [1, T, H * D]
                out = out.transpose(1, 2).reshape(1, t, -1)
            lap("glue")
            out = _project(attn.o_proj, out, fused)
            lap("matmul")
            x = x + out
            lap("elementwise")
            h = _rms_norm(x, layer.post_attention_layernorm)
            lap("norm")
            if fused and self.gate_up[i] is not None:
                gate_up = block_matmul(h, self.gate_up[i])
                if self.gate_up_bias[i] is not None:
                    gate_up = gate_up + self.gate_up_bias[i]
                gate, up = gate_up.chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            lap("matmul")
            h = F.silu(gate) * up
            lap("elementwise")
            h = _project(mlp.down_proj, h, fused)
            lap("matmul")
            x = x + h
            lap("elementwise")
        x = _rms_norm(x, self.norm)[0]
        lap("norm")
        return x
