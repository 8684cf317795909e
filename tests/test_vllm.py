"""agentspec as vLLM's draft source (agentspec.integrations.vllm), on a real vLLM engine (the CPU build).

The engine tests need the `.venv-vllm` environment (``bash scripts/setup_vllm.sh``) and skip, saying
so, without vLLM; they run each engine in its own process (``python -m agentspec.integrations.vllm.arms``),
on a tiny random Llama saved with the default model's tokenizer. The rest runs everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from agentspec.integrations.vllm import best_path
from agentspec.integrations.vllm.plugin import supported_version
from agentspec.stores import open_store

from agentspec.draft.base import DraftTree
from agentspec.draft.builder import SuffixDrafter
from agentspec.sessions import StoreSessions
from agentspec.stats import SpecStats

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: run `bash scripts/setup_vllm.sh`, then "
                                       "`.venv-vllm/bin/python -m pytest -q tests/test_vllm.py`")
K = 8  # num_speculative_tokens
MAX_TOKENS = 48


# ---------------------------------------------------------------------- pure parts (no vLLM)
def test_best_path_follows_the_likeliest_child_and_stops_below_min_prob():
    # root -> a(0.9) -> c(0.8) -> d(0.05);  root -> b(0.1)
    tree = DraftTree(tokens=[10, 11, 12, 13], parents=[-1, -1, 0, 2], probs=[0.9, 0.1, 0.8, 0.05], sources=[0] * 4)
    path = best_path(tree, max_tokens=8, min_prob=0.1)
    assert path.tokens == [10, 12]
    assert path.parents == [-1, 0]
    assert best_path(tree, max_tokens=1, min_prob=0.0).tokens == [10]
    assert best_path(DraftTree(), max_tokens=4, min_prob=0.0).tokens == []


def test_supported_versions_are_the_tested_ones():
    assert supported_version("0.32.0") and supported_version("0.33.1")
    assert not supported_version("0.34.0") and not supported_version("0.3.2")


def test_adopt_hands_a_session_tree_over_without_reusing_sequence_ids():
    donor, drafter = SuffixDrafter(), SuffixDrafter()
    donor.add_history("s", [1, 2, 3], [4, 5, 6, 7], to_global=False)
    drafter.add_history("other", [9], [9, 9], to_global=True)
    drafter.adopt(donor, "s")
    drafter.add_history("s", [1, 2, 3, 4, 5, 6, 7, 8], [4, 5, 6, 7], to_global=False)  # a later call joins the tree
    drafter.start_request("r", "s", [8, 1, 2, 3])
    assert drafter.propose("r", 8).tokens[:4] == [4, 5, 6, 7]
    assert "s" not in donor._sessions  # moved, not shared


# ---------------------------------------------------------------------- the proposer, driven as vLLM's runner does
def fake_runner(rows: dict[str, tuple[int, dict]]) -> SimpleNamespace:
    """What the proposer reads of vLLM's model runner: ``rows`` maps request id -> (prompt length, vllm_xargs)."""
    params = {rid: SimpleNamespace(extra_args=xargs, max_tokens=100, min_tokens=0, stop_token_ids=[], ignore_eos=True,
                                   all_stop_token_ids=set()) for rid, (_, xargs) in rows.items()}
    return SimpleNamespace(
        input_batch=SimpleNamespace(req_ids=list(rows), num_prompt_tokens=np.array([n for n, _ in rows.values()])),
        requests={rid: SimpleNamespace(sampling_params=p) for rid, p in params.items()},
    )


@needs_vllm
def test_proposer_drafts_from_the_stored_session_once_loaded_and_records_finished_calls(tmp_path):
    from agentspec.integrations.vllm import AgentSpecProposer, ProposerSettings
    from agentspec.integrations.vllm.proposer import fingerprint_of

    from agentspec.engine.model import materialize, resolve_model

    tokenizer = str(materialize(resolve_model(None)))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    prompt, output = list(range(10, 60)), list(range(100, 140))
    StoreSessions(open_store(url), fingerprint_of(tokenizer)).record("S", prompt, output, SpecStats())
    config = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=4),
                             model_config=SimpleNamespace(max_model_len=1024, tokenizer=tokenizer))
    proposer = AgentSpecProposer(config, ProposerSettings(store_url=url))
    proposer.load_model(None)
    runner = fake_runner({"r1": (len(prompt), {"agentspec_session": "S"})})
    tokens = np.zeros((1, 1024), dtype=np.int32)
    tokens[0, : len(prompt)] = prompt

    proposer.observe(runner, [])
    assert proposer.propose([[output[0]]], np.array([len(prompt) + 1]), tokens) == [[]]  # S is being read
    assert proposer.loader.flush()
    proposer.observe(runner, [])
    assert proposer.propose([[output[1]]], np.array([len(prompt) + 2]), tokens) == [output[2:6]]
    assert proposer.sessions_loaded == 1

    proposer.observe(runner, ["r1"])  # finished: recorded to the store by the store thread
    assert proposer.loader.flush()
    assert [c.output_ids for c in open_store(url).load_session("S").calls] == [output, output[:2]]

    # no session id: the held session whose newest prompt this one extends, named at its prefill step
    follow_up = prompt + output[:2] + [7, 8, 9]
    runner = fake_runner({"r2": (len(follow_up), {})})
    params = runner.requests["r2"].sampling_params
    new = SimpleNamespace(req_id="r2", prompt_token_ids=follow_up, sampling_params=params)
    proposer.observe(runner, [], [new])
    assert proposer._requests["r2"].session_id == "S"


