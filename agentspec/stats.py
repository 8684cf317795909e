"""Speculation statistics of one generation, and their sum over many."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SpecStats:
    """Counters of one generation (or a sum of generations).

    Terms: a *step* is one target forward in the decode loop (one verification pass);
    *drafted* tokens were proposed by drafters and checked; *accepted* ones matched the
    target; every step also commits one *bonus* token sampled from the target itself.
    """

    prompt_tokens: int = 0
    prefill_tokens: int = 0  # prompt tokens actually computed (the rest came from the prefix cache)
    output_tokens: int = 0
    steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_by_source: dict[str, int] = field(default_factory=dict)  # request/session/global/recycled
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (EOS or stop string) | "length" | "interrupted"

    @property
    def tokens_per_step(self) -> float:
        """Output tokens per verification step (1.0 = no gain from speculation)."""
        return self.output_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def hit_rate(self) -> float:
        """Share of output tokens that came from accepted drafts (the cache hit rate)."""
        return self.accepted_tokens / self.output_tokens if self.output_tokens else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.output_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def add(self, other: SpecStats) -> SpecStats:
        """Accumulate ``other`` into ``self`` (returns ``self``)."""
        for name in ("prompt_tokens", "prefill_tokens", "output_tokens", "steps", "drafted_tokens",
                     "accepted_tokens", "prefill_seconds", "decode_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, value in other.accepted_by_source.items():
            self.accepted_by_source[key] = self.accepted_by_source.get(key, 0) + value
        return self

    def to_dict(self) -> dict:
        """Plain dict of counters plus the derived rates (JSON- and msgpack-friendly)."""
        d = asdict(self)
        d.update(tokens_per_step=self.tokens_per_step, acceptance_rate=self.acceptance_rate,
                 hit_rate=self.hit_rate, decode_tokens_per_second=self.decode_tokens_per_second)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SpecStats:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})
