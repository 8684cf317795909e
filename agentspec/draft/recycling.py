"""Token Recycling: each token's top-k successors, refreshed from every verification pass.

The table ``[vocab, k]`` (int32, -1 = unknown) is kept across requests. The engine feeds it,
for every verified tree node, the top-k of that node's logits (``observe``). Drafts use it as
branches of an anisotropic tree (Goose): the suffix-tree draft is the spine, and each spine
node (and the root) gets the recycled successors it lacks as low-probability children.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agentspec.draft.base import DraftTree, Source


class RecyclingTable:
    """``table[t]`` = the last observed top-``k`` successors of token ``t`` (best first)."""

    def __init__(self, vocab_size: int = 0, k: int = 8) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.table = np.full((max(int(vocab_size), 0), self.k), -1, dtype=np.int32)

    def _grow(self, max_token: int) -> None:
        if max_token >= len(self.table):
            rows = max(max_token + 1, 2 * len(self.table))
            extra = np.full((rows - len(self.table), self.k), -1, dtype=np.int32)
            self.table = np.concatenate([self.table, extra])

    def observe(self, token_ids: Sequence[int] | np.ndarray, topk_successor_ids: np.ndarray) -> None:
        """Set ``table[token_ids[i]] = topk_successor_ids[i, :k]`` (shape ``[n, >= 1]``)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        top = np.asarray(topk_successor_ids, dtype=np.int64)
        if top.ndim != 2 or top.shape[0] != ids.shape[0]:
            raise ValueError(f"expected topk of shape [{ids.shape[0]}, k], got {tuple(top.shape)}")
        if ids.size == 0:
            return
        if ids.min() < 0 or top.min() < 0:
            raise ValueError("token ids must be >= 0")
        self._grow(int(ids.max()))
        width = min(self.k, top.shape[1])
        rows = np.full((ids.size, self.k), -1, dtype=np.int32)
        rows[:, :width] = top[:, :width]
        self.table[ids] = rows

    def successors(self, token: int) -> list[int]:
        """Known successors of ``token``, best first (empty when never observed)."""
        if token < 0 or token >= len(self.table):
            return []
        row = self.table[token]
        return [int(t) for t in row if t >= 0]

    def nbytes(self) -> int:
        return int(self.table.nbytes)


def add_recycled_branches(
    tree: DraftTree, root_token: int, table: RecyclingTable, rank_probs: Sequence[float], budget: int
) -> DraftTree:
    """Anisotropic tree: under the root and every node, add missing recycled successors.

    The child of rank ``r`` of a node with path probability ``P`` gets ``P * rank_probs[r]``.
    Nodes are added best first until the tree holds ``budget`` nodes; the result stays in
    topological order (new nodes are appended after their parents).
    """
    out = DraftTree(list(tree.tokens), list(tree.parents), list(tree.probs), list(tree.sources))
    if budget <= len(out):
        return out
    children: dict[int, set[int]] = {}
    for i, p in enumerate(out.parents):
        children.setdefault(p, set()).add(out.tokens[i])
    candidates: list[tuple[float, int, int]] = []  # (prob, parent, token)
    for parent, token, prob in [(-1, root_token, 1.0)] + [
        (i, out.tokens[i], out.probs[i]) for i in range(len(out))
    ]:
        taken = children.get(parent, set())
        for rank, succ in enumerate(table.successors(token)[: len(rank_probs)]):
            if succ not in taken:
                candidates.append((prob * rank_probs[rank], parent, succ))
    candidates.sort(key=lambda c: -c[0])
    for prob, parent, succ in candidates[: budget - len(out)]:
        if prob <= 0:
            break
        out.tokens.append(succ)
        out.parents.append(parent)
        out.probs.append(prob)
        out.sources.append(int(Source.RECYCLED))
    return out
