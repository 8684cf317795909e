"""The trajectory-aware draft budget: one forward's rows shared by every live leaf.

Each live leaf brings one row of its own (its last token) and a draft tree whose node
probabilities estimate acceptance. With path probabilities made non-increasing down each tree,
the best set of ``k`` draft rows across all leaves is the ``k`` most probable nodes (each leaf's
pick is then closed under parents), so one sort decides it; ``k`` maximises the expected tokens
per second of the whole step, ``(L + sum of chosen probabilities) / c(L + k)`` for ``L`` leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from agentspec.draft.base import DraftTree


def split_draft_budget(
    trees: Sequence[DraftTree], cost: Callable[[int], float], max_total: int | None = None
) -> list[DraftTree]:
    """Each leaf's subtree to verify, chosen jointly by expected accepted tokens per second."""
    leaves = len(trees)
    nodes: list[tuple[float, int, int]] = []  # (effective probability, leaf, node)
    for leaf, tree in enumerate(trees):
        eff: list[float] = []
        for p, q in zip(tree.parents, tree.probs):
            q = max(0.0, float(q))
            eff.append(min(q, eff[p]) if p >= 0 else q)
            nodes.append((eff[-1], leaf, len(eff) - 1))
    nodes.sort(key=lambda t: (-t[0], t[1], t[2]))  # ties: lower leaf, then lower node (parents first)
    limit = len(nodes) if max_total is None else min(len(nodes), max_total)
    best_k, best_value, gained = 0, leaves / cost(max(1, leaves)), 0.0
    for k in range(1, limit + 1):
        gained += nodes[k - 1][0]
        value = (leaves + gained) / cost(leaves + k)
        if value > best_value:
            best_k, best_value = k, value
    keep: list[list[int]] = [[] for _ in trees]
    for _, leaf, node in nodes[:best_k]:
        keep[leaf].append(node)
    return [tree if len(picked) == len(tree) else tree.subtree(picked) for tree, picked in zip(trees, keep)]
