"""Speculation statistics: the counters every report shares, and the rates derived from them.

The rates are defined here and nowhere else: the engine's per-call :class:`SpecStats`, the
teacher-forced simulation's report and the replay/benchmark tables all inherit
:class:`DraftCounts`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TypeVar

C = TypeVar("C", bound="DraftCounts")


@dataclass
class DraftCounts:
    """Output, step and draft counters, with the rates derived from them.

    Terms: a *step* is one target forward in the decode loop (one verification pass);
    *drafted* tokens were proposed by drafters and checked; *accepted* ones matched the
    target; every step also commits one *bonus* token from the target itself. Output tokens
    are all tokens generated (in live generation the first one comes out of the prefill).
    """

    output_tokens: int = 0
    steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_by_source: dict[str, int] = field(default_factory=dict)  # drafter tree name -> accepted tokens

    @property
    def tokens_per_step(self) -> float:
        """Output tokens per verification step (about 1.0 = no gain from speculation)."""
        return self.output_tokens / self.steps if self.steps else 0.0

    @property
    def drafted_per_step(self) -> float:
        return self.drafted_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens that were accepted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def hit_rate(self) -> float:
        """Share of output tokens that came from accepted drafts (the cache hit rate)."""
        return self.accepted_tokens / self.output_tokens if self.output_tokens else 0.0

    def add(self: C, other: DraftCounts) -> C:
        """Accumulate ``other``'s numeric counters (the fields both have) into ``self``; returns ``self``."""
        mine = {f.name for f in fields(self)}
        for name in counter_names(other):
            if name in mine:
                setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, value in other.accepted_by_source.items():
            self.accepted_by_source[key] = self.accepted_by_source.get(key, 0) + value
        return self

    def rates(self) -> dict[str, float]:
        """The derived rates by name (for JSON reports)."""
        return {"tokens_per_step": self.tokens_per_step, "drafted_per_step": self.drafted_per_step,
                "acceptance_rate": self.acceptance_rate, "hit_rate": self.hit_rate}


def counter_names(counts: DraftCounts | type[DraftCounts]) -> tuple[str, ...]:
    """Names of the numeric (summable) counters of a counts class or object."""
    return tuple(f.name for f in fields(counts)
                 if isinstance(f.default, (int, float)) and not isinstance(f.default, bool))


@dataclass
class SpecStats(DraftCounts):
    """Counters of one generation (or a sum of generations)."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually computed (the rest came from the prefix cache)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (EOS or stop string) | "length" | "interrupted"

    @property
    def decode_tokens_per_second(self) -> float:
        return self.output_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """Plain dict of counters plus the derived rates (JSON- and msgpack-friendly)."""
        return asdict(self) | self.rates() | {"decode_tokens_per_second": self.decode_tokens_per_second}

    @classmethod
    def from_dict(cls, d: dict) -> SpecStats:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
