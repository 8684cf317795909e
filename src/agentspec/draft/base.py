"""The drafter contract: propose a token tree, then learn from what the target accepted.

The verifier never knows which drafter produced a tree (vLLM / transformers style).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol


class Source(IntEnum):
    """Where a drafted token came from; used for per-source acceptance statistics."""

    REQUEST = 0  # suffix tree of the live request (its prompt and output so far)
    SESSION = 1  # suffix tree of the session's earlier calls
    GLOBAL = 2  # suffix tree of all outputs of all sessions
    GRAMMAR = 4  # forced by the output's grammar (constrained decoding), not guessed (3 was Token Recycling)


SOURCE_NAMES = {s: s.name.lower() for s in Source}  # the keys of SpecStats.accepted_by_source


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


def children_index(tree: DraftTree) -> list[dict[int, int]]:
    """``children[1 + i][token] = j``: child node j of node i holding ``token``; slot 0 = root."""
    children: list[dict[int, int]] = [{} for _ in range(len(tree) + 1)]
    for j, (p, tok) in enumerate(zip(tree.parents, tree.tokens)):
        children[p + 1][tok] = j
    return children


def acceptance_walk(tree: DraftTree, next_token: Callable[[int], int | None]) -> tuple[list[int], int | None]:
    """Walk ``tree`` from the root along the target's tokens: the accepted nodes and the token after them.

    ``next_token(slot)`` is the target's token after slot ``slot`` (0 = the root, ``1 + i`` = node
    ``i``), or ``None`` when it has none. The walk moves to the child holding that token and stops at
    the first slot where no child does. Returns (accepted node indices, root first; the last token
    ``next_token`` gave: the bonus token, or ``None``). Greedy and sampling verification and the
    teacher-forced simulator all accept through this walk.
    """
    children = children_index(tree)
    accepted: list[int] = []
    slot = 0
    while (token := next_token(slot)) is not None and (child := children[slot].get(token)) is not None:
        accepted.append(child)
        slot = child + 1
    return accepted, token


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


@dataclass
class History:
    """Finished calls read from a :class:`SessionHistory`, oldest first."""

    calls: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (prompt ids, output ids)
    cursor: int = 0  # the newest record read: pass it back as ``after`` to get only what came later
    replace: bool = False  # the calls replace all the caller loaded before (it could not be told what is new)


class SessionHistory(Protocol):
    """Finished calls kept outside the drafter (a store other processes write to as well).

    The drafter holds a tree and a cursor per session (and one for the global tree): it loads what it
    does not hold, and before each request reads what was recorded since.
    """

    def calls(self, session_id: str | None, after: int | None, max_tokens: int) -> History:
        """The finished calls of ``session_id``; ``None`` means the outputs of all sessions (prompts empty).

        ``after=None`` (the caller holds nothing yet): the newest calls whose new tokens fit
        ``max_tokens``. Else the calls recorded after cursor ``after``, less those the caller learnt
        live. Raises ``TokenizerMismatchError`` (a ``StoreError``) for a session written by another
        tokenizer, before any of its tokens are returned.
        """

