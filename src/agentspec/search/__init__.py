"""Tree search over reasoning steps: REBASE / ETS / beam / best-of-N selection and the shared draft budget.

Pure algorithms and result types; :mod:`agentspec.engine.search` drives the model.
"""

from agentspec.search.budget import split_draft_budget
from agentspec.search.selection import (
    POLICIES,
    Candidate,
    allocate,
    beam_allocation,
    cluster_steps,
    ets_keep,
    rebase_allocation,
)
from agentspec.search.types import Scorer, SearchResult, SearchStats, Trajectory

__all__ = [
    "POLICIES", "Candidate", "Scorer", "SearchResult", "SearchStats", "Trajectory", "allocate",
    "beam_allocation", "cluster_steps", "ets_keep", "rebase_allocation", "split_draft_budget",
]
