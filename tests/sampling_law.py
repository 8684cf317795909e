"""The exact joint law of three sampled tokens, draft trees over it, and a chi-square against it.

Sampling tests decode three tokens many times through draft trees and compare the outcomes with
the law computed from the model's own distributions (lossless sampling must keep it exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from scipy.stats import chisquare

from agentspec.draft.base import DraftTree

Outcome = tuple[int, int, int]


def support(p: torch.Tensor) -> list[int]:
    """Tokens of non-zero probability, most likely first."""
    return sorted(torch.nonzero(p).flatten().tolist(), key=lambda t: -float(p[t]))


def three_token_law(dist: Callable[[list[int]], torch.Tensor], drafted_ranks: tuple[int, ...]
                    ) -> tuple[dict[Outcome, float], dict[int, DraftTree]]:
    """``exact[(a, b, c)]`` from ``dist(output so far)``, and for each first token ``a`` a draft tree
    holding the second tokens of rank ``drafted_ranks`` (and two third tokens under each)."""
    exact: dict[Outcome, float] = {}
    trees: dict[int, DraftTree] = {}
    p0 = dist([])
    for a in support(p0):
        p1 = dist([a])
        tree = DraftTree()
        for rank_b, b in enumerate(support(p1)):
            p2 = dist([a, b])
            for c in support(p2):
                exact[(a, b, c)] = float(p0[a] * p1[b] * p2[c])
            if rank_b in drafted_ranks:
                tree.tokens.append(b), tree.parents.append(-1), tree.probs.append(0.3), tree.sources.append(0)
                parent = len(tree) - 1
                for c in support(p2)[:2]:
                    tree.tokens.append(c), tree.parents.append(parent), tree.probs.append(0.1)
                    tree.sources.append(0)
        trees[a] = tree
    return exact, trees


def chisquare_pvalue(counts: Mapping[Outcome, int], exact: Mapping[Outcome, float], n: int) -> float:
    """p-value of the observed ``counts`` of ``n`` draws under ``exact``; rare outcomes merged so that
    every bin expects at least 5."""
    keys = sorted(exact, key=lambda k: -exact[k])
    big = [k for k in keys if exact[k] * n >= 5]
    rest = [k for k in keys if exact[k] * n < 5]
    observed = [counts.get(k, 0) for k in big] + ([sum(counts.get(k, 0) for k in rest)] if rest else [])
    expected = [exact[k] * n for k in big] + ([sum(exact[k] for k in rest) * n] if rest else [])
    return float(chisquare(observed, expected, sum_check=False).pvalue)
