"""Adaptive lookahead: the cost of a verification forward and which draft tree pays for itself."""

from agentspec.lookahead.policy import CostCurve, LookaheadPolicy

__all__ = ["CostCurve", "LookaheadPolicy"]
