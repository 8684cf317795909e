"""The compiled drafting core (``agentspec.draft._suffix_core``, C++): suffix trees and the scorer.

* :class:`SuffixTree` -- a depth-limited suffix tree over token sequences (SuffixDecoding): every
  stored sequence contributes all its suffixes, truncated to ``max_depth`` tokens, with per-node
  occurrence counts. ``speculate(context, budget, alpha, beta, min_prob)`` returns the best
  :class:`Draft` over match lengths ``p`` of the context's tail: a best-first tree of at most
  ``min(budget, alpha * p + beta)`` nodes whose path probabilities (``count(child) / count(node)``
  products) stay above ``min_prob``. Appending a token is O(max_depth); ``evict`` drops the oldest
  sequences.
* :class:`Scorer` -- merges the sources' drafts into one trie (a :class:`Proposal`), each node
  described by discrete features (token, previous token, depth, sibling rank, match length,
  support, agreeing sources, conflict, request state) and scored by an online logistic model of
  acceptance (AdaGrad, one update per verified node, learned in ``learn``).

The compiled core is required: the build fails without a C++ compiler. Its pure-Python reference
(``tests/reference/``) is the specification the parity tests hold it to.
"""

from __future__ import annotations

from bisect import bisect_right

try:
    from agentspec.draft._suffix_core import Draft, Proposal, Scorer, SuffixTree
except ImportError as exc:  # an install that skipped the build: say how to get it
    raise ImportError(
        "agentspec's compiled drafting core (agentspec.draft._suffix_core) is not built; reinstall with "
        "`pip install -e .` on a machine with a C++17 compiler and the Python headers"
    ) from exc

__all__ = ["Draft", "Proposal", "Scorer", "SuffixTree", "STATE_EDGES", "state_bucket"]

STATE_EDGES = (1, 4, 12)  # buckets of the tokens accepted at the previous step (the request state feature)


def state_bucket(accepted: int) -> int:
    """The request state feature: bucket of the tokens accepted at the previous step."""
    return bisect_right(STATE_EDGES, accepted)
