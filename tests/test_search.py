"""Tree search on a tiny random Llama: shared KV (no copy, freed on prune), exact outputs, errors."""

from __future__ import annotations

import math
import random

import pytest
import torch
from agentspec.kernels.attention import attention_available
from doubles import tiny_llama

from agentspec.config import SamplingParams, SpeculationConfig
from agentspec.draft.base import DraftTree
from agentspec.engine import Engine
from agentspec.engine import search as search_module
from agentspec.engine.search import SearchConfig, TreeSearch
from agentspec.engine.verify import process_logits

PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7]


@pytest.fixture(scope="module")
def peaky_model():
    """A tiny random Llama with larger weights: peaked next-token distributions, so outputs repeat
    (drafts get accepted) and a chi-square test has few outcomes."""
    return tiny_llama(init=0.3)


@pytest.fixture(scope="module")
def engine(peaky_model, default_tokenizer):
    return Engine(peaky_model, default_tokenizer, speculation=SpeculationConfig(prefix_cache_bytes=0))


class Probe(TreeSearch):
    """A search that checks the KV tree's invariants after every forward and selection."""

    checks = 0

    def _record_kv(self, leaves):
        super()._record_kv(leaves)
        nodes, slots = set(), []
        for node in [leaf.node for leaf in leaves] + [self.root]:
            while node is not None and node not in nodes:
                nodes.add(node)
                slots += node.slots
                node = node.parent
        # every row in the pool belongs to exactly one node on a live path: shared, never copied, no leak
        assert len(slots) == len(set(slots)) == self.pool.num_used
        # each live trajectory's path holds exactly its context's rows (all but the pending token)
        for leaf in leaves:
            assert leaf.node.path_slots().numel() == leaf.length - 1
        Probe.checks += 1


def run_probe(engine, **kwargs) -> tuple[Probe, object]:
    config = SearchConfig(**kwargs)
    search = Probe(engine, list(PROMPT), "prompt", config)
    result = search.run()
    return search, result


@pytest.mark.parametrize("policy", ["ets", "rebase", "beam", "best_of_n"])
def test_kv_is_shared_on_fork_and_freed_on_prune(engine, policy):
    Probe.checks = 0
    search, result = run_probe(engine, width=6, policy=policy, max_new_tokens=24, max_step_tokens=6, seed=3)
    assert Probe.checks > 5
    assert len(result.trajectories) >= 1
    assert search.pool.num_used == 0 and search.pool.num_free == search.pool.capacity  # all rows back
    stats = result.stats
    assert stats.kv_peak_tokens <= stats.copy_peak_tokens
    assert stats.kv_mean_tokens < stats.copy_mean_tokens  # the prompt is held once, not once per trajectory
    if policy in ("beam", "rebase", "ets"):
        assert stats.pruned > 0


@pytest.mark.parametrize("draft", [False, True])
def test_greedy_trajectories_equal_plain_greedy_decoding(engine, draft):
    result = engine.search(PROMPT, width=3, policy="rebase", temperature=0.0, max_new_tokens=20,
                           max_step_tokens=5, draft=draft)
    plain = engine.generate(PROMPT, max_new_tokens=20, speculate=False)
    assert len(result.trajectories) == 3
    assert all(t.token_ids == plain.token_ids for t in result.trajectories)
    assert result.stats.forwards < 3 * 20  # all leaves share each forward


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16"])
def test_a_16_bit_kv_engine_searches_in_its_own_precision(peaky_model, default_tokenizer, kv_dtype):
    engine = Engine(peaky_model, default_tokenizer, kv_dtype=kv_dtype)  # with its prefix cache: rows go both ways
    for _ in range(2):  # the second search copies the prompt's 16-bit rows from the prefix cache
        result = engine.search(PROMPT, width=2, policy="beam", temperature=0.0, max_new_tokens=12, max_step_tokens=4)
        assert result.stats.kv_peak_bytes == result.stats.kv_peak_tokens * engine.num_layers * 2 * 2 * (
            peaky_model.config.num_key_value_heads * peaky_model.config.head_dim)  # 2 bytes a value
    plain = engine.generate(PROMPT, max_new_tokens=12, speculate=False)
    assert result.trajectories[0].token_ids[:4] == plain.token_ids[:4]



