"""The default drafter and lookahead policy inside the engine (tiny random model): output unchanged."""

from __future__ import annotations

import torch

from agentspec.config import SpeculationConfig
from agentspec.draft.builder import DrafterConfig, SuffixDrafter
from agentspec.engine import Engine
from agentspec.lookahead import LookaheadPolicy


def test_suffix_drafter_in_engine_keeps_greedy_output(tiny_model, default_tokenizer):
    prompt = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]
    plain = Engine(tiny_model, default_tokenizer, drafter=None, speculation=SpeculationConfig(enabled=False))
    want = plain.generate(prompt, max_new_tokens=24).token_ids
    drafter = SuffixDrafter(DrafterConfig())
    engine = Engine(tiny_model, default_tokenizer, drafter=drafter, policy=LookaheadPolicy(),
                    speculation=SpeculationConfig(prefix_cache_bytes=0))
    for _ in range(2):  # the second call drafts from the session and global trees
        res = engine.generate(prompt, session="s", max_new_tokens=24)
        assert res.token_ids == want
    assert res.stats.accepted_tokens > 0  # the second call repeats the first: drafts are accepted
    assert torch.is_grad_enabled()
