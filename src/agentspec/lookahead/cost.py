"""What one verification forward costs: ``c(k)``, seconds of a forward over ``k`` tree tokens.

:class:`CostCurve` is piecewise linear between measured points and kept fresh from observed step
times (EMA). An engine measures its own curve once per model, dtype, device and thread count and
caches it (:meth:`CostCurve.cached`); the default points below are a fixed reference for tests and
the teacher-forced simulator.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agentspec.config import agentspec_home

logger = logging.getLogger(__name__)

# tree sizes measured on the running machine: the step from 1 to 2 tokens is large on CPUs
# (matrix-vector -> matrix-matrix kernels), so it must be measured, not interpolated
DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)
# the default model (SmolLM2-135M-Instruct), fp32, 2 CPU threads, after a 1000-token context, medians
# of 7: (k tree tokens, seconds). The reference the simulator's modelled speedups are computed on.
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
