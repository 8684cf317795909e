"""The quick-start demo: a short live multi-turn agent session, with and without speculation.

The user and tool turns come from a recorded tau-bench conversation (bundled); every assistant
turn is written live by the model. Each turn runs twice on the same prompt, interleaved: plain
decoding (``speculate=False``) and agentspec (drafts from the session's suffix-tree cache).
Greedy outputs are identical, so both runs see the same conversation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

SAMPLE = "tau_bench_airline_sample.json"


@dataclass
class DemoTurn:
    turn: int
    prompt_tokens: int
    output_tokens: int
    plain_tokens_per_second: float
    spec_tokens_per_second: float
    tokens_per_step: float
    hit_rate: float
    identical: bool
    text: str


def sample_path():
    """The bundled recording the demo plays (a ``Traversable``; a plain path in an installed package)."""
    return resources.files("agentspec.samples").joinpath(SAMPLE)


def sample_conversation() -> list[dict]:
    """The bundled recorded conversation (system, user, assistant, tool messages)."""
    return json.loads(sample_path().read_text())[0]["traj"]


def run_demo(engine, turns: int = 4, max_new_tokens: int = 96, session: str = "demo",
             on_turn: Callable[[DemoTurn], None] | None = None) -> list[DemoTurn]:
    """Play ``turns`` assistant turns live; returns per-turn figures."""
    recorded = sample_conversation()
    messages: list[dict] = []
    results: list[DemoTurn] = []
    for message in recorded:
        if message["role"] != "assistant":
            messages.append(message)
            continue
        if len(results) >= turns:
            break
        plain = engine.generate(messages, max_new_tokens=max_new_tokens, speculate=False)
        spec = engine.generate(messages, session=session, max_new_tokens=max_new_tokens)
        turn = DemoTurn(
            turn=len(results) + 1, prompt_tokens=spec.prompt_tokens, output_tokens=len(spec.token_ids),
            plain_tokens_per_second=plain.stats.decode_tokens_per_second,
            spec_tokens_per_second=spec.stats.decode_tokens_per_second,
            tokens_per_step=spec.stats.tokens_per_step, hit_rate=spec.stats.hit_rate,
            identical=plain.token_ids == spec.token_ids, text=spec.text,
        )
        results.append(turn)
        if on_turn:
            on_turn(turn)
        # the model's own answer continues the conversation (a live agent loop)
        messages.append({"role": "assistant", "content": spec.text})
    return results