# ---------------------------------------------------------------------- a real vLLM engine
@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory) -> Path:
    """A tiny random Llama vLLM's CPU attention accepts (head size 64), saved with the default model's
    tokenizer; untied and with wide initial weights, so its greedy outputs do not just repeat."""
    import torch
    from agentspec.integrations.vllm.arms import export_for_vllm
    from transformers import LlamaConfig, LlamaForCausalLM

    from agentspec.engine.model import load_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    saved = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).eval().save_pretrained(saved)
    load_tokenizer().save_pretrained(saved)
    return export_for_vllm(saved, tmp_path_factory.mktemp("tiny-llama-vllm"))


def agent_calls(session: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` calls of an agent loop: each prompt extends the last by a new 40-token message."""
    import random

    rng, context, calls = random.Random(seed), [1], []
    for _ in range(n):
        context = context + [rng.randrange(3, 512) for _ in range(40)]
        calls.append({"session": session, "prompt_ids": list(context), "max_tokens": MAX_TOKENS, "ignore_eos": True})
    return calls


def run_arm(tmp_path: Path, **spec) -> dict:
    path = tmp_path / f"{spec['arm']}-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({"num_speculative_tokens": K, "max_model_len": 1024, **spec}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "agentspec.integrations.vllm.arms", str(path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def accepted_per_step(result: dict, calls: slice = slice(None)) -> float:
    chosen = result["calls"][calls]
    accepted = sum(c["accepted"] for c in chosen)
    return accepted / (sum(len(c["output_ids"]) for c in chosen) - accepted)


def outputs(result: dict) -> list[list[int]]:
    return [c["output_ids"] for c in result["calls"]]


# The engine tests pass load_wait_s (a new request's prefill step waits for its session to be read), so that
# what they pin does not hang on how fast the store thread beats a tiny model's steps; the proposer test above
# checks the default, that a request drafts nothing until its session is read.
@needs_vllm
@pytest.mark.vllm
def test_session_history_from_the_store_drafts_exactly_and_beats_suffix_cold(vllm_model, tmp_path):
    store = f"sqlite:///{tmp_path / 'store.db'}"
    calls = agent_calls("S", 3)
    plain = run_arm(tmp_path, model=str(vllm_model), arm="none", calls=calls, store_url=store, record=True)
    assert all(len(ids) == MAX_TOKENS for ids in outputs(plain))
    ours = run_arm(tmp_path, model=str(vllm_model), arm="agentspec", calls=calls, store_url=store, load_wait_s=60)
    cold = run_arm(tmp_path, model=str(vllm_model), arm="suffix", calls=calls)

    assert outputs(ours) == outputs(plain)  # lossless: the drafts only change how many tokens a step yields
    assert outputs(cold) == outputs(plain)
    assert ours["proposer"]["sessions_loaded"] >= 1
    # the whole session was served before (run A): nearly every token comes from its tree
    assert accepted_per_step(ours) >= 3.0
    assert accepted_per_step(ours) >= 2 * accepted_per_step(cold)
    # run B's finished calls were recorded by the proposer, after run A's, with the same outputs
    loaded = open_store(store).load_session("S")
    assert [c.output_ids for c in loaded.calls] == outputs(plain) * 2
    assert [c.prompt_ids for c in loaded.calls[3:]] == [c["prompt_ids"] for c in calls]


@needs_vllm
@pytest.mark.vllm
@pytest.mark.postgres
def test_a_session_begun_on_one_replica_drafts_from_its_history_on_another(vllm_model, tmp_path):
    url = os.environ.get("AGENTSPEC_TEST_PG_URL")
    if not url:
        pytest.skip("AGENTSPEC_TEST_PG_URL is not set: `source .ci/postgres.sh` starts a throw-away PostgreSQL")
    run = uuid.uuid4()
    session = f"replicas-{run.hex[:8]}"
    calls = agent_calls(session, 2, seed=run.int % 2**32)  # prompts new to the store's global tree too
    replica_a = run_arm(tmp_path, model=str(vllm_model), arm="agentspec", calls=calls, store_url=url, load_wait_s=60)
    assert len(open_store(url).load_session(session).calls) == 2  # recorded by replica A's proposer
    replica_b = run_arm(tmp_path, model=str(vllm_model), arm="agentspec", calls=calls[1:], store_url=url,
                        load_wait_s=60)

    assert outputs(replica_b) == outputs(replica_a)[1:]
    assert replica_b["proposer"]["sessions_loaded"] == 1
    # replica B never served this session: its drafts come from replica A's calls in the store (read at the
    # prefill step: load_wait_s makes the test wait for it, where a server would draft once it is read)
    assert accepted_per_step(replica_b) >= 2.0
    assert accepted_per_step(replica_b) > 2 * accepted_per_step(replica_a, slice(0, 1))
