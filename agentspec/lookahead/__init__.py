"""Adaptive lookahead: the cost of a verification forward and which draft tree pays for itself."""

from agentspec.lookahead.policy import AcceptanceCalibrator, CostCurve, LookaheadPolicy

__all__ = ["AcceptanceCalibrator", "CostCurve", "LookaheadPolicy"]