@pytest.mark.parametrize("attention", ["split", "gather", "pool", "split-torch", "gather-torch"])
def test_every_row_of_the_shared_forward_equals_its_own_forward(engine, peaky_model, attention, monkeypatch):
    """Leaves at different depths of the KV tree, with random draft trees, in one forward: each row's
    logits equal a plain forward of that row's own context (prompt + path + draft path). ``-torch``:
    torch's fused kernel over gathered rows instead of the compiled kernel reading the pool in place."""
    attention, _, torch_only = attention.partition("-")
    kernel_calls = []
    if torch_only:
        monkeypatch.setattr(search_module, "kernel_fits", lambda q, k: False)
    else:
        real = search_module.tree_attention_rows
        monkeypatch.setattr(search_module, "tree_attention_rows",
                            lambda *args, **kwargs: kernel_calls.append(1) or real(*args, **kwargs))
    rng = random.Random(0)
    seen = []

    class Recorder(TreeSearch):
        def __init__(self, *args):
            self.attention = attention
            super().__init__(*args)
            self.cost = lambda k: 1.0  # rows are free: every (never accepted) random draft is verified

        def _draft(self, leaf):
            if leaf.fork > 1:
                return DraftTree()
            tree = DraftTree()
            for _ in range(rng.randint(0, 5)):
                parent = rng.randint(-1, len(tree) - 1)
                tok = rng.randrange(3, 512)
                if any(p == parent and t == tok for p, t in zip(tree.parents, tree.tokens)):
                    continue
                tree.tokens.append(tok), tree.parents.append(parent), tree.probs.append(0.5), tree.sources.append(0)
            return tree

        def _accept(self, leaf, tree, a, slots, targets, logits, lse, hidden, keep):
            context = list(self.prompt_ids) + [t for s in leaf.steps for t in s] + leaf.step
            if len(seen) < 40:
                seen.append((context, tree, logits[a : a + 1 + len(tree)].clone()))
            return super()._accept(leaf, tree, a, slots, targets, logits, lse, hidden, keep)

    config = SearchConfig(width=4, policy="rebase", max_new_tokens=16, max_step_tokens=4, seed=1, temperature=1.0)
    Recorder(engine, list(PROMPT), "p", config).run()
    assert len(seen) == 40 and sum(len(tree) for _, tree, _ in seen) > 40
    for context, tree, rows in seen:
        for r in range(len(tree) + 1):
            path, node = [], r - 1
            while node >= 0:
                path.append(tree.tokens[node])
                node = tree.parents[node]
            with torch.no_grad():
                want = peaky_model(torch.tensor([context + path[::-1]])).logits[0, -1]
            torch.testing.assert_close(rows[r], want, atol=2e-4, rtol=1e-4)
    assert bool(kernel_calls) == (attention != "pool" and not torch_only and attention_available())


def test_sampling_follows_the_model_distribution(engine, peaky_model):
    """Chi-square: the first two tokens of trajectories (forks sampled from one shared row, then drafts
    accepted by sampling) follow the model's exact joint law."""
    from scipy.stats import chisquare

    params = SamplingParams(temperature=0.7)

    def dist(ids):
        with torch.no_grad():
            return process_logits(peaky_model(torch.tensor([ids])).logits[0, -1], params)

    p0 = dist(PROMPT)
    exact, drafts = {}, {}
    for a in torch.topk(p0, 4).indices.tolist():
        p1 = dist(PROMPT + [a])
        ranked = torch.topk(p1, 6).indices.tolist()
        drafts[a] = ranked[1:3]  # draft the 2nd and 3rd most likely: some accepted, some not
        for b in ranked:
            exact[(a, b)] = float(p0[a] * p1[b])

    class Drafting(TreeSearch):
        def _draft(self, leaf):
            toks = drafts.get(leaf.step[0], []) if leaf.generated == 1 and not leaf.fork else []
            return DraftTree(list(toks), [-1] * len(toks), [0.9] * len(toks), [0] * len(toks))

    counts = dict.fromkeys(exact, 0)
    n = accepted = 0
    for seed in range(120):
        config = SearchConfig(width=8, policy="best_of_n", temperature=0.7, max_new_tokens=2, seed=seed)
        result = Drafting(engine, list(PROMPT), "p", config).run()
        accepted += result.stats.accepted_draft_tokens
        for t in result.trajectories:
            n += 1
            key = tuple(t.token_ids[:2])
            counts[key] = counts.get(key, 0) + 1
    assert n == 960
    assert accepted > 50
    keys = [k for k in exact if exact[k] * n >= 5]
    rest = 1.0 - sum(exact[k] for k in keys)
    observed = [counts[k] for k in keys] + [n - sum(counts[k] for k in keys)]
    expected = [exact[k] * n for k in keys] + [rest * n]
    assert chisquare(observed, expected, sum_check=False).pvalue > 1e-3


