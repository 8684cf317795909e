"""Radix prefix cache: KV rows of past sequences in a slot pool, indexed by a radix tree of tokens.

Modelled on SGLang's ``RadixCache``. Two parts:

* :class:`KVPool` -- per-layer K/V buffers of ``capacity`` *slots* (one slot = one token's K and V
  in every layer). ``alloc(n)`` hands out free slots, ``free(slots)`` takes them back; rows move
  between a pool and a request's contiguous :class:`~agentspec.engine.kvcache.TreeKVCache` with
  :meth:`KVPool.read_into` and :meth:`KVPool.write_from` (slice copies of runs of consecutive slots,
  one gather per layer when the slots are scattered).
* :class:`RadixCache` -- a radix tree over token ids whose edges are token *segments* and whose
  values are the pool slots holding those tokens' KV::

      root -- [1 2 3 4] -- [5 6]        sequences 1 2 3 4 5 6 and 1 2 3 4 9 cached;
                       \\- [9]           1 2 3 4 is stored once

  ``match_prefix(tokens)`` returns the longest cached prefix and its slots and removes nothing
  (it may split a node so the match ends on a node boundary); ``insert(tokens, slots)`` adds a
  sequence, reusing what is cached; ``lock(node)`` / ``unlock(node)`` count users along the path
  to the root, and locked nodes are never evicted; :meth:`RadixCache.alloc` evicts least recently
  used unlocked *leaves* (freeing their slots) until the pool can serve a request. The byte budget
  is the pool's capacity.

A request (see :class:`~agentspec.engine.engine.Engine`)::

    match = cache.match_prefix(prompt); cache.lock(match.node)
    pool.read_into(match.slots, request_kv)         # contiguous copy: the forward reads it as is
    ... prefill the rest, decode ...
    cache.cache_sequence(tokens, request_kv)        # only the rows beyond the cached prefix move
    cache.unlock(match.node)

Namespaces keep trees apart over one pool (tenants): a sequence inserted under one namespace is
never matched under another, and all namespaces share the budget and the LRU order.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from agentspec.engine.kvcache import TreeKVCache
from agentspec.tokens import common_prefix

_EMPTY = torch.empty(0, dtype=torch.long)


class KVPool:
    """K/V rows of ``capacity`` slots for each of ``num_layers`` layers: ``k[layer]: [kv_heads, capacity, head_dim]``.

    Buffers grow on demand (doubling) up to ``capacity`` slots, so an unused budget costs nothing.
    Needs no GPU: ``device`` is wherever the model's KV lives.
    """

    def __init__(
        self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, *,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> None:
        if min(num_layers, kv_heads, head_dim) <= 0 or capacity < 0:
            raise ValueError(f"expected positive layers/heads/head_dim and capacity >= 0; got "
                             f"{num_layers}, {kv_heads}, {head_dim}, {capacity}")
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.capacity = capacity
        self.dtype, self.device = dtype, torch.device(device)
        self.bytes_per_slot = 2 * num_layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()
        self.k: list[torch.Tensor] = []  # per layer [kv_heads, allocated, head_dim]
        self.v: list[torch.Tensor] = []
        self._free: list[int] = []  # free slot ids, allocated buffer rows only
        self._allocated = 0

    @classmethod
    def for_budget(cls, num_layers: int, kv_heads: int, head_dim: int, max_bytes: int, **kwargs) -> KVPool:
        """A pool of as many slots as fit ``max_bytes``."""
        pool = cls(num_layers, kv_heads, head_dim, 0, **kwargs)
        pool.capacity = max(0, max_bytes) // pool.bytes_per_slot
        return pool

    @property
    def num_free(self) -> int:
        """Slots that ``alloc`` can hand out without eviction (including rows not yet allocated)."""
        return len(self._free) + self.capacity - self._allocated

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def nbytes(self) -> int:
        """Bytes of the slots in use (the budget counts these)."""
        return self.num_used * self.bytes_per_slot

    def alloc(self, n: int) -> torch.Tensor | None:
        """``n`` free slots as a LongTensor, or None when fewer than ``n`` are free (nothing is taken).

        Slots freed together come back together and in order, so a sequence's slots are mostly
        runs of consecutive ids, which :meth:`read_into` and :meth:`write_from` copy as slices."""
        if n > self.num_free:
            return None
        if n > len(self._free):
            self._grow(n - len(self._free))
        slots = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        return torch.tensor(slots[::-1], dtype=torch.long)

    def free(self, slots: torch.Tensor | Sequence[int]) -> None:
        """Give ``slots`` back (their rows become garbage)."""
        self._free.extend(reversed(torch.as_tensor(slots, dtype=torch.long).tolist()))

    def _grow(self, needed: int) -> None:
        new_size = min(self.capacity, max(self._allocated + needed, 2 * self._allocated, 256))
        shape = (self.kv_heads, new_size, self.head_dim)
        for layers in (self.k, self.v):
            for i in range(self.num_layers):
                grown = torch.empty(shape, dtype=self.dtype, device=self.device)
                if layers and i < len(layers):
                    grown[:, : self._allocated] = layers[i]
                    layers[i] = grown
                else:
                    layers.append(grown)
        self._free.extend(range(new_size - 1, self._allocated - 1, -1))  # low slots handed out first
        self._allocated = new_size

    def read_into(self, slots: torch.Tensor, cache: TreeKVCache) -> None:
        """Append the rows of ``slots`` to ``cache`` (after its ``length``), in order."""
        n = len(slots)
        if not n:
            return
        runs = _runs(slots)
        for i, layer in enumerate(cache.layers):
            k_dst, v_dst = layer.claim(n, self.kv_heads, self.head_dim, self.dtype, self.device)  # [1, H, n, D]
            if runs is None:  # scattered slots: one gather per layer
                index = slots.to(self.device)
                k_dst[0] = self.k[i].index_select(1, index)
                v_dst[0] = self.v[i].index_select(1, index)
                continue
            for offset, first, length in runs:  # slices copy at memory speed; a gather allocates
                k_dst[0, :, offset : offset + length] = self.k[i][:, first : first + length]
                v_dst[0, :, offset : offset + length] = self.v[i][:, first : first + length]

    def write_from(self, slots: torch.Tensor, cache: TreeKVCache, start: int) -> None:
        """Store ``cache`` rows ``start .. start + len(slots)`` into ``slots``."""
        if not len(slots):
            return
        runs = _runs(slots)
        stop = start + len(slots)
        for i, layer in enumerate(cache.layers):
            keys, values = layer.keys[0, :, start:stop], layer.values[0, :, start:stop]  # [H, n, D]
            if runs is None:
                index = slots.to(self.device)
                self.k[i].index_copy_(1, index, keys)
                self.v[i].index_copy_(1, index, values)
                continue
            for offset, first, length in runs:
                self.k[i][:, first : first + length] = keys[:, offset : offset + length]
                self.v[i][:, first : first + length] = values[:, offset : offset + length]


MAX_RUNS = 64  # more runs of consecutive slots than this: gather / scatter instead of slice copies


def _runs(slots: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """``slots`` as runs of consecutive ids ``(offset in slots, first slot, length)``; None if too many."""
    breaks = (torch.nonzero(slots[1:] != slots[:-1] + 1).flatten() + 1).tolist()
    if len(breaks) >= MAX_RUNS:
        return None
    starts, ends = [0, *breaks], [*breaks, len(slots)]
    firsts = slots[starts].tolist()
    return [(a, first, b - a) for a, b, first in zip(starts, ends, firsts)]


@dataclass(eq=False)
class TreeNode:
    """A segment of tokens and the slots of their KV. ``children`` are keyed by their first token."""

    key: tuple[int, ...] = ()
    value: torch.Tensor = field(default_factory=lambda: _EMPTY)  # [len(key)] slot ids
    parent: TreeNode | None = None
    children: dict[int, TreeNode] = field(default_factory=dict)
    lock_ref: int = 0  # users of this node (a node is locked when any path through it is in use)
    last_access: int = 0  # logical clock of the last match or insert through this node

    def __lt__(self, other: TreeNode) -> bool:  # eviction heap order: least recently used first
        return self.last_access < other.last_access


@dataclass
class PrefixMatch:
    """What :meth:`RadixCache.match_prefix` found: ``length`` cached tokens, their ``slots``, and
    the ``node`` where the match ends (lock it while the slots are in use)."""

    length: int
    slots: torch.Tensor
    node: TreeNode


class RadixCache:
    """Radix tree of cached token sequences over a :class:`KVPool` (see the module docstring)."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self._roots: dict[str, TreeNode] = {}
        self._clock = itertools.count(1)
        self.total_tokens = 0  # tokens held by the tree (= slots it owns)

    # ------------------------------------------------------------------ public verbs
    def match_prefix(self, tokens: Sequence[int], namespace: str = "") -> PrefixMatch:
        """The longest cached prefix of ``tokens``: its length, slots and end node. Removes nothing."""
        node = self._root(namespace)
        tick = next(self._clock)
        node.last_access = tick
        values: list[torch.Tensor] = []
        pos = 0
        while pos < len(tokens) and (child := node.children.get(tokens[pos])) is not None:
            n = common_prefix(child.key, tokens[pos : pos + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = tick
            values.append(child.value)
            pos += n
            node = child
        slots = torch.cat(values) if values else _EMPTY
        return PrefixMatch(pos, slots, node)

    def insert(self, tokens: Sequence[int], slots: torch.Tensor, namespace: str = "") -> int:
        """Cache ``tokens`` whose KV is in ``slots`` (one slot per token). Returns how many leading
        tokens were cached already: their given slots are *not* taken (the caller frees them or
        keeps using them); the tree owns the slots of the rest."""
        if len(slots) != len(tokens):
            raise ValueError(f"expected one slot per token; got {len(slots)} slots for {len(tokens)} tokens")
        node = self._root(namespace)
        tick = next(self._clock)
        node.last_access = tick
        pos = 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                leaf = TreeNode(tuple(tokens[pos:]), slots[pos:].clone(), node, last_access=tick)
                node.children[tokens[pos]] = leaf
                self.total_tokens += len(leaf.key)
                return pos
            n = common_prefix(child.key, tokens[pos : pos + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = tick
            pos += n
            node = child
        return pos

    def lock(self, node: TreeNode) -> None:
        """Protect ``node`` and its ancestors from eviction (counted: call :meth:`unlock` once per lock)."""
        while node.parent is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        """Undo one :meth:`lock` of ``node``."""
        while node.parent is not None:
            if node.lock_ref <= 0:
                raise ValueError("unlock without a matching lock")
            node.lock_ref -= 1
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Drop least recently used unlocked leaves until ``num_tokens`` slots were freed (or nothing
        more can go). Returns the slots freed."""
        leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0 and n.parent is not None]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            self.pool.free(leaf.value)
            freed += len(leaf.key)
            self.total_tokens -= len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def alloc(self, n: int) -> torch.Tensor | None:
        """``n`` pool slots, evicting unlocked leaves as needed; None if even that cannot free enough."""
        if n > self.pool.num_free:
            self.evict(n - self.pool.num_free)
        return self.pool.alloc(n)

    def cache_sequence(self, tokens: Sequence[int], cache: TreeKVCache, namespace: str = "") -> int:
        """Cache ``tokens`` whose KV are rows ``0 .. len(tokens)`` of ``cache``: only the rows beyond
        the longest cached prefix are written to the pool. Returns the tokens newly cached (0 when
        the pool cannot make room: the sequence is then simply not cached)."""
        match = self.match_prefix(tokens, namespace)
        new = len(tokens) - match.length
        if new <= 0:
            return 0
        self.lock(match.node)  # keep the prefix we extend while eviction makes room
        try:
            slots = self.alloc(new)
        finally:
            self.unlock(match.node)
        if slots is None:
            return 0
        self.pool.write_from(slots, cache, match.length)
        self.insert(tokens, torch.cat((match.slots, slots)), namespace)
        return new

    def nbytes(self) -> int:
        """Bytes of KV the tree holds."""
        return self.total_tokens * self.pool.bytes_per_slot

    def evictable_tokens(self) -> int:
        """Tokens in nodes that no request has locked."""
        return sum(len(n.key) for n in self._nodes() if n.lock_ref == 0 and n.parent is not None)

    def reset(self) -> None:
        """Drop every unlocked node (locked paths stay: requests are reading them)."""
        self.evict(self.total_tokens)

    def check_integrity(self) -> None:
        """Raise ``AssertionError`` if an invariant breaks: children keyed by their first token, one
        slot per token, no empty segment but the roots, lock counts >= the sum over children,
        ``total_tokens`` equal to the tokens held, no slot held twice or also free in the pool."""
        seen: set[int] = set()
        held = 0
        for node in self._nodes():
            if node.parent is None:
                continue
            assert node.key and len(node.key) == len(node.value), "a segment needs one slot per token"
            assert node.parent.children.get(node.key[0]) is node, "children are keyed by their first token"
            assert node.lock_ref >= sum(c.lock_ref for c in node.children.values()), "lock counts run to the root"
            slots = node.value.tolist()
            assert not seen.intersection(slots), "a slot is held twice"
            seen.update(slots)
            held += len(slots)
        assert held == self.total_tokens, f"total_tokens {self.total_tokens} != {held} held"
        assert not seen.intersection(self.pool._free), "a held slot is also free in the pool"

    # ------------------------------------------------------------------ internals
    def _root(self, namespace: str) -> TreeNode:
        if namespace not in self._roots:
            self._roots[namespace] = TreeNode()
        return self._roots[namespace]

    def _nodes(self):
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut ``child``'s segment after ``n`` tokens: a new node holds the first ``n`` and becomes
        ``child``'s parent. Returns the new node (same locks and access time as ``child``)."""
        head = TreeNode(child.key[:n], child.value[:n], child.parent, lock_ref=child.lock_ref,
                        last_access=child.last_access)
        head.children[child.key[n]] = child
        child.parent.children[child.key[0]] = head
        child.key, child.value, child.parent = child.key[n:], child.value[n:], head
        return head
