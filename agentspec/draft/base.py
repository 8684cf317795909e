"""The drafter contract: propose a token tree, then learn from what the target accepted.

The verifier never knows which drafter produced a tree (vLLM / transformers style).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol


class Source(IntEnum):
    """Where a drafted token came from; used for per-source acceptance statistics."""

    REQUEST = 0  # suffix tree of the live request (its prompt and output so far)
    SESSION = 1  # suffix tree of the session's earlier calls
    GLOBAL = 2  # suffix tree of all outputs of all sessions
    RECYCLED = 3  # Token Recycling successor table
    GRAMMAR = 4  # forced by the output's grammar (constrained decoding), not guessed


SOURCE_NAMES = {s: s.name.lower() for s in Source}


@dataclass
class DraftTree:
    """A tree of guessed tokens hanging off the last committed token (the root, not stored).

    Invariants: all lists have one entry per node; ``parents[i] < i`` (topological order),
    ``-1`` means the root; ``probs[i]`` is the estimated probability that node ``i`` is
    accepted (a path probability, so non-increasing from parent to child); siblings carry
    distinct tokens.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        """Depth of each node (children of the root have depth 1)."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def expected_accepted(self) -> float:
        """Expected number of accepted draft tokens: the sum of path probabilities."""
        return float(sum(self.probs))

    def subtree(self, keep: Sequence[int]) -> DraftTree:
        """The nodes ``keep`` (closed under parents, any order) re-indexed in topological order."""
        keep = sorted(set(keep))
        new_index = {old: new for new, old in enumerate(keep)}
        return DraftTree(
            tokens=[self.tokens[i] for i in keep],
            parents=[-1 if self.parents[i] < 0 else new_index[self.parents[i]] for i in keep],
            probs=[self.probs[i] for i in keep],
            sources=[self.sources[i] for i in keep],
        )

    def check_integrity(self) -> None:
        """Raise ``ValueError`` if an invariant above does not hold."""
        n = len(self.tokens)
        if not (len(self.parents) == len(self.probs) == len(self.sources) == n):
            raise ValueError("tokens, parents, probs and sources must have the same length")
        seen: set[tuple[int, int]] = set()
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}; expected -1 <= parent < {i}")
            if (p, self.tokens[i]) in seen:
                raise ValueError(f"node {i} repeats token {self.tokens[i]} among its siblings")
            seen.add((p, self.tokens[i]))


class Drafter(Protocol):
    """What the engine needs from a drafter; one instance serves many requests and sessions."""

    def start_request(self, request_id: str, session_id: str | None, prompt_ids: Sequence[int]) -> None:
        """Begin a request whose context is ``prompt_ids``."""

    def propose(self, request_id: str, budget: int) -> DraftTree:
        """A tree of at most ``budget`` nodes continuing the request's context (may be empty)."""

    def accept(self, request_id: str, tree: DraftTree, accepted: Sequence[int], new_tokens: Sequence[int]) -> None:
        """Feedback after verification: ``accepted`` are the node indices on the accepted path,
        ``new_tokens`` the tokens committed this step (accepted tokens + the bonus token)."""

    def stop_request(self, request_id: str) -> None:
        """Finish a request: its prompt and output join the session tree, its output the global tree."""

    def add_history(self, session_id: str | None, prompt_ids: Sequence[int], output_ids: Sequence[int],
                    *, to_global: bool = True) -> None:
        """Add a finished call from elsewhere (a store, another process) as ``stop_request`` would;
        ``to_global=False`` leaves the global tree alone (it was loaded separately)."""


class RecyclingDrafter(Drafter, Protocol):
    """A drafter that also learns from the target's logits (Token Recycling).

    Optional: the engine calls ``observe`` only when the drafter has it (``getattr``).
    """

    def observe(self, token_ids: Sequence[int], topk_successor_ids) -> None:
        """``topk_successor_ids[i]`` (int array ``[n, k]``) is the top-k of the target's logits after
        ``token_ids[i]``, for every verified tree node (the root included), accepted or not."""
