"""Logits processors along the draft tree: greedy identity and sampling law against a plain loop."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from sampling_law import chisquare_pvalue, three_token_law
from test_engine import ContextTreeDrafter, ScriptedDrafter, make_engine
from transformers import RepetitionPenaltyLogitsProcessor

from agentspec.config import SamplingParams

PROCESSORS = {
    "repetition": {"repetition_penalty": 4.0},
    "presence": {"presence_penalty": 1.5},
    "frequency": {"frequency_penalty": 2.0},
    "logit_bias": {"logit_bias": {7: 0.3, 300: 0.2}},  # and -100 on plain greedy's first token (in the test)
    "all": {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.7,
            "logit_bias": {"9": 4.0}},  # JSON-style string keys are accepted
}


def processed(model, ids: list[int], output: list[int], opts: dict) -> torch.Tensor:
    """Reference: next-token logits after ``ids`` (``output``: the generated part), processed from scratch."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    for tok, bias in (opts.get("logit_bias") or {}).items():
        logits[int(tok)] += bias
    if opts.get("repetition_penalty", 1.0) != 1.0:  # transformers' processor: prompt and output tokens
        logits = RepetitionPenaltyLogitsProcessor(opts["repetition_penalty"])(torch.tensor([ids]), logits[None])[0]
    for tok, count in Counter(output).items():
        logits[tok] -= opts.get("frequency_penalty", 0.0) * count + opts.get("presence_penalty", 0.0)
    return logits


def plain_greedy(model, prompt: list[int], n: int, opts: dict) -> tuple[list[int], list[float]]:
    out, logprobs = [], []
    for _ in range(n):
        logits = processed(model, prompt + out, out, opts)
        tok = int(logits.argmax())
        logprobs.append(float(torch.log_softmax(logits, -1)[tok]))
        out.append(tok)
    return out, logprobs


@pytest.mark.parametrize("name", sorted(PROCESSORS))
@pytest.mark.parametrize("seed", range(2))
def test_greedy_with_processors_equals_plain_decoding(tiny_model, default_tokenizer, name, seed):
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 512) for _ in range(rng.randrange(5, 30))]
    unprocessed = plain_greedy(tiny_model, prompt, 30, {})[0]
    opts = PROCESSORS[name]
    if name == "logit_bias":
        opts = {"logit_bias": {**opts["logit_bias"], unprocessed[0]: -100.0}}
    truth, truth_logprobs = plain_greedy(tiny_model, prompt, 30, opts)
    engine = make_engine(tiny_model, default_tokenizer, ScriptedDrafter(truth, 512, seed=seed), prefix_cache_bytes=0)
    engine.eos_ids = set()
    result = engine.generate(prompt, max_new_tokens=30, logprobs=3, **opts)
    assert result.token_ids == truth
    assert result.stats.accepted_tokens > 0  # rows of tree nodes decided tokens
    assert [lp.token for lp in result.logprobs] == truth
    assert [lp.logprob for lp in result.logprobs] == pytest.approx(truth_logprobs, abs=1e-4)
    assert all(len(lp.top) == 3 and lp.top[0][1] == pytest.approx(lp.logprob, abs=1e-6) for lp in result.logprobs)
    assert truth != unprocessed  # the processors changed the output (else the test proves nothing)


def test_processors_are_validated():
    for bad in ({"repetition_penalty": 0.0}, {"presence_penalty": 3.0}, {"frequency_penalty": -2.5},
                {"logit_bias": {5: 101.0}}, {"logprobs": 21}):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            SamplingParams(**bad).validate()


def test_sampling_with_processors_matches_plain_distribution(tiny_model, default_tokenizer):
    """Chi-square: three tokens sampled through draft trees with penalties, bias and top-k follow the
    plain law, where each row's penalties come from its own path (token 3's row penalises tokens 1, 2)."""

    from agentspec.engine.verify import process_logits

    opts = {"repetition_penalty": 1.5, "presence_penalty": 0.8, "frequency_penalty": 0.6, "logit_bias": {40: 2.0}}
    params = SamplingParams(temperature=0.9, top_k=4)
    prompt = [11, 42, 99, 7, 5]

    def dist(out):
        return process_logits(processed(tiny_model, prompt + out, out, opts), params)

    exact, trees = three_token_law(dist, drafted_ranks=(0, 1))
    engine = make_engine(tiny_model, default_tokenizer, ContextTreeDrafter(trees), prefix_cache_bytes=0)
    engine.eos_ids = set()
    n = 600
    counts = Counter()
    accepted = 0
    for seed in range(n):
        result = engine.generate(prompt, max_new_tokens=3, temperature=0.9, top_k=4, seed=seed, **opts)
        counts[tuple(result.token_ids)] += 1
        accepted += result.stats.accepted_tokens
    assert accepted > 0.1 * n
    assert set(counts) <= set(exact)
    assert chisquare_pvalue(counts, exact, n) > 1e-3
