"""Tree search on the engine's model: trajectories as paths in one KV tree, all leaves in one forward.

Layout::

    KVPool       per-layer K/V slot buffers (agentspec.engine.radix); a row of KV lives in one slot
    _Node        one step segment of the search tree: its tokens' slots and a parent (the prompt is the root)
    _Leaf        a live trajectory: its node, its pending token (committed, KV not yet computed), its steps

One search step (``forward``): every leaf still inside its reasoning step contributes its pending token
and a draft tree; all rows go through the model in one forward, each row attending to the pool rows of
its own ancestors and of its own draft path only (one additive mask over the pool's rows)::

    rows   = [p_0, d_0 ...] + [p_1, d_1 ...] + ...            # p: pending token, d: its draft nodes
    mask[r, s] = 0 if slot s is on row r's path else -inf       # [T, span]
    keys   = pool[:span]                                          # new rows written into their slots first

so W trajectories read the weights once per forward. Each leaf then accepts losslessly (greedy or
sampling, :mod:`agentspec.engine.verify`); rejected rows free their slots at once. A leaf whose step
ended waits; when all have, the selection policy (:mod:`agentspec.search`) gives each leaf ``n_i``
children: a fork shares its parent's rows (nothing is copied); the next forward computes the parent's
last token once and samples the ``n_i`` children from it; a pruned leaf frees the rows nobody else uses.
The prompt's rows come from the engine's radix prefix cache where it holds them, and go back to it.

Drafts come from one suffix tree over every trajectory of the search (siblings and cousins repeat each
other), and the forward's rows are split across leaves by expected acceptance and the engine's cost curve
(:func:`agentspec.search.split_draft_budget`).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agentspec.config import SamplingParams
from agentspec.draft.base import DraftTree, Source, acceptance_walk
from agentspec.draft.core import SuffixTree
from agentspec.engine.cpu_fast import fast_linears
from agentspec.engine.forward import LeanForward
from agentspec.engine.radix import KVPool
from agentspec.engine.step_forward import LEAN_ARCHITECTURES, LlamaStepForward, covers
from agentspec.engine.verify import ancestor_mask, process_logits
from agentspec.kernels.attention import kernel_fits, tree_attention_rows
from agentspec.kernels.cpu import flash_attention, folded_tree_attention, prefix_attention
from agentspec.kernels.reference import merge_attention, partial_attention
from agentspec.lookahead.policy import CostCurve
from agentspec.search import POLICIES, Candidate, SearchResult, SearchStats, Trajectory, allocate, split_draft_budget
from agentspec.search.selection import CLUSTER_DISTANCE
from agentspec.search.types import Scorer

logger = logging.getLogger(__name__)

# (q, k, v, scale) -> out, [1, H, T, D] or (the compiled kernel's layout) [1, T, H * D]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

PREFILL_CHUNK = 512  # prompt rows per prefill forward (bounds the mask: rows x pool span)
DRAFT_PER_LEAF = 16  # draft nodes a leaf may propose before the shared budget prunes them
CONTEXT_TAIL = 64  # tokens of a leaf's context matched in the suffix tree
FORK_TAIL = 8  # parent tokens a child's suffix-tree sequence starts with (drafts across the fork)


class _PoolLayer:
    """What :class:`LlamaStepForward` sees as one cache layer: new K/V rows go to ``slots``; the
    attention then reads every row of the pool's buffers (rows off a query's path are masked)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        self.k, self.v, self.slots = k, v, slots  # k, v: [Hkv, span, D]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(1, self.slots, key_states[0].to(self.k.dtype))
        self.v.index_copy_(1, self.slots, value_states[0].to(self.v.dtype))
        return self.keys, self.values

    def claim_rows(self, n: int, *_) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pool's buffers and the rows (``slots``) where a kernel writes the new K/V itself."""
        return self.k, self.v, self.slots

    @property
    def keys(self) -> torch.Tensor:
        return self.k[None]

    @property
    def values(self) -> torch.Tensor:
        return self.v[None]


class _PoolView:
    def __init__(self, pool: KVPool, slots: torch.Tensor) -> None:
        slots = slots.to(pool.device)
        self.layers = [_PoolLayer(k, v, slots) for k, v in zip(pool.k, pool.v)]


def _copy_rows(src: KVPool, src_slots: torch.Tensor, dst: KVPool, dst_slots: torch.Tensor) -> None:
    """Copy K/V rows between pools (one gather and one scatter per layer)."""
    i_src, i_dst = src_slots.to(src.device), dst_slots.to(dst.device)
    for layers_src, layers_dst in ((src.k, dst.k), (src.v, dst.v)):
        for a, b in zip(layers_src, layers_dst):
            b.index_copy_(1, i_dst, a.index_select(1, i_src).to(b.device))


