"""``n`` completions of one prompt for the chat entry points, as one best-of-N search.

The ``n`` samples share the prompt's KV (held once), advance together in one forward per step
and draft from each other (:meth:`agentspec.engine.Engine.search` with ``policy="best_of_n"``).
Each sample is cut at the first stop string and split into content and tool calls exactly as a
single completion is. Usage: the prompt is counted once, the completion tokens of every sample
are summed (OpenAI's rule for ``n``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .common import PreparedPrompt
from .toolcalls import finish_reason as call_finish_reason


@dataclass
class Choice:
    """One of the ``n`` completions: content and tool calls as :class:`.toolcalls.ToolCallSplitter` gives them."""

    content: str
    tool_calls: list[dict]  # {"id", "name", "arguments": dict}
    invalid_tool_calls: list[dict]
    finish_reason: str  # "stop" | "length" | "tool_calls"
    completion_tokens: int


@dataclass
class Choices:
    """The ``n`` completions, best first (by the model's mean token log-probability), and their usage."""

    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int
    stats: Any  # agentspec.search.SearchStats

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def sample_choices(engine: Any, prepared: PreparedPrompt, n: int, *, session: str | None = None,
                   max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                   seed: int | None = None) -> Choices:
    """``n`` completions of ``prepared`` from one search; ``ValueError`` for what the search cannot do."""
    if top_p != 1.0 or top_k:
        raise ValueError(f"n > 1 samples at a temperature only: top_p must be 1 and top_k 0, got {top_p}, {top_k}")
    result = engine.search(prepared.prompt_ids, width=n, policy="best_of_n", max_new_tokens=max_new_tokens,
                           max_step_tokens=max_new_tokens, temperature=temperature, seed=seed, session=session)
    choices = [_choice(prepared, t.text, len(t.token_ids), t.finish_reason) for t in result.trajectories]
    return Choices(choices, len(prepared.prompt_ids), sum(c.completion_tokens for c in choices), result.stats)


def _choice(prepared: PreparedPrompt, text: str, tokens: int, finish_reason: str) -> Choice:
    cuts = [i for i in (text.find(s) for s in prepared.stop if s) if i >= 0]
    if cuts:
        text, finish_reason = text[:min(cuts)], "stop"
    splitter = prepared.splitter()  # as a streamed completion: the forced prefix is not content
    streamed = splitter.feed(text)
    rest, calls, invalid = splitter.finish(finish_reason)
    return Choice(streamed + rest, calls, invalid, call_finish_reason(calls, finish_reason), tokens)
