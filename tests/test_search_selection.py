"""Search selection algorithms: REBASE allocation, beam, ETS's integer program against brute force."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from agentspec.draft.base import DraftTree
from agentspec.search import (
    Candidate,
    allocate,
    beam_allocation,
    cluster_steps,
    ets_keep,
    rebase_allocation,
    split_draft_budget,
)


def test_rebase_allocation_follows_the_softmax_in_score_order():
    scores = [0.0, -0.2, -1.0]
    n = rebase_allocation(scores, 8, temperature=0.2)
    w = [math.exp(s / 0.2) for s in scores]
    first = math.ceil(8 * w[0] / sum(w))
    second = math.ceil((8 - first) * w[1] / (w[1] + w[2]))
    assert n == [first, second, 8 - first - second]
    assert sum(n) == 8


@pytest.mark.parametrize("seed", range(20))
def test_rebase_hands_out_exactly_the_width(seed):
    rng = random.Random(seed)
    scores = [rng.uniform(-3, 0) for _ in range(rng.randint(1, 12))]
    width = rng.randint(0, 20)
    n = rebase_allocation(scores, width)
    assert sum(n) == width  # every unit is handed out
    best = max(range(len(scores)), key=scores.__getitem__)
    assert n[best] == max(n)


def test_beam_keeps_the_top_leaves_with_even_shares():
    assert beam_allocation([0.1, 0.5, 0.3, 0.0, 0.2], 8) == [0, 4, 4, 0, 0]
    assert beam_allocation([0.1, 0.5, 0.3], 9) == [3, 3, 3]  # ceil(9/4) = 3 beams
    assert sum(beam_allocation([0.0] * 10, 16)) == 16


def test_best_of_n_never_prunes():
    assert allocate("best_of_n", [Candidate(-5.0), Candidate(0.0)], 2) == [1, 1]


def test_clusters_group_equal_directions():
    e = [np.array([1.0, 0.0]), np.array([2.0, 0.01]), np.array([0.0, 1.0])]
    labels = cluster_steps(e)
    assert labels[0] == labels[1] != labels[2]
    assert cluster_steps([np.ones(3), np.ones(3)]) == [0, 0]


def _objective(x, weights, ancestors, leaf_tokens, node_tokens, clusters, lambda_kv, lambda_cover):
    nodes = sorted({j for path in ancestors for j in path})
    total = sum(leaf_tokens) + sum(node_tokens[j] for j in nodes)
    kept_nodes = {j for i in x for j in ancestors[i]}
    kv = (sum(node_tokens[j] for j in kept_nodes) + sum(leaf_tokens[i] for i in x)) / total
    k = max(clusters) + 1
    covered = len({clusters[i] for i in x})
    return sum(weights[i] for i in x) - lambda_kv * kv + lambda_cover / k * covered


@pytest.mark.parametrize("seed", range(60))
def test_ets_integer_program_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 8)
    node_tokens = {j: rng.randint(1, 60) for j in range(rng.randint(1, 6))}
    # a random forest of step nodes; each leaf hangs under one node with that node's ancestors
    parent = {j: (rng.choice(range(j)) if j and rng.random() < 0.7 else None) for j in node_tokens}

    def path(j):
        return (*path(parent[j]), j) if parent[j] is not None else (j,)

    ancestors = [path(rng.choice(list(node_tokens))) if rng.random() < 0.9 else () for _ in range(n)]
    leaf_tokens = [rng.randint(1, 40) for _ in range(n)]
    raw = [rng.random() for _ in range(n)]
    weights = [r / sum(raw) for r in raw]
    clusters = [rng.randint(0, max(0, n // 2)) for _ in range(n)]
    clusters = list(np.unique(clusters, return_inverse=True)[1])
    lambda_kv, lambda_cover = rng.choice([0.0, 1.0, 3.0]), rng.choice([0.0, 1.5])
    args = (weights, ancestors, leaf_tokens, node_tokens, clusters, lambda_kv, lambda_cover)
    chosen = ets_keep(*args)
    best = max(_objective(x, *args) for r in range(1, n + 1) for x in itertools.combinations(range(n), r))
    assert _objective(chosen, *args) == pytest.approx(best, abs=1e-9)


def test_ets_prunes_a_costly_low_weight_branch():
    # leaf 0 and 1 share node 0; leaf 2 alone under a long node 1 with a tiny weight: drop it
    keep = ets_keep([0.5, 0.45, 0.05], [(0,), (0,), (1,)], [5, 5, 5], {0: 10, 1: 200}, None, 1.0, 0.0)
    assert keep == [0, 1]


def test_ets_allocation_reallocates_the_width_over_kept_leaves():
    cands = [Candidate(-0.1, (0,), 5, np.array([1.0, 0.0])), Candidate(-0.15, (0,), 5, np.array([1.0, 0.001])),
             Candidate(-2.0, (1,), 5, np.array([0.0, 1.0]))]
    n = allocate("ets", cands, 8, {0: 10, 1: 400}, lambda_cover=0.0)
    assert n[2] == 0 and sum(n) == 8


def test_ets_prunes_within_clusters_only_where_the_cut_merges_them():
    # four equal leaves in two pairs of near directions (cosine distance ~0.1), each on its own 40-token node:
    # every leaf costs more KV than its weight, so only coverage keeps it; the paper's cut (0.05) puts each
    # leaf in its own cluster and keeps all four, a cut at 0.2 keeps one per pair
    e = [np.array([1.0, 0.0, 0.0]), np.array([1.0, 0.47, 0.0]), np.array([0.0, 0.0, 1.0]), np.array([0.0, 0.47, 1.0])]
    cands = [Candidate(0.0, (i,), 5, e[i]) for i in range(4)]
    nodes = dict.fromkeys(range(4), 40)
    assert sum(v > 0 for v in allocate("ets", cands, 8, nodes, lambda_kv=1.5)) == 4
    coarse = allocate("ets", cands, 8, nodes, lambda_kv=1.5, cluster_distance=0.2)
    assert sum(v > 0 for v in coarse) == 2 and sum(coarse) == 8
    assert (coarse[0] > 0) != (coarse[1] > 0) and (coarse[2] > 0) != (coarse[3] > 0)


def test_a_wider_cluster_cut_merges_near_directions():
    e = [np.array([1.0, 0.0]), np.array([1.0, 0.3]), np.array([0.0, 1.0])]  # 0 and 1: cosine distance ~0.04
    assert len(set(cluster_steps(e, 0.01))) == 3
    assert len(set(cluster_steps(e, 0.2))) == 2


def test_draft_budget_goes_to_the_most_probable_nodes_and_stays_closed_under_parents():
    a = DraftTree([5, 6, 7], [-1, 0, 1], [0.9, 0.8, 0.7], [0, 0, 0])
    b = DraftTree([8, 9], [-1, 0], [0.2, 0.95], [0, 0])  # child prob above its parent's: capped to 0.2

    def cost(k):  # a row costs 0.3 of a forward: the three likely nodes pay, the two at 0.2 do not
        return 1.0 + 0.3 * k

    out = split_draft_budget([a, b], cost)
    assert out[0].tokens == [5, 6, 7]
    assert out[1].tokens == []
    for tree in out:
        tree.check_integrity()
    assert [len(t) for t in split_draft_budget([a, b], lambda k: 1.0)] == [3, 2]  # free rows: take all
    assert [len(t) for t in split_draft_budget([a, b], lambda k: float(k))] == [0, 0]  # linear cost: none pays
    assert sum(len(t) for t in split_draft_budget([a, b], lambda k: 1.0, max_total=2)) == 2