def test_default_score_is_the_mean_token_log_probability(engine, peaky_model):
    result = engine.search(PROMPT, width=2, policy="rebase", temperature=0.0, max_new_tokens=8, max_step_tokens=3)
    best = result.best
    with torch.no_grad():
        logits = peaky_model(torch.tensor([PROMPT + best.token_ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    want = sum(float(logp[len(PROMPT) - 1 + i, t]) for i, t in enumerate(best.token_ids)) / len(best.token_ids)
    assert best.score == pytest.approx(want, abs=1e-3)
    assert len(best.step_scores) == len(best.steps) == math.ceil(8 / 3)


@pytest.mark.parametrize("bad", ["raise", "nan"])
def test_a_failing_scorer_drops_that_leaf_and_the_search_goes_on(engine, bad):
    calls = []

    def scorer(prompt, steps):
        calls.append(len(steps))
        if len(calls) % 3 == 0:
            if bad == "raise":
                raise RuntimeError("reward model timed out")
            return float("nan")
        return -float(len(steps[-1]))

    result = engine.search(PROMPT, width=6, policy="ets", scorer=scorer, max_new_tokens=16, max_step_tokens=4,
                           seed=0)
    assert result.stats.dropped_by_scorer == sum(1 for i in range(len(calls)) if (i + 1) % 3 == 0)
    assert result.stats.dropped_by_scorer > 0
    assert result.trajectories
    assert all(not math.isnan(t.score) for t in result.trajectories)


@pytest.mark.parametrize("kwargs, name", [
    ({"width": 0}, "width"), ({"policy": "mcts"}, "policy"), ({"step_stop": ""}, "step_stop"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_step_tokens": -1}, "max_step_tokens"),
    ({"temperature": -1.0}, "temperature"), ({"lambda_kv": float("nan")}, "lambda_kv"),
    ({"lambda_cover": -2}, "lambda_cover"), ({"scorer": 3}, "scorer"), ({"width": 2.5}, "width"),
    ({"cluster_distance": -0.1}, "cluster_distance"),
])
def test_bad_arguments_raise_value_errors_naming_them(engine, kwargs, name):
    with pytest.raises(ValueError, match=name):
        engine.search(PROMPT, **kwargs)


def test_the_prompt_rows_come_from_and_go_back_to_the_radix_prefix_cache(peaky_model, default_tokenizer):
    engine = Engine(peaky_model, default_tokenizer)
    first = engine.search(PROMPT + [11, 12], width=3, policy="rebase", temperature=0.0, max_new_tokens=6)
    assert engine.prefix_cache.match_prefix(PROMPT + [11]).length == len(PROMPT) + 1  # all but the last token
    forwards = first.stats.forwards
    again = engine.search(PROMPT + [11, 12], width=3, policy="rebase", temperature=0.0, max_new_tokens=6)
    assert again.stats.forwards == forwards - 1  # no prefill forward: the rows were copied
    assert [t.token_ids for t in again.trajectories] == [t.token_ids for t in first.trajectories]


def test_a_session_drafts_through_the_engine_drafter_and_learns_every_trajectory(peaky_model, default_tokenizer):
    from agentspec.draft.builder import SuffixDrafter

    class Spy(SuffixDrafter):
        started, stopped, proposed = [], [], 0

        def start_request(self, request_id, session_id, prompt_ids):
            assert session_id == "agent-1"
            Spy.started.append(request_id)
            super().start_request(request_id, session_id, prompt_ids)

        def propose(self, request_id, budget):
            Spy.proposed += 1
            return super().propose(request_id, budget)

        def stop_request(self, request_id):
            Spy.stopped.append(request_id)
            super().stop_request(request_id)

    drafter = Spy()
    drafter.add_history("agent-1", PROMPT, [11, 12, 13] * 8)
    engine = Engine(peaky_model, default_tokenizer, drafter=drafter)
    plain = engine.generate(PROMPT, max_new_tokens=12, speculate=False)
    result = engine.search(PROMPT, width=3, policy="rebase", temperature=0.0, max_new_tokens=12,
                           max_step_tokens=4, session="agent-1")
    assert all(t.token_ids == plain.token_ids for t in result.trajectories)
    assert Spy.proposed > 0 and len(Spy.started) > 3
    assert sorted(Spy.started) == sorted(Spy.stopped)  # every request of the search ended


def test_empty_and_too_long_prompts_are_rejected(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.search("   ")
    with pytest.raises(ValueError, match="context window"):
        engine.search([5] * engine.context_window)
