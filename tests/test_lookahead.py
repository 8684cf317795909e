"""Cost curve and the lookahead tree selection."""

from __future__ import annotations

import itertools
import random

import pytest

from agentspec.draft.base import DraftTree
from agentspec.lookahead import CostCurve, LookaheadPolicy


def test_cost_curve_default_interpolation_and_observe(tmp_path, monkeypatch):
    c = CostCurve()
    assert c(1) == pytest.approx(0.065) and c(8) == pytest.approx(0.110)
    assert c(20) == pytest.approx(0.110 + (0.181 - 0.110) * 12 / 24)
    assert c(256) > c(128) > c(64)
    for _ in range(200):
        c.observe(8, 0.2)
    assert c(8) == pytest.approx(0.2, rel=0.05)
    monkeypatch.setenv("AGENTSPEC_HOME", str(tmp_path))
    calls = []
    curve = CostCurve.cached("m-fp32-cpu", lambda k: calls.append(k) or 0.01 * k, ks=(1, 4))
    again = CostCurve.cached("m-fp32-cpu", lambda k: 1 / 0, ks=(1, 4))  # loaded, not measured
    assert calls and again.points() == curve.points() and curve(4) == pytest.approx(0.04)
    with pytest.raises(ValueError):
        CostCurve([(0, 1.0)])


def _closed(tree: DraftTree, keep) -> bool:
    keep = set(keep)
    return all(tree.parents[i] < 0 or tree.parents[i] in keep for i in keep)


def _random_tree(rng: random.Random, n: int) -> DraftTree:
    tokens, parents, probs = [], [], []
    for i in range(n):
        p = rng.randrange(-1, i)
        tokens.append(i)
        parents.append(p)
        probs.append((probs[p] if p >= 0 else 1.0) * rng.random())
    return DraftTree(tokens, parents, probs, [0] * n)


@pytest.mark.parametrize("seed", range(30))
def test_ratio_selection_is_optimal_by_brute_force(seed):
    rng = random.Random(seed)
    tree = _random_tree(rng, rng.randrange(1, 9))
    cost = CostCurve()
    policy = LookaheadPolicy(cost, objective="ratio")
    best = 1 / cost(1)
    for r in range(1, len(tree) + 1):
        for keep in itertools.combinations(range(len(tree)), r):
            if _closed(tree, keep):
                best = max(best, (sum(tree.probs[i] for i in keep) + 1) / cost(1 + r))
    chosen = policy.select(tree)
    chosen.check_integrity()
    assert (chosen.expected_accepted() + 1) / cost(1 + len(chosen)) == pytest.approx(best)


def test_selection_is_empty_when_plain_decoding_wins_and_full_when_certain():
    policy = LookaheadPolicy(objective="ratio")
    weak = DraftTree([1, 2], [-1, 0], [0.02, 0.01], [0, 0])
    assert len(policy.select(weak)) == 0
    sure = DraftTree([1, 2, 3], [-1, 0, 1], [1.0, 1.0, 1.0], [0, 0, 0])
    assert len(policy.select(sure)) == 3
    rate = LookaheadPolicy()
    assert len(rate.select(weak)) == 0 and len(rate.select(sure)) == 3
    with pytest.raises(ValueError):
        LookaheadPolicy(objective="speed")
