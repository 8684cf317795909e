"""Adaptive lookahead: the cost of a verification forward and which draft tree pays for itself."""

from agentspec.lookahead.cost import CostCurve
from agentspec.lookahead.policy import LookaheadPolicy

__all__ = ["CostCurve", "LookaheadPolicy"]
