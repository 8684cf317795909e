"""Adaptive lookahead: what a forward pass costs and which draft tree to verify.

* :class:`CostCurve` -- ``c(k)``, seconds of one forward over ``k`` tree tokens (root included),
  piecewise linear between measured points, kept fresh from observed step times (EMA).
* :class:`LookaheadPolicy` -- picks the subtree (closed under parents) that maximises
  ``(expected accepted + 1) / c(1 + size)``; the empty tree when plain decoding (``1 / c(1)``)
  wins.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from agentspec.draft.base import DraftTree

logger = logging.getLogger(__name__)

# Default model, fp32, 2 CPU threads, 1000-token context (DESIGN.md): (k tree tokens, seconds)
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
