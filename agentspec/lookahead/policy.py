"""Adaptive lookahead: what a forward pass costs, how often drafts are accepted, which tree to verify.

* :class:`CostCurve` -- ``c(k)``, seconds of one forward over ``k`` tree tokens (root included),
  piecewise linear between measured points, kept fresh from observed step times (EMA).
* :class:`AcceptanceCalibrator` -- maps a drafter's probability estimate and node features to the
  acceptance rate actually observed (online logistic regression).
* :class:`LookaheadPolicy` -- picks the subtree (closed under parents) that maximises
  ``(expected accepted + 1) / c(1 + size)``; the empty tree when plain decoding (``1 / c(1)``)
  wins.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from agentspec.draft.base import DraftTree

logger = logging.getLogger(__name__)

# Default model, fp32, 2 CPU threads, 1000-token context, medians of 7 (measured once): (k tree tokens, seconds)
# tree sizes measured on the running machine: the step from 1 to 2 tokens is large on CPUs
# (matrix-vector -> matrix-matrix kernels), so it must be measured, not interpolated
DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)
FP32_CPU_CURVE: tuple[tuple[int, float], ...] = ((1, 0.065), (8, 0.110), (32, 0.181), (64, 0.296), (128, 0.498))


class CostCurve:
    """``c(k)``: seconds of one verification forward over ``k`` tokens, piecewise linear in ``k``."""

    def __init__(self, points: Sequence[tuple[int, float]] = FP32_CPU_CURVE, ema: float = 0.05) -> None:
        pts = sorted((int(k), float(s)) for k, s in points)
        if not pts or pts[0][0] < 1 or any(s <= 0 for _, s in pts):
            raise ValueError(f"expected points (k >= 1, seconds > 0), got {points!r}")
        if len({k for k, _ in pts}) != len(pts):
            raise ValueError(f"duplicate k in cost points {points!r}")
        self.ks = [k for k, _ in pts]
        self.costs = [s for _, s in pts]
        self.ema = float(ema)

    def __call__(self, k: int) -> float:
        """Interpolated cost; flat below the first point, linear extrapolation above the last."""
        ks, cs = self.ks, self.costs
        if k <= ks[0] or len(ks) == 1:
            return cs[0] if k <= ks[0] else cs[0] * k / ks[0]
        for i in range(1, len(ks)):
            if k <= ks[i] or i == len(ks) - 1:
                k0, k1, c0, c1 = ks[i - 1], ks[i], cs[i - 1], cs[i]
                return c0 + (c1 - c0) * (k - k0) / (k1 - k0)
        raise AssertionError("unreachable")

    def observe(self, k: int, seconds: float) -> None:
        """Nudge the knots around ``k`` towards an observed step time (EMA with weight ``ema``)."""
        if seconds <= 0 or self.ema <= 0:
            return
        ratio = seconds / self(k)
        ks = self.ks
        if k <= ks[0]:
            weights = {0: 1.0}
        elif k >= ks[-1]:
            weights = {len(ks) - 1: 1.0}
        else:
            j = next(i for i, kk in enumerate(ks) if kk >= k)
            w = (ks[j] - k) / (ks[j] - ks[j - 1])
            weights = {j - 1: w, j: 1.0 - w}
        for i, w in weights.items():
            self.costs[i] *= 1.0 + self.ema * w * (min(ratio, 4.0) - 1.0)

    def points(self) -> list[tuple[int, float]]:
        return list(zip(self.ks, self.costs))

    @classmethod
    def measure(cls, forward_fn: Callable[[int], float | None], ks: Sequence[int] = DEFAULT_KS,
                repeats: int = 3) -> CostCurve:
        """Time ``forward_fn(k)``; it may return its own seconds, else it is timed.

        Rounds are interleaved over ``ks`` (load drifts hit every k alike), each k keeps its fastest
        time (a busy machine only ever adds time), and the curve is made non-decreasing in k.
        """
        import time

        forward_fn(ks[0])  # warm-up: first-call allocations are not a cost of k
        best = {k: float("inf") for k in ks}
        for _ in range(repeats):
            for k in ks:
                t0 = time.perf_counter()
                out = forward_fn(k)
                best[k] = min(best[k], float(out) if out else time.perf_counter() - t0)
        points, floor = [], 0.0
        for k in sorted(best):
            floor = max(floor, best[k])
            points.append((k, floor))
        return cls(points)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"points": self.points()}))

    @classmethod
    def load(cls, path: str | Path) -> CostCurve:
        return cls([tuple(p) for p in json.loads(Path(path).read_text())["points"]])

    @classmethod
    def cached(
        cls, key: str, forward_fn: Callable[[int], float | None], ks: Sequence[int] = DEFAULT_KS, repeats: int = 3
    ) -> CostCurve:
        """The curve stored as ``$AGENTSPEC_HOME/cost_curves/<key>.json``, measured once if missing."""
        from agentspec.config import agentspec_home

        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)
        path = agentspec_home() / "cost_curves" / f"{safe}.json"
        if path.is_file():
            try:
                return cls.load(path)
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("ignoring unreadable cost curve %s (%s)", path, exc)
        curve = cls.measure(forward_fn, ks, repeats)
        curve.save(path)
        return curve


CALIBRATION_FEATURES = ("token", "previous", "depth", "rank", "match", "support", "agree", "conflict", "state")
_SHARED_FEATURES = 2  # the first two (token ids) get one weight per value, shared by all sources
_CROSS_STRIDE = 8  # a cross of the token with a small feature: token * 8 + min(value, cap <= 7)
_CROSS_MAX_DEPTH = 3  # token x depth tells depth 0, 1, 2 and 3+ apart


class AcceptanceCalibrator:
    """Online logistic regression from a drafter's estimate and node features to the acceptance rate.

    ``logit(q) = slope[s] * logit(p) + bias[s] + w[s, bin(p)] + sum_i w[i, value_i] + crosses``,
    with ``s`` the source, ``p`` the drafter's estimate and ``features`` small integers in the
    order of :data:`CALIBRATION_FEATURES` (a shorter tuple uses the first ones). Token-id features
    have one weight per id across sources (some tokens are guessed right far more often than
    others); the rest one per source and value. With at least five features, three crosses let a
    token's weight depend on its depth, on the match length and on the source. AdaGrad on the
    log-loss, one step per verified node; the step never shrinks below
    ``learning_rate / sqrt(max_sq_grad)``, so it keeps following a drifting workload. A fresh
    calibrator returns the estimate itself (slope 1, other weights 0).

    The compiled drafting core (``_suffix_core.Scorer``) implements the same model, operation for
    operation; this class is its specification.
    """

    def __init__(self, learning_rate: float = 0.1, max_sq_grad: float = 100.0, num_bins: int = 10) -> None:
        self.learning_rate = float(learning_rate)
        self.max_sq_grad = float(max_sq_grad)
        self.num_bins = int(num_bins)
        self._w: dict[tuple[int, int, int], float] = {}
        self._g: dict[tuple[int, int, int], float] = {}
        self.updates = 0  # verified nodes learned from
        self.accepted = 0  # ... of which accepted

    def _keys(self, source: int, prob: float, features: Sequence[int]) -> list[tuple[int, int, int]]:
        """Weight keys ``(group, source or -1, value)``; group 0 is the slope, 1 the bias, 2 the bin."""
        source = int(source)
        b = min(max(int(prob * self.num_bins), 0), self.num_bins - 1)
        keys = [(0, source, 0), (1, source, 0), (2, source, b)]
        features = features[: len(CALIBRATION_FEATURES)]
        for i, value in enumerate(features):
            keys.append((3 + i, -1 if i < _SHARED_FEATURES else source, int(value)))
        if len(features) >= 5:  # crosses: token x depth, token x match (shared), token x source
            token, depth, match = int(features[0]), int(features[2]), int(features[4])
            n = len(CALIBRATION_FEATURES)
            keys.append((3 + n, -1, token * _CROSS_STRIDE + min(depth, _CROSS_MAX_DEPTH)))
            keys.append((4 + n, source, token))
            keys.append((5 + n, -1, token * _CROSS_STRIDE + min(match, _CROSS_STRIDE - 1)))
        return keys

    @staticmethod
    def _logit(prob: float) -> float:
        p = min(max(float(prob), 1e-3), 1.0 - 1e-3)
        return math.log(p / (1.0 - p))

    def _z(self, keys: list[tuple[int, int, int]], lp: float) -> float:
        w = self._w
        z = w.get(keys[0], 1.0) * lp
        for k in keys[1:]:
            z += w.get(k, 0.0)
        return z

    @staticmethod
    def _sigmoid(z: float) -> float:
        return 0.0 if z < -700.0 else 1.0 / (1.0 + math.exp(-z))

    def predict(self, source: int, prob: float, features: Sequence[int] = ()) -> float:
        """Calibrated acceptance probability of a node estimated at ``prob`` in [0, 1]."""
        lp = self._logit(prob)
        return self._sigmoid(self._z(self._keys(source, prob, features), lp))

    def update(self, source: int, prob: float, features: Sequence[int], accepted: bool) -> None:
        """Record one verified guess (a node whose parent was accepted)."""
        keys = self._keys(source, prob, features)
        lp = self._logit(prob)
        g = self._sigmoid(self._z(keys, lp)) - (1.0 if accepted else 0.0)
        w, sq, lr, cap = self._w, self._g, self.learning_rate, self.max_sq_grad
        for j, k in enumerate(keys):
            grad = g * lp if j == 0 else g
            acc = sq.get(k, 0.01) + grad * grad
            if acc > cap:
                acc = cap
            sq[k] = acc
            w[k] = w.get(k, 1.0 if j == 0 else 0.0) - lr * grad / math.sqrt(acc)
        self.updates += 1
        self.accepted += bool(accepted)

    def to_dict(self) -> dict[str, float]:
        """``{"group/source/value": weight}`` (for inspection)."""
        return {"/".join(map(str, k)): v for k, v in self._w.items()}


class LookaheadPolicy:
    """Prune a draft tree to the subtree worth verifying.

    ``objective="ratio"`` maximises ``(expected accepted + 1) / c(1 + size)`` step by step.
    ``objective="rate"`` (default) maximises the long-run rate ``sum(accepted + 1) / sum(c)``:
    by Dinkelbach's argument each step then maximises ``(E + 1) - rate * c(1 + size)``, where
    ``rate`` is the running ratio of expected tokens to cost over recent steps (an EMA, starting
    at plain decoding's ``1 / c(1)``). A step with weak drafts then drafts less than its own
    best ratio would, and a step with strong drafts more.
    """

    def __init__(self, cost: CostCurve | None = None, max_tokens: int | None = None,
                 objective: str = "rate", ema: float = 0.02) -> None:
        if objective not in ("ratio", "rate"):
            raise ValueError(f"objective must be 'ratio' or 'rate', got {objective!r}")
        self.cost = cost or CostCurve()
        self.max_tokens = max_tokens
        self.objective = objective
        self.ema = float(ema)
        self._tokens = 1.0  # EMA of expected tokens per step
        self._seconds = self.cost(1)  # EMA of modelled seconds per step
        self._cost_table: tuple = (None, [])

    @property
    def rate(self) -> float:
        """Running expected tokens per second of the selected trees."""
        return self._tokens / self._seconds

    @classmethod
    def for_engine(cls, engine) -> LookaheadPolicy:
        """A policy with the engine's cost curve, measured once per model/dtype/device and cached."""
        import torch

        dtype = getattr(engine, "quantization", None) or str(engine.dtype).replace("torch.", "")
        # v3: the lean forward and the GGUF-block kernel changed the curve; bump when the forward changes again
        key = f"{engine.model_name}-{dtype}-{engine.device}-t{torch.get_num_threads()}-v3"
        return cls(CostCurve.cached(key, engine.forward_cost))

    def select(self, tree: DraftTree) -> DraftTree:
        """The best subtree closed under parents (maybe empty).

        Path probabilities are made non-increasing (``p_i <- min(p_i, p_parent)``); then for each
        size ``k`` the best subtree is the ``k`` most probable nodes, so one sort decides it.
        """
        n = len(tree)
        eff: list[float] = []
        for p, q in zip(tree.parents, tree.probs):
            q = float(q) if q > 0.0 else 0.0
            if p >= 0 and eff[p] < q:
                q = eff[p]
            eff.append(q)
        order = sorted(range(n), key=eff.__getitem__, reverse=True)  # stable: ties keep index order
        limit = n if self.max_tokens is None else min(n, self.max_tokens)
        rate = self.rate
        costs = self._costs(limit + 1)
        best_k, best_e, gained = 0, 0.0, 0.0
        if self.objective == "rate":  # (E + 1) - rate * c(1 + k), inlined: this runs every step
            best_value = 1.0 - rate * costs[1]
            for k in range(1, limit + 1):
                gained += eff[order[k - 1]]
                value = gained + 1.0 - rate * costs[1 + k]
                if value > best_value:
                    best_k, best_e, best_value = k, gained, value
        else:
            best_value = self._value(1.0, costs[1], rate)
            for k in range(1, limit + 1):
                gained += eff[order[k - 1]]
                value = self._value(gained + 1.0, costs[1 + k], rate)
                if value > best_value:
                    best_k, best_e, best_value = k, gained, value
        self._tokens += self.ema * (best_e + 1.0 - self._tokens)
        self._seconds += self.ema * (costs[1 + best_k] - self._seconds)
        if best_k == n:
            return tree
        return tree.subtree(order[:best_k])

    def _costs(self, k_max: int) -> list[float]:
        """``[c(0), ..., c(K)]`` with ``K >= k_max``, recomputed only when the curve changed or is too short."""
        version, table = self._cost_table
        costs = self.cost.costs
        if version != costs or len(table) <= k_max:
            size = max(k_max + 1, len(table), 65)
            self._cost_table = (list(costs), [self.cost(k) for k in range(size)])
        return self._cost_table[1]

    def _value(self, tokens: float, seconds: float, rate: float) -> float:
        return tokens / seconds if self.objective == "ratio" else tokens - rate * seconds

    def observe(self, k: int, seconds: float) -> None:
        """Feed an observed verification time for ``k`` tree tokens into the cost curve."""
        self.cost.observe(k, seconds)
