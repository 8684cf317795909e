"""The engine on a CUDA GPU: transformers' decoder with tree steps through the Triton kernel
(tests/test_kernels.py checks the kernel itself), end to end.

Skipped where torch sees no GPU (CI has none). The tiny random Llama and a word-level tokenizer
built in memory keep these tests free of any model file.
"""

from __future__ import annotations

import random

import pytest
import torch
from doubles import tiny_llama
from test_engine import ScriptedDrafter, hf_greedy

from agentspec.config import SpeculationConfig
from agentspec.engine import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 512
PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7]


@pytest.fixture(scope="module")
def word_tokenizer():
    """A 512-token word-level tokenizer (token ``i`` is the word ``w{i}``), eos id 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", bos_token="w1", eos_token="w2")


@pytest.mark.parametrize("seed", range(3))
def test_cuda_engine_greedy_equals_plain_decoding(word_tokenizer, seed):
    model = tiny_llama().cuda()
    rng = random.Random(seed)
    prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(5, 40))]
    with torch.device("cuda"):
        truth = hf_greedy(model, prompt, 40)
    engine = Engine(model, word_tokenizer, drafter=ScriptedDrafter(truth, VOCAB, seed=seed),
                    speculation=SpeculationConfig(adaptive=False, prefix_cache_bytes=0))
    engine.eos_ids = set()
    assert engine.forward.name == "hf+triton"
    result = engine.generate(prompt, max_new_tokens=40)
    assert result.token_ids == truth
    assert result.stats.steps < 40  # drafts were accepted through the kernel


def test_cuda_engine_matches_the_cpu_engine_and_reuses_prefixes(word_tokenizer):
    """Same weights on both devices, the real suffix drafter: the same greedy text; a repeated
    request on CUDA reuses its prefix and drafts from its own history."""
    outputs = {}
    for device in ("cpu", "cuda"):
        engine = Engine(tiny_llama(init=0.3).to(device), word_tokenizer, speculation=SpeculationConfig(adaptive=False))
        engine.eos_ids = set()
        first = engine.generate(PROMPT * 4, max_new_tokens=48, session="s")
        second = engine.generate(PROMPT * 4, max_new_tokens=48, session="s")
        assert second.token_ids == first.token_ids
        outputs[device] = (first.token_ids, second.stats)
    assert outputs["cuda"][0] == outputs["cpu"][0]
    assert outputs["cuda"][1].steps < 48  # the second call drafted from the first


def test_cuda_engine_sampling_is_seeded_and_runs_the_kernel(word_tokenizer):
    engine = Engine(tiny_llama(init=0.3).cuda(), word_tokenizer, speculation=SpeculationConfig(adaptive=False))
    engine.eos_ids = set()
    a = engine.generate(PROMPT * 3, max_new_tokens=32, temperature=0.8, seed=7, session="a")
    b = engine.generate(PROMPT * 3, max_new_tokens=32, temperature=0.8, seed=7, session="b")
    assert len(a.token_ids) == 32 and a.token_ids == b.token_ids


def test_cuda_search_greedy_trajectories_equal_plain_greedy(word_tokenizer):
    engine = Engine(tiny_llama(init=0.3).cuda(), word_tokenizer,
                    speculation=SpeculationConfig(adaptive=False, prefix_cache_bytes=0))
    result = engine.search(PROMPT, width=4, policy="rebase", temperature=0.0, max_new_tokens=20, max_step_tokens=5)
    plain = engine.generate(PROMPT, max_new_tokens=20, speculate=False)
    assert len(result.trajectories) == 4
    assert all(t.token_ids == plain.token_ids for t in result.trajectories)
    assert result.stats.forwards < 4 * 20
