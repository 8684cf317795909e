"""Small helpers on token id sequences."""

from __future__ import annotations

from collections.abc import Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):  # the agent-loop case (one prompt extends the last), compared at C speed
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
