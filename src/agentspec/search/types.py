"""What a tree search returns: ranked finished trajectories and the search's statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

# scorer(prompt, steps) -> float: the prompt text and the trajectory's steps so far (texts); higher is better.
# It may raise or return NaN: that leaf is dropped and counted, and the search goes on.
Scorer = Callable[[str, Sequence[str]], float]


@dataclass
class Trajectory:
    """One finished trajectory: its text, tokens, final score and the score after each step."""

    text: str
    token_ids: list[int]
    score: float
    step_scores: list[float] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)  # the text of each step (they join to ``text``)
    finish_reason: str = "stop"  # "stop" (EOS) | "length" (max_new_tokens or the context window)


@dataclass
class SearchStats:
    """Counters of one search.

    KV is counted in token rows held by the search's shared tree (prompt included) after each
    search step; ``copy_*`` is what a copy of the prompt and path per live trajectory (what
    batched sampling holds) would have held at the same moments.
    """

    width: int = 0
    policy: str = ""
    prompt_tokens: int = 0
    forwards: int = 0  # model forwards (prefill chunks included)
    search_steps: int = 0  # selection rounds
    generated_tokens: int = 0  # tokens committed to trajectories, dropped ones included
    draft_tokens: int = 0  # draft rows verified
    accepted_draft_tokens: int = 0  # generated tokens that came from accepted drafts
    dropped_by_scorer: int = 0  # leaves dropped because the scorer raised or returned NaN
    pruned: int = 0  # leaves the policy did not expand
    kv_peak_tokens: int = 0
    kv_mean_tokens: float = 0.0
    kv_peak_bytes: int = 0
    kv_mean_bytes: float = 0.0
    copy_peak_tokens: int = 0
    copy_mean_tokens: float = 0.0
    copy_peak_bytes: int = 0
    copy_mean_bytes: float = 0.0
    kv_bytes_per_token: int = 0
    wall_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of wall time, across all trajectories."""
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.forwards if self.forwards else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(tokens_per_second=self.tokens_per_second, tokens_per_forward=self.tokens_per_forward)
        return d


@dataclass
class SearchResult:
    """Finished trajectories, best first, and the statistics of the search."""

    trajectories: list[Trajectory]
    stats: SearchStats

    @property
    def best(self) -> Trajectory | None:
        return self.trajectories[0] if self.trajectories else None