class PathAttention:
    """Attention where each leaf's rows read only that leaf's own keys (CPU), the leaves as a batch.

    ``own[w]``: the pool slots leaf ``w``'s rows may see (its path, then its own new rows);
    ``masks[w]``: ``[rows_w, len(own[w])]``, which of them each row sees; the leaves' rows are
    consecutive in the forward, in order. ``shared``: slots every row sees (the prompt), attended
    once for all rows without a mask and merged with the leaves' part by log-sum-exp; None when the
    prompt is part of ``own``.

    Where the compiled tree-attention kernel runs (and the shared rows are one run of slots), every
    row reads the prompt's rows and its own leaf's slots from the pool in place, in one call per
    layer: each row's attention then has the bits of the engine's plain decoding of that trajectory
    (the whole row too where the matmuls are row-independent, as in int8 mode). Else,
    per layer, rows and keys are gathered into ``[W, ...]`` blocks padded to the longest leaf
    (padding points at a real slot and is masked), through torch's fused kernel with grouped-query
    heads folded into the query axis (K and V never repeated)::

        q   [1, H, T, D]   -> [W, Hkv, G * R, D]          R: most rows of a leaf, G = H / Hkv
        k/v [1, Hkv, S, D] -> [W, Hkv, L, D]              L: most keys of a leaf
    """

    def __init__(self, own: list[torch.Tensor], masks: list[torch.Tensor], shared: torch.Tensor | None,
                 groups: int, dtype: torch.dtype) -> None:
        self.own, self.masks, self.groups, self.dtype = own, masks, groups, dtype
        self.shared: torch.Tensor | slice | None = shared
        if shared is not None and shared.numel() and bool((shared.diff() == 1).all()):
            self.shared = slice(int(shared[0]), int(shared[-1]) + 1)  # the prompt's rows in one run: a view
        # for the compiled kernel: the prompt's run of rows (None: the prompt's slots are not one run)
        self.prefix = ((0, 0) if shared is None or not shared.numel() else
                       (self.shared.start, self.shared.stop - self.shared.start) if isinstance(self.shared, slice)
                       else None)
        self._kernel: tuple[torch.Tensor, torch.Tensor] | None = None  # built by the first call that needs it
        self._padded: tuple[torch.Tensor, ...] | None = None

    def _kernel_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every leaf's slots, one after another, and which of them each row sees (uint8 ``[T, U]``)."""
        if self._kernel is None:
            slots = torch.cat(self.own)
            visible = torch.zeros(sum(m.shape[0] for m in self.masks), slots.numel(), dtype=torch.uint8)
            row = col = 0
            for m in self.masks:
                visible[row : row + m.shape[0], col : col + m.shape[1]] = m
                row, col = row + m.shape[0], col + m.shape[1]
            self._kernel = slots, visible
        return self._kernel

    def _padded_inputs(self) -> tuple[torch.Tensor, ...]:
        """For torch's kernel: rows ``[W, R]`` and keys ``[W, L]`` per leaf (padded), the rows that are
        real, and the additive mask ``[W, 1, G * R, L]``."""
        if self._padded is None:
            own, masks = self.own, self.masks
            w, r_max, l_max = len(own), max(m.shape[0] for m in masks), max(o.numel() for o in own)
            rows = torch.empty(w, r_max, dtype=torch.long)
            keys = torch.empty(w, l_max, dtype=torch.long)
            allowed = torch.zeros(w, r_max, l_max, dtype=torch.bool)
            valid, start = [], 0
            for i, (slots, m) in enumerate(zip(own, masks)):
                n, length = m.shape
                keys[i, :length], keys[i, length:] = slots, slots[0]
                rows[i, :n], rows[i, n:] = torch.arange(start, start + n), start
                allowed[i, :n, :length], allowed[i, n:, :length] = m, m[0]
                valid.append(torch.arange(i * r_max, i * r_max + n))
                start += n
            mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, float("-inf"))
            # [W, 1, G * R, L]: folded query index r * R + row
            self._padded = rows, keys, torch.cat(valid), mask.repeat(1, self.groups, 1)[:, None]
        return self._padded

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if self.prefix is not None and kernel_fits(q, k):
            slots, visible = self._kernel_inputs()
            return tree_attention_rows(q, k, v, visible, scale, slots=slots, prefix=self.prefix)  # [1, T, H * D]
        rows, keys, valid, mask = self._padded_inputs()
        _, h, _, d = q.shape
        hkv = k.shape[1]
        w, r_max = rows.shape
        l_max = keys.shape[1]
        qb = q[0].index_select(1, rows.view(-1)).view(h, w, r_max, d).transpose(0, 1)
        qb = qb.reshape(w, hkv, (h // hkv) * r_max, d)
        kb, vb = (x[0].index_select(1, keys.view(-1)).view(hkv, w, l_max, d).transpose(0, 1)
                  .to(q.dtype).contiguous() for x in (k, v))
        out, lse = flash_attention(qb, kb, vb, mask, scale)
        out = out.reshape(w, h, r_max, d).transpose(0, 1).reshape(h, w * r_max, d)[:, valid][None]
        if self.shared is None:
            return out
        lse = lse.reshape(w, h, r_max).transpose(0, 1).reshape(h, w * r_max)[:, valid][None]
        o_shared, lse_shared = prefix_attention(q, k[:, :, self.shared].to(q.dtype), v[:, :, self.shared].to(q.dtype),
                                                scale)
        merged, _ = merge_attention(o_shared, lse_shared, out.float(), lse.float())
        return merged.to(q.dtype)


@dataclass(eq=False)
class _Node:
    """A segment of the search tree: KV ``slots`` of ``tokens``; ``refs`` = child nodes + leaves on it."""

    id: int
    parent: _Node | None
    slots: list[int] = field(default_factory=list)
    refs: int = 0
    _path: torch.Tensor | None = None  # slots from the root to here (cached until slots change)

    def path_slots(self) -> torch.Tensor:
        if self._path is None or self._path.numel() != self._path_len():
            own = torch.tensor(self.slots, dtype=torch.long)
            self._path = own if self.parent is None else torch.cat((self.parent.path_slots(), own))
        return self._path

    def _path_len(self) -> int:
        node, n = self, 0
        while node is not None:
            n += len(node.slots)
            node = node.parent
        return n

    def ancestors(self) -> tuple[int, ...]:
        """Ids of the step nodes above this one (the prompt root excluded)."""
        out, node = [], self.parent
        while node is not None and node.parent is not None:
            out.append(node.id)
            node = node.parent
        return tuple(out)


@dataclass(eq=False)
class _Leaf:
    """A live trajectory. ``fork``: 0 while inside a step; n >= 1 once selected for n children."""

    node: _Node
    pending: int  # last committed token; its KV is computed by the next forward
    length: int  # prompt + generated tokens (the pending token included)
    seq: int  # its sequence in the search's suffix tree
    tail: list[int]  # the last CONTEXT_TAIL tokens of its context
    steps: list[list[int]] = field(default_factory=list)  # finished steps' tokens
    step: list[int] = field(default_factory=list)  # the current step's tokens
    step_scores: list[float] = field(default_factory=list)
    logprob: float = 0.0  # sum of the model's log-probabilities of the generated tokens
    generated: int = 0
    hidden: torch.Tensor | None = None  # sum of the current step's hidden states
    hidden_rows: int = 0
    embedding: np.ndarray | None = None  # the last finished step's mean hidden state
    step_done: bool = False
    finish: str = ""  # "stop" | "length" once the trajectory is complete
    fork: int = 0
    request: str | None = None  # its request in the engine's drafter (searches with a session)
    session_draft: bool = False  # the draft being verified came from the engine's drafter


@dataclass
class SearchConfig:
    """Arguments of one search (see :meth:`agentspec.engine.Engine.search`)."""

    width: int = 4
    policy: str = "ets"
    scorer: Scorer | None = None
    step_stop: str = "\n\n"
    max_step_tokens: int = 256
    max_new_tokens: int = 1024
    temperature: float = 1.0
    seed: int | None = None
    session: str | None = None
    lambda_kv: float = 1.0
    lambda_cover: float = 1.5
    draft: bool = True
    cluster_distance: float = CLUSTER_DISTANCE  # ETS: cosine distance at which step clusters are cut

    def validate(self) -> None:
        """Raise ``ValueError`` naming each bad argument and its value."""
        bad = []
        if not isinstance(self.width, int) or isinstance(self.width, bool) or self.width < 1:
            bad.append(f"width must be a positive integer, got {self.width!r}")
        if self.policy not in POLICIES:
            bad.append(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.scorer is not None and not callable(self.scorer):
            bad.append(f"scorer must be callable(prompt, steps) -> float or None, got {self.scorer!r}")
        if not isinstance(self.step_stop, str) or not self.step_stop:
            bad.append(f"step_stop must be a non-empty string, got {self.step_stop!r}")
        for name in ("max_step_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("temperature", "lambda_kv", "lambda_cover", "cluster_distance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                bad.append(f"{name} must be a finite number >= 0, got {value!r}")
        if bad:
            raise ValueError("; ".join(bad))


class TreeSearch:
    """One search over one prompt on an engine's model (single use: build, then :meth:`run`).

    ``attention`` (CPU): "split" (the prompt once for all rows, each leaf's own segments batched),
    "gather" (each leaf's whole path gathered and batched) or "pool" (every row over the whole pool,
    masked); GPUs run "pool".
    """

    attention = "split"

    def __init__(self, engine: Any, prompt_ids: list[int], prompt_text: str, config: SearchConfig) -> None:
        config.validate()
        self.engine, self.config = engine, config
        self.prompt_ids, self.prompt_text = prompt_ids, prompt_text
        self.matmul: str = getattr(engine, "matmul", "float32")  # the engine's matmul mode, for every forward here
        model = engine.model
        if isinstance(engine.forward, LeanForward):  # the engine's own lean forward and packed head
            self.step, self.head = engine.forward.step, engine.forward.head
        else:
            self.step, self.head = _lean_forward(model), model.get_output_embeddings()
        attn = self.step.layers[0].self_attn
        kv_heads = model.config.num_key_value_heads
        # at most: the prompt, every live trajectory's tokens, one forward's rows
        capacity = len(prompt_ids) + config.width * (config.max_new_tokens + DRAFT_PER_LEAF + 2)
        # the engine's KV precision (a 16-bit KV cache stays 16-bit here; attention widens what it reads)
        self.pool = KVPool(engine.num_layers, kv_heads, attn.head_dim, capacity,
                           dtype=getattr(engine, "kv_dtype", None) or engine.dtype, device=engine.device)
        self.params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=float(config.temperature))
        self.generator = None
        if config.seed is not None:
            self.generator = torch.Generator().manual_seed(config.seed)
        policy = getattr(engine, "policy", None)
        self.cost: Callable[[int], float] = policy.cost if policy is not None else CostCurve()
        self.suffix = SuffixTree(CONTEXT_TAIL)
        # with a session, the engine's drafter (session and global trees) drafts for every trajectory too
        self.drafter = engine.drafter if config.session is not None and config.draft else None
        self.stats = SearchStats(width=config.width, policy=config.policy, prompt_tokens=len(prompt_ids),
                                 kv_bytes_per_token=self.pool.bytes_per_slot)
        self.finished: list[Trajectory] = []
        self._ids = itertools.count()
        self.root: _Node | None = None  # the prompt's segment
        self._zeroed = 0  # pool buffer rows known to hold finite values
        self._expected = 0.0  # sum of the raw draft probabilities verified (for their calibration)
        self._kv: list[int] = []
        self._copy: list[int] = []

    # ------------------------------------------------------------------ the loop
    def run(self) -> SearchResult:
        t0 = time.perf_counter()
        root = self.root = self._new_node(None)
        root.refs += 1  # the search itself holds the prompt until it ends
        if len(self.prompt_ids) > 1:
            self._prefill(root, self.prompt_ids[:-1])
        self.suffix.extend(next(self._ids), self.prompt_ids)
        first = _Leaf(node=root, pending=self.prompt_ids[-1], length=len(self.prompt_ids), seq=-1,
                      tail=self.prompt_ids[-CONTEXT_TAIL:], fork=self.config.width)
        root.refs += 1
        leaves = [first]
        sync = self.config.policy != "best_of_n"
        while leaves:
            running = [leaf for leaf in leaves if not leaf.step_done]
            if running:
                leaves = [leaf for leaf in leaves if leaf.step_done] + self._forward_step(running)
                leaves = self._settle(leaves, select_now=not sync)
                continue
            leaves = self._select(leaves)
        self._release(root)
        self.finished.sort(key=lambda t: -t.score)
        stats = self.stats
        stats.wall_seconds = time.perf_counter() - t0
        if self._kv:
            b = self.pool.bytes_per_slot
            stats.kv_peak_tokens, stats.kv_mean_tokens = max(self._kv), float(np.mean(self._kv))
            stats.copy_peak_tokens, stats.copy_mean_tokens = max(self._copy), float(np.mean(self._copy))
            stats.kv_peak_bytes, stats.kv_mean_bytes = stats.kv_peak_tokens * b, stats.kv_mean_tokens * b
            stats.copy_peak_bytes, stats.copy_mean_bytes = stats.copy_peak_tokens * b, stats.copy_mean_tokens * b
        return SearchResult(self.finished, stats)

    def _settle(self, leaves: list[_Leaf], select_now: bool) -> list[_Leaf]:
        """Finish complete trajectories; without synchronised steps (best-of-N), score each finished
        step at once and let the leaf go on."""
        live = []
        for leaf in leaves:
            if leaf.finish:
                self._complete(leaf)
            elif leaf.step_done and select_now:
                if self._end_step(leaf):
                    leaf.step_done, leaf.fork = False, 1
                    live.append(leaf)
                else:
                    self._drop(leaf)
            else:
                live.append(leaf)
        self._record_kv(live)
        return live

    def _select(self, leaves: list[_Leaf]) -> list[_Leaf]:
        """All leaves ended their step: score them, then give each its children (0 = pruned)."""
        self.stats.search_steps += 1
        scored = []
        for leaf in leaves:
            if self._end_step(leaf):
                scored.append(leaf)
            else:
                self._drop(leaf)
        width = self.config.width - len(self.finished)
        if not scored or width <= 0:
            for leaf in scored:
                self._retire(leaf)
            return []
        node_tokens = {}
        for leaf in scored:
            node = leaf.node.parent
            while node is not None and node.parent is not None:
                node_tokens[node.id] = len(node.slots)
                node = node.parent
        size = self.engine.model.config.hidden_size
        candidates = [Candidate(leaf.step_scores[-1], leaf.node.ancestors(), len(leaf.node.slots) + 1,
                                leaf.embedding if leaf.embedding is not None else np.zeros(size))
                      for leaf in scored]
        counts = allocate(self.config.policy, candidates, width, node_tokens,
                          lambda_kv=self.config.lambda_kv, lambda_cover=self.config.lambda_cover,
                          cluster_distance=self.config.cluster_distance)
        out = []
        for leaf, n in zip(scored, counts):
            if n <= 0:
                self.stats.pruned += 1
                self._retire(leaf)
                continue
            leaf.fork, leaf.step_done = n, False
            out.append(leaf)
        self._record_kv(out)
        return out

    # ------------------------------------------------------------------ one forward over all leaves
    def _forward_step(self, leaves: list[_Leaf]) -> list[_Leaf]:
        """Advance every leaf by one forward; returns the leaves after it (forks replaced by children)."""
        trees = [self._draft(leaf) for leaf in leaves]
        if self.config.draft and any(len(t) for t in trees):
            # suffix-tree probabilities are counts: scale them by the acceptance seen so far in this search
            scale = (self.stats.accepted_draft_tokens + 1.0) / (self._expected + 1.0)
            for tree in trees:
                tree.probs = [min(1.0, p * scale) for p in tree.probs]
            trees = split_draft_budget(trees, self.cost)
            self._expected += sum(sum(t.probs) for t in trees) / scale
        ids, positions, starts = [], [], []
        for leaf, tree in zip(leaves, trees):
            starts.append(len(ids))
            ids += [leaf.pending, *tree.tokens]
            positions += [leaf.length - 1, *(leaf.length - 1 + d for d in tree.depths())]
        slots = self._alloc(len(ids))
        hidden = self._run(ids, positions, slots, self._leaf_attention(leaves, trees, starts, slots))
        with torch.no_grad(), fast_linears(self.matmul):  # the head as the engine's own steps run it
            logits = self.head(hidden).float()  # [T, V]
            lse = torch.logsumexp(logits, dim=-1)
        self.stats.forwards += 1
        self.stats.draft_tokens += sum(len(t) for t in trees)
        draws = [1] * len(ids)
        for leaf, a in zip(leaves, starts):
            draws[a] = max(1, leaf.fork)
        targets = self._target_tokens(logits, draws)
        out: list[_Leaf] = []
        keep: set[int] = set()
        for leaf, tree, a in zip(leaves, trees, starts):
            out += self._accept(leaf, tree, a, slots, targets, logits, lse, hidden, keep)
        self.pool.free([int(s) for s in slots if int(s) not in keep])
        return out

    def _accept(self, leaf: _Leaf, tree: DraftTree, a: int, slots: torch.Tensor, targets: list[list[int]],
                logits: torch.Tensor, lse: torch.Tensor, hidden: torch.Tensor, keep: set[int]) -> list[_Leaf]:
        """Accept each of the leaf's children (itself when it is inside a step) against this forward's
        ``targets`` (:meth:`_target_tokens`); ``keep`` gets the slots kept."""
        leaf.node.slots.append(int(slots[a]))  # the pending token's row joins the leaf's own segment
        keep.add(int(slots[a]))
        if not leaf.fork:
            self._add_hidden(leaf, hidden[a])
        out = []
        for k in range(max(1, leaf.fork)):
            if leaf.fork > 1:  # no draft: the children are k independent draws of one row
                accepted, bonus = [], targets[a][k]
            else:
                accepted, bonus = acceptance_walk(tree, lambda slot: targets[a + slot][0])
                assert bonus is not None
            target = self._child(leaf) if leaf.fork else leaf
            new = [tree.tokens[i] for i in accepted] + [bonus]
            origin = [a] + [a + 1 + i for i in accepted]  # the row whose logits gave each new token
            logprobs = [float(logits[r, t] - lse[r]) for r, t in zip(origin, new)]
            m = self._commit(target, new, logprobs)
            self.stats.accepted_draft_tokens += min(m, len(accepted))
            if target.request is not None:  # the engine's drafter follows the trajectory (and learns)
                learn = leaf.session_draft and not leaf.fork
                self.drafter.accept(target.request, tree if learn else DraftTree(), accepted[:m] if learn else [],
                                    new[:m])
            for i in accepted[: m - 1]:  # committed tokens before the new pending one have their KV
                slot = int(slots[a + 1 + i])
                target.node.slots.append(slot)
                keep.add(slot)
                self._add_hidden(target, hidden[a + 1 + i])
            out.append(target)
        if leaf.fork:
            self._retire(leaf)  # the children hold it now
        return out

    def _target_tokens(self, logits: torch.Tensor, draws: list[int]) -> list[list[int]]:
        """The target's tokens after each row, ``draws[r]`` of them: the argmax (greedy) or independent
        samples of the processed distribution, all rows at once (inverse CDF in float64).

        Lossless acceptance asks for one target token per visited row (two rows never share a draw),
        so drawing one for every row up front and reading those the acceptance walk visits gives
        the same law as drawing them one by one."""
        if self.params.greedy:
            return [[t] * n for t, n in zip(logits.argmax(dim=-1).tolist(), draws)]
        cdf = process_logits(logits, self.params).double().cumsum(dim=-1)  # [T, V]
        u = torch.rand(len(draws), max(draws), dtype=torch.float64, generator=self.generator) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).tolist()
        return [row[:n] for row, n in zip(tokens, draws)]

    def _commit(self, leaf: _Leaf, tokens: list[int], logprobs: list[float]) -> int:
        """Append tokens up to the first end (EOS, length, step end); returns how many were taken."""
        eos, window = self.engine.eos_ids, self.engine.context_window
        for j, (tok, lp) in enumerate(zip(tokens, logprobs)):
            leaf.step.append(tok)
            leaf.tail.append(tok)
            leaf.generated += 1
            leaf.length += 1
            leaf.logprob += lp
            self.stats.generated_tokens += 1
            self.suffix.append(leaf.seq, tok)
            if tok in eos:
                leaf.finish = "stop"
            elif leaf.generated >= self.config.max_new_tokens or leaf.length >= window:
                leaf.finish = "length"
            elif len(leaf.step) >= self.config.max_step_tokens or self._step_ended(leaf.step):
                leaf.step_done = True
            if leaf.finish or leaf.step_done:
                leaf.pending = tok
                del leaf.tail[:-CONTEXT_TAIL]
                return j + 1
        leaf.pending = tokens[-1]
        del leaf.tail[:-CONTEXT_TAIL]
        return len(tokens)

    def _step_ended(self, step: list[int]) -> bool:
        stop = self.config.step_stop
        tail = self.engine.tokenizer.decode(step[-(len(stop) + 4):], skip_special_tokens=True)
        return stop in tail

    def _draft(self, leaf: _Leaf) -> DraftTree:
        """A draft for the leaf from the search's suffix tree (none for a fork into several children)."""
        room = min(self.config.max_new_tokens - leaf.generated, self.engine.context_window - leaf.length) - 1
        budget = min(DRAFT_PER_LEAF, room, self.config.max_step_tokens - (0 if leaf.fork else len(leaf.step)) - 1)
        if not self.config.draft or leaf.fork > 1 or budget <= 0:
            return DraftTree()
        d = self.suffix.speculate(leaf.tail, budget, 4.0, 0.0, 0.05)
        tree = DraftTree(list(d.tokens), list(d.parents), list(d.probs), [int(Source.REQUEST)] * len(d.tokens))
        leaf.session_draft = False
        if leaf.request is not None and not leaf.fork:
            other = self.drafter.propose(leaf.request, budget)
            if other.expected_accepted() > tree.expected_accepted():
                tree, leaf.session_draft = other, True
        return tree

    def _leaf_attention(self, leaves: list[_Leaf], trees: list[DraftTree], starts: list[int],
                        slots: torch.Tensor) -> Attend:
        """How this forward's rows attend: each leaf's rows to its own path and draft only."""
        if self.attention == "pool" or self.engine.device.type != "cpu":
            allowed = torch.zeros(len(slots), self.pool.k[0].shape[1], dtype=torch.bool)
            for leaf, tree, a in zip(leaves, trees, starts):
                b = a + 1 + len(tree)
                allowed[a:b, leaf.node.path_slots()] = True
                allowed[a:b, slots[a:b]] = ancestor_mask(tree.parents)
            return self._mask_attention(allowed)
        assert self.root is not None
        shared = self.root.path_slots() if self.attention == "split" else None
        skip = 0 if shared is None else shared.numel()
        own, masks = [], []
        for leaf, tree, a in zip(leaves, trees, starts):
            path = leaf.node.path_slots()[skip:]
            n = 1 + len(tree)
            own.append(torch.cat((path, slots[a : a + n])))
            allowed = torch.ones(n, path.numel() + n, dtype=torch.bool)
            allowed[:, path.numel():] = ancestor_mask(tree.parents)
            masks.append(allowed)
        return PathAttention(own, masks, shared, self.step.groups, self.engine.dtype)

    def _mask_attention(self, allowed: torch.Tensor) -> Attend:
        """Every row over the whole pool, ``allowed[r]`` the slots row r sees (prefill chunks, GPUs)."""
        device, dtype = self.engine.device, self.engine.dtype
        if device.type == "cpu":
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
            mask = mask.repeat(self.step.groups, 1)[None, None]

            def attend(q, k, v, scale):
                return folded_tree_attention(q, k.to(q.dtype), v.to(q.dtype), mask, scale)
        else:
            bool_mask = allowed.to(device)[None, None]

            def attend(q, k, v, scale):
                return partial_attention(q, k.to(q.dtype), v.to(q.dtype), bool_mask, scale)[0].to(q.dtype)
        return attend

    def _run(self, ids: list[int], positions: list[int], slots: torch.Tensor, attend: Attend) -> torch.Tensor:
        """One forward of ``ids`` writing their KV to ``slots``, attending through ``attend``."""
        device = self.engine.device
        with torch.no_grad(), fast_linears(self.matmul):
            return self.step._run(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                                  _PoolView(self.pool, slots), attend)

    def _prefill(self, root: _Node, tokens: list[int]) -> None:
        """The prompt's KV (all but its last token) into the pool, once: the rows the engine's prefix
        cache holds are copied, the rest computed in causal chunks and offered back to that cache."""
        cache = self.engine.prefix_cache
        cached = 0
        if cache is not None:
            match = cache.match_prefix(tokens, self.engine.namespace)
            cached = match.length
            if cached:
                slots = self._alloc(cached)
                _copy_rows(cache.pool, match.slots, self.pool, slots)
                root.slots += slots.tolist()
        for start in range(cached, len(tokens), PREFILL_CHUNK):
            chunk = tokens[start : start + PREFILL_CHUNK]
            slots = self._alloc(len(chunk))
            allowed = torch.zeros(len(chunk), self.pool.k[0].shape[1], dtype=torch.bool)
            if root.slots:
                allowed[:, root.path_slots()] = True
            allowed[:, slots] = torch.ones(len(chunk), len(chunk), dtype=torch.bool).tril()
            self._run(chunk, list(range(start, start + len(chunk))), slots, self._mask_attention(allowed))
            root.slots += slots.tolist()
            self.stats.forwards += 1
        if cache is not None and cached < len(tokens):
            cache.lock(match.node)  # the prefix we extend stays while eviction makes room
            try:
                new = cache.alloc(len(tokens) - cached)
            finally:
                cache.unlock(match.node)
            if new is not None:
                _copy_rows(self.pool, root.path_slots()[cached:], cache.pool, new)
                cache.insert(tokens, torch.cat((match.slots, new)), self.engine.namespace)

    # ------------------------------------------------------------------ tree bookkeeping
    def _alloc(self, n: int) -> torch.Tensor:
        """``n`` pool slots; rows the buffers gained are zeroed (masked rows must hold finite values:
        0 * NaN is NaN)."""
        slots = self.pool.alloc(n)
        if slots is None:  # the capacity bounds what a search can hold: a bug if it is reached
            raise RuntimeError(f"search KV pool exhausted ({self.pool.capacity} slots)")
        span = self.pool.k[0].shape[1]
        if span > self._zeroed:
            for buf in (*self.pool.k, *self.pool.v):
                buf[:, self._zeroed :].zero_()
            self._zeroed = span
        return slots

    def _new_node(self, parent: _Node | None) -> _Node:
        node = _Node(next(self._ids), parent)
        if parent is not None:
            parent.refs += 1
        return node

    def _child(self, leaf: _Leaf) -> _Leaf:
        """A new trajectory continuing ``leaf`` in a new step segment (sharing every row above it)."""
        node = self._new_node(leaf.node)
        node.refs += 1
        seq = next(self._ids)
        self.suffix.extend(seq, leaf.tail[-FORK_TAIL:])
        child = _Leaf(node=node, pending=leaf.pending, length=leaf.length, seq=seq, tail=list(leaf.tail),
                      steps=list(leaf.steps), step_scores=list(leaf.step_scores), logprob=leaf.logprob,
                      generated=leaf.generated)
        if self.drafter is not None:
            child.request = f"search-{seq}"
            context = self.prompt_ids + [t for step in leaf.steps for t in step]
            self.drafter.start_request(child.request, self.config.session, context)
        return child

    def _retire(self, leaf: _Leaf) -> None:
        """The leaf is done (finished, pruned, dropped or forked): its tokens join the drafter's
        history, its rows go back unless others share them."""
        if leaf.request is not None:
            self.drafter.stop_request(leaf.request)
            leaf.request = None
        self._release(leaf.node)

    def _release(self, node: _Node | None) -> None:
        """Drop one reference; a node nobody holds frees its slots and releases its parent."""
        while node is not None:
            node.refs -= 1
            if node.refs > 0:
                return
            self.pool.free(node.slots)
            node.slots = []
            node = node.parent

    def _add_hidden(self, leaf: _Leaf, row: torch.Tensor) -> None:
        leaf.hidden = row.float().clone() if leaf.hidden is None else leaf.hidden + row.float()
        leaf.hidden_rows += 1

    def _end_step(self, leaf: _Leaf) -> bool:
        """Close the leaf's step and score the trajectory; False if the scorer failed (drop it)."""
        if leaf.hidden is not None:
            leaf.embedding = (leaf.hidden / leaf.hidden_rows).cpu().numpy()
        leaf.hidden, leaf.hidden_rows = None, 0
        if leaf.step:
            leaf.steps.append(leaf.step)
            leaf.step = []
        score = self._score(leaf)
        if score is None:
            return False
        leaf.step_scores.append(score)
        return True

    def _score(self, leaf: _Leaf) -> float | None:
        scorer = self.config.scorer
        if scorer is None:  # the model's own mean token log-probability
            return leaf.logprob / max(1, leaf.generated)
        texts = [self.engine.tokenizer.decode(s, skip_special_tokens=True) for s in leaf.steps]
        try:
            score = float(scorer(self.prompt_text, texts))
        except Exception as exc:  # a user's scorer: any failure drops the leaf, the search goes on
            logger.warning("scorer raised %s: %s; dropping that trajectory", type(exc).__name__, exc)
            return None
        if math.isnan(score):
            logger.warning("scorer returned NaN; dropping that trajectory")
            return None
        return score

    def _drop(self, leaf: _Leaf) -> None:
        self.stats.dropped_by_scorer += 1
        self._retire(leaf)

    def _complete(self, leaf: _Leaf) -> None:
        """A trajectory ended (EOS or length): score its last step, keep its tokens, free its KV."""
        if not self._end_step(leaf):
            self._drop(leaf)
            return
        self._retire(leaf)
        decode = self.engine.tokenizer.decode
        tokens = [t for s in leaf.steps for t in s]
        self.finished.append(Trajectory(
            text=decode(tokens, skip_special_tokens=True), token_ids=tokens, score=leaf.step_scores[-1],
            step_scores=list(leaf.step_scores), steps=[decode(s, skip_special_tokens=True) for s in leaf.steps],
            finish_reason=leaf.finish,
        ))

    def _record_kv(self, leaves: list[_Leaf]) -> None:
        self._kv.append(self.pool.num_used)
        self._copy.append(sum(leaf.length - 1 for leaf in leaves for _ in range(max(1, leaf.fork))))


def _lean_forward(model: Any) -> LlamaStepForward:
    """The engine's lean forward for ``model`` on any device (the search runs its own masks)."""
    if not covers(model):
        raise ValueError(f"tree search needs a Llama-family model ({', '.join(LEAN_ARCHITECTURES)}, full attention), "
                         f"got {getattr(model.config, 'model_type', None)!r}")
    return LlamaStepForward(model)


def run_search(engine: Any, prompt_ids: list[int], prompt_text: str, config: SearchConfig) -> SearchResult:
    """Run one tree search (the engine's lock held: its model runs one forward at a time)."""
    if len(prompt_ids) + 1 >= engine.context_window:
        raise ValueError(f"prompt is {len(prompt_ids)} tokens but the context window is {engine.context_window}")
    runner = TreeSearch(engine, prompt_ids, prompt_text, config)
    with engine._lock:
        return runner.run()
