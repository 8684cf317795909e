"""Configuration dataclasses: one per concern, every field documented."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def agentspec_home() -> Path:
    """Root folder for agentspec's caches: ``$AGENTSPEC_HOME`` or ``~/.cache/agentspec``."""
    return Path(os.environ.get("AGENTSPEC_HOME", Path.home() / ".cache" / "agentspec")).expanduser()


TEMPERATURE_FLOOR = 1e-5  # a temperature below it is greedy decoding (dividing by it overflows the logits)
REPETITION_PENALTY_RANGE = (0.01, 10.0)  # outside it a penalised logit can overflow to inf (NaN probabilities)


@dataclass
class SamplingParams:
    """How to pick tokens. ``temperature`` below :data:`TEMPERATURE_FLOOR` (0 included) is greedy decoding."""

    max_new_tokens: int = 256  # upper bound on generated tokens (> 0)
    temperature: float = 0.0  # < 1e-5 (0 included) = greedy; else samples from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling mass in (0, 1]
    top_k: int = 0  # keep only the k most likely tokens; 0 = off
    stop: Sequence[str] = ()  # stop strings; the output is cut before the first one
    seed: int | None = None  # seeds the sampler for reproducible sampling
    repetition_penalty: float = 1.0  # in [0.01, 10]; tokens in prompt or output: logit / rp if > 0 else logit * rp
    presence_penalty: float = 0.0  # in [-2, 2]; subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # in [-2, 2]; subtracted per occurrence in the output
    logit_bias: dict[int, float] | None = None  # token id (in the vocabulary) -> bias in [-100, 100], added
    logprobs: int | None = None  # None = off; k >= 0 = each output token's logprob and the top k (k <= 20)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ``ValueError`` naming the bad field and value (token ids checked against ``vocab_size``)."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise ValueError(f"repetition_penalty must be in [{low}, {high}], got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        self.logit_bias = check_logit_bias(self.logit_bias, vocab_size)
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"top logprobs must be in [0, 20], got {self.logprobs!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)

    @property
    def greedy(self) -> bool:
        """Greedy decoding: temperature 0, or below :data:`TEMPERATURE_FLOOR`."""
        return self.temperature < TEMPERATURE_FLOOR


def check_logit_bias(bias: dict | None, vocab_size: int | None) -> dict[int, float] | None:
    """``{token id: bias}`` with int ids (JSON keys are strings); ``ValueError`` for an id outside
    ``[0, vocab_size)`` or a bias outside ``[-100, 100]``."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r:.40}") from None
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            limit = f"[0, {vocab_size})" if vocab_size is not None else "ids >= 0"
            raise ValueError(f"logit_bias token id {token} is outside the vocabulary {limit}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {value!r} for token {token}")
        out[token] = float(value)
    return out or None


@dataclass
class SpeculationConfig:
    """Speculative decoding settings of an :class:`~agentspec.engine.Engine`."""

    enabled: bool = True  # False = plain one-token-per-step decoding through the same engine
    max_draft_tokens: int = 32  # hard cap on tree nodes verified in one forward pass
    adaptive: bool = True  # prune each tree to maximise (expected accepted + 1) / c(size)
    prefix_cache_bytes: int = 512 * 2**20  # radix prefix-KV cache budget (agentspec.engine.radix); 0 = off
