"""Integration: lossless speculation on the catalog's agent-grade model, Qwen2.5-Coder-0.5B-Instruct.

Runs where ``agentspec models pull qwen2.5-coder-0.5b-instruct`` was run, and skips, saying so, elsewhere.
The reference is plain greedy decoding of the same weights in the same engine (the GGUF's own blocks on
the block kernel where it is built): speculative output must equal it token for token, on 50 real agent
prompts; and sampled outputs must follow the model's own law (chi-square).
"""

from __future__ import annotations

import pytest
import torch
from sampling_law import chisquare_pvalue, three_token_law
from test_engine import ContextTreeDrafter
from test_fidelity import MAX_NEW, N_PROMPTS, real_prompts

from agentspec import catalog
from agentspec.config import SamplingParams
from agentspec.engine import Engine
from agentspec.engine.verify import process_logits

pytestmark = pytest.mark.model

QWEN = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def qwen():
    if catalog.pulled_path(catalog.CATALOG[QWEN]) is None:
        pytest.skip(f"{QWEN} is not pulled here (agentspec models pull {QWEN})")
    return Engine.from_pretrained(QWEN, store="memory")


def test_greedy_identical_to_plain_decoding_on_50_real_prompts(qwen):
    prompts = real_prompts(qwen.tokenizer)
    assert len(prompts) >= N_PROMPTS
    drafted, differing = 0, []
    for name, ids in prompts[:N_PROMPTS]:
        plain = qwen.generate(ids, max_new_tokens=MAX_NEW, speculate=False)
        ours = qwen.generate(ids, session="fidelity", max_new_tokens=MAX_NEW)
        drafted += ours.stats.drafted_tokens
        if ours.token_ids != plain.token_ids:
            differing.append(name)
    assert drafted > 0, "nothing was drafted: the test did not exercise speculation"
    assert differing == []


def test_sampling_follows_the_models_law(qwen):
    """Chi-square: three tokens sampled through draft trees follow the joint law of the model's own
    distributions (temperature 0.8, top-k 3), computed one forward at a time."""
    params = SamplingParams(temperature=0.8, top_k=3)
    prompt = qwen.tokenizer.encode("def add(a, b):\n    return")

    def dist(out: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return process_logits(qwen.model(torch.tensor([prompt + out])).logits[0, -1].float(), params)

    exact, trees = three_token_law(dist, drafted_ranks=(0, 1))
    drafter, qwen.drafter = qwen.drafter, ContextTreeDrafter(trees)
    eos, qwen.eos_ids = qwen.eos_ids, set()
    try:
        n, accepted = 600, 0
        counts = dict.fromkeys(exact, 0)
        for seed in range(n):
            result = qwen.generate(prompt, max_new_tokens=3, temperature=0.8, top_k=3, seed=seed)
            counts[tuple(result.token_ids)] += 1
            accepted += result.stats.accepted_tokens
    finally:
        qwen.drafter, qwen.eos_ids = drafter, eos
    assert accepted > 0.1 * n
    assert chisquare_pvalue(counts, exact, n) > 1e-3
