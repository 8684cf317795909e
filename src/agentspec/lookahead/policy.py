"""Adaptive lookahead: which draft tree pays for itself.

:class:`LookaheadPolicy` picks the subtree (closed under parents) that maximises the expected
tokens per second of verification on a :class:`~agentspec.lookahead.cost.CostCurve`; the empty
tree when plain decoding (``1 / c(1)``) wins.
"""

from __future__ import annotations

from agentspec.draft.base import DraftTree
from agentspec.lookahead.cost import CostCurve


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
