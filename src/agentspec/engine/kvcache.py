"""KV cache of one request, for tree verification.

``TreeKVCache`` is a transformers ``Cache`` whose layers write into preallocated buffers
(no ``torch.cat`` per step, gpt-fast style) and can *compact*: after verification keep the
committed prefix plus the accepted path, drop the rejected tree rows. KV shared across
requests lives in the radix prefix cache (:mod:`agentspec.engine.radix`).

The buffers may hold K/V in a narrower dtype than the model computes them in (``dtype``, e.g.
fp16 or bf16): writes round to it, and the attention kernel widens what it reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer


class TreeKVLayer(DynamicLayer):
    """One layer's K/V in a growable buffer: ``keys = buf[..., :length, :]`` (a view), stored in
    ``dtype`` (None: the dtype of the first keys written)."""

    def __init__(self, capacity: int = 256, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.capacity = capacity
        self.kv_dtype = dtype
        self.length = 0
        self._k: torch.Tensor | None = None  # [B, Hkv, capacity, D]
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = self.kv_dtype or key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty(b, h, self.capacity, d, dtype=self.dtype)
        self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1], dtype=self.dtype)
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        k = self._k.new_empty(*self._k.shape[:2], capacity, self._k.shape[-1])
        v = self._v.new_empty(*self._v.shape[:2], capacity, self._v.shape[-1])
        k[..., : self.length, :] = self._k[..., : self.length, :]
        v[..., : self.length, :] = self._v[..., : self.length, :]
        self._k, self._v, self.capacity = k, v, capacity

    def _refresh_views(self) -> None:
        self.keys = self._k[..., : self.length, :]
        self.values = self._v[..., : self.length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._reserve(self.length + n)
        self._k[..., self.length : self.length + n, :] = key_states
        self._v[..., self.length : self.length + n, :] = value_states
        self.length += n
        self._refresh_views()
        return self.keys, self.values

    def claim(
        self, n: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``n`` rows and return views ``[1, kv_heads, n, head_dim]`` of them (K, V) to fill in place."""
        if not self.is_initialized:
            empty = torch.empty(1, kv_heads, 0, head_dim, dtype=dtype, device=device)
            self.lazy_initialization(empty, empty)
        self._reserve(self.length + n)
        start, self.length = self.length, self.length + n
        self._refresh_views()
        return self._k[..., start : self.length, :], self._v[..., start : self.length, :]

    def claim_rows(
        self, n: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """:meth:`claim` as ``[kv_heads, n, head_dim]`` buffers (rows ``0..n-1``) for a kernel that writes
        K/V itself (:func:`agentspec.kernels.attention.rope_store`); ``keys``/``values`` then include them."""
        k, v = self.claim(n, kv_heads, head_dim, dtype, device)
        return k[0], v[0], None

    def get_seq_length(self) -> int:
        return self.length

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions."""
        self.length = min(self.length, length)
        if self.is_initialized:
            self._refresh_views()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0:
            self.truncate(self.length + tokens_to_remove)

    def keep(self, start: int, positions: torch.Tensor) -> None:
        """Keep ``[0, start)`` and then the rows ``positions`` (ascending, all >= start)."""
        n = positions.numel()
        if n:
            self._k[..., start : start + n, :] = self._k.index_select(-2, positions)
            self._v[..., start : start + n, :] = self._v.index_select(-2, positions)
        self.length = start + n
        self._refresh_views()

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self._k.element_size() * self._k.numel() + self._v.element_size() * self._v.numel()


class TreeKVCache(Cache):
    """A ``Cache`` of :class:`TreeKVLayer` s: growable buffers with tree compaction; K/V stored in
    ``dtype`` (None: as computed)."""

    def __init__(self, num_layers: int, capacity: int = 256, dtype: torch.dtype | None = None) -> None:
        super().__init__(layers=[TreeKVLayer(capacity, dtype) for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.layers[0].length

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)

    def compact(self, start: int, keep_offsets: Sequence[int]) -> None:
        """After verifying a tree appended at ``start``: keep rows ``start + keep_offsets``."""
        positions = torch.as_tensor([start + i for i in keep_offsets], dtype=torch.long)
        if positions.numel() and bool((positions == torch.arange(start, start + len(positions))).all()):
            self.truncate(start + len(positions))  # the accepted rows are already in place
            return
        for layer in self.layers:
            layer.keep(start, positions.to(layer.device) if layer.is_initialized else positions)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
