"""Which leaves of a search tree to expand, and into how many children (pure algorithms).

Every policy maps the scores of the live leaves after a step to ``n_i``, the number of children
leaf ``i`` gets (0 = pruned); the children of one leaf are independent continuations of it.

* **REBASE** (Wu et al. 2024): the width ``W`` is handed out in score order,
  ``n_i = ceil(W' * e^(s_i/T) / sum_j e^(s_j/T))`` over the leaves ``j`` not yet served, ``W'`` the
  width left (it shrinks as it goes, so the total is exactly ``W`` while leaves remain).
* **ETS** (Hooper et al. 2025): REBASE weights ``O_i = n_i / sum n``, then a small integer program
  keeps the leaves that are worth their KV (below, :func:`ets_keep`), then REBASE again over the kept.
* **beam**: the top ``B = ceil(W / 4)`` leaves by score share the width evenly (each beam gets about
  4 children, as search-and-learn's step-level beam search); the rest are pruned.
* **best-of-N**: ``W`` independent samples: every leaf continues alone, nothing is pruned.

A finished trajectory uses up one unit of width: callers pass the width left after those.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

POLICIES = ("ets", "rebase", "beam", "best_of_n")
REBASE_TEMPERATURE = 0.2  # T of the REBASE softmax (the papers' setting)
BEAM_CHILDREN = 4  # children per beam
CLUSTER_DISTANCE = 0.05  # cosine distance at which the average-linkage dendrogram is cut


@dataclass
class Candidate:
    """A live leaf as the selection sees it.

    ``ancestors``: ids of the step nodes on its path (the shared prompt excluded); ``tokens``: KV
    tokens of its own newest step; ``embedding``: a vector of its newest step (for ETS clusters).
    """

    score: float
    ancestors: tuple[int, ...] = ()
    tokens: int = 1
    embedding: np.ndarray | None = None


def rebase_allocation(scores: Sequence[float], width: int, temperature: float = REBASE_TEMPERATURE) -> list[int]:
    """``n_i`` children per leaf: the width handed out by a softmax over scores, best first."""
    if width < 0 or temperature <= 0:
        raise ValueError(f"expected width >= 0 and temperature > 0, got {width!r}, {temperature!r}")
    n = [0] * len(scores)
    if not scores:
        return n
    s = np.asarray(scores, dtype=np.float64) / temperature
    weights = np.exp(s - s.max())  # the softmax is shift-invariant: no overflow
    order = sorted(range(len(n)), key=lambda i: -s[i])
    left = width
    tail = float(weights.sum())  # sum of e^(s_j/T) over the leaves not yet served
    for i in order:
        if left <= 0:
            break
        share = left * weights[i] / tail if tail > 0 else 0.0
        n[i] = min(left, math.ceil(share - 1e-12))
        left -= n[i]
        tail -= weights[i]
    return n


def beam_allocation(scores: Sequence[float], width: int, children: int = BEAM_CHILDREN) -> list[int]:
    """The top ``ceil(width / children)`` leaves share ``width`` evenly (best first get the rest)."""
    n = [0] * len(scores)
    beams = min(len(scores), math.ceil(width / children)) if width > 0 else 0
    order = sorted(range(len(n)), key=lambda i: -scores[i])[:beams]
    for rank, i in enumerate(order):
        n[i] = width // beams + (rank < width % beams)
    return n


def cluster_steps(embeddings: Sequence[np.ndarray], distance: float = CLUSTER_DISTANCE) -> list[int]:
    """Cluster labels (0..K-1) by average-linkage cosine distance, cut at ``distance``."""
    from scipy.cluster.hierarchy import fcluster, linkage  # deferred: scipy.cluster loads in ~0.2 s

    if len(embeddings) < 2:
        return [0] * len(embeddings)
    x = np.asarray(np.stack(embeddings), dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    dist = np.clip(1.0 - x @ x.T, 0.0, 2.0)[np.triu_indices(len(x), 1)]  # condensed cosine distances
    if not dist.any():
        return [0] * len(x)
    labels = fcluster(linkage(dist, method="average"), t=distance, criterion="distance")
    _, dense = np.unique(labels, return_inverse=True)
    return [int(v) for v in dense]


def ets_keep(
    weights: Sequence[float], ancestors: Sequence[Sequence[int]], leaf_tokens: Sequence[int],
    node_tokens: Mapping[int, int], clusters: Sequence[int] | None, lambda_kv: float = 1.0,
    lambda_cover: float = 1.5,
) -> list[int]:
    """ETS's integer program: which leaves to keep (indices, ascending). Binary variables::

        x_i  keep leaf i (N leaves)      y_j  keep ancestor node j (M nodes)      c_k  cluster k covered (K)
        max  sum O_i x_i - lambda_kv * (sum w_j y_j + sum w_i x_i) / (sum w_j + sum w_i)
             + (lambda_cover / K) * sum c_k
        s.t. y_j <= sum_{i under j} x_i;  y_j >= x_i for i under j;  c_k <= sum_{i in k} x_i;  sum x_i >= 1

    ``w`` are KV tokens (``leaf_tokens[i]``, ``node_tokens[j]``): a node costs what its KV holds.
    Solved with ``scipy.optimize.milp`` (HiGHS).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp  # deferred: scipy.optimize loads in ~0.3 s

    n = len(weights)
    if n == 0:
        return []
    nodes = sorted({j for path in ancestors for j in path})
    col = {j: n + k for k, j in enumerate(nodes)}
    k_count = (max(clusters) + 1) if clusters else 0
    size = n + len(nodes) + k_count
    total = float(sum(leaf_tokens) + sum(node_tokens[j] for j in nodes)) or 1.0
    c = np.zeros(size)  # milp minimises c @ v
    c[:n] = -np.asarray(weights, dtype=np.float64) + lambda_kv * np.asarray(leaf_tokens, dtype=np.float64) / total
    for j in nodes:
        c[col[j]] = lambda_kv * node_tokens[j] / total
    if k_count:
        c[n + len(nodes):] = -lambda_cover / k_count
    rows, lower, upper = [], [], []

    def add(coeffs: dict[int, float], lo: float, hi: float) -> None:
        row = np.zeros(size)
        for idx, v in coeffs.items():
            row[idx] += v
        rows.append(row), lower.append(lo), upper.append(hi)

    under: dict[int, list[int]] = {j: [] for j in nodes}
    for i, path in enumerate(ancestors):
        for j in set(path):
            under[j].append(i)
            add({col[j]: 1.0, i: -1.0}, 0.0, np.inf)  # y_j >= x_i
    for j in nodes:
        add({col[j]: 1.0, **{i: -1.0 for i in under[j]}}, -np.inf, 0.0)  # y_j <= sum x_i
    for k in range(k_count):
        members = [i for i, label in enumerate(clusters) if label == k]
        add({n + len(nodes) + k: 1.0, **{i: -1.0 for i in members}}, -np.inf, 0.0)  # c_k <= sum x_i
    add(dict.fromkeys(range(n), 1.0), 1.0, np.inf)  # sum x_i >= 1
    result = milp(c, constraints=LinearConstraint(np.array(rows), lower, upper), integrality=np.ones(size),
                  bounds=Bounds(0, 1))
    if result.x is None:
        raise RuntimeError(f"the ETS integer program found no solution: {result.message}")
    return [i for i in range(n) if result.x[i] > 0.5]


def allocate(
    policy: str, candidates: Sequence[Candidate], width: int, node_tokens: Mapping[int, int] | None = None, *,
    lambda_kv: float = 1.0, lambda_cover: float = 1.5, temperature: float = REBASE_TEMPERATURE,
    cluster_distance: float = CLUSTER_DISTANCE,
) -> list[int]:
    """``n_i`` children for each candidate under ``policy`` with ``width`` units left."""
    scores = [c.score for c in candidates]
    if policy == "best_of_n":
        return [1] * len(candidates)
    if policy == "beam":
        return beam_allocation(scores, width)
    n = rebase_allocation(scores, width, temperature)
    if policy == "rebase" or len(candidates) < 2 or width <= 0:
        return n
    if policy != "ets":
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    total = sum(n)
    embeddings = [c.embedding for c in candidates]
    clusters = None
    if lambda_cover > 0 and all(e is not None for e in embeddings):
        clusters = cluster_steps(embeddings, cluster_distance)
    keep = ets_keep([v / total for v in n], [c.ancestors for c in candidates], [c.tokens for c in candidates],
                    node_tokens or {}, clusters, lambda_kv, lambda_cover)
    kept = rebase_allocation([scores[i] for i in keep], width, temperature)
    out = [0] * len(candidates)
    for i, v in zip(keep, kept):
        out[i] = v
    return out
