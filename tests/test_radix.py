"""Radix prefix cache: split/match/insert against a brute-force model, LRU eviction, locks, the pool."""

from __future__ import annotations

import random

import pytest
import torch

from agentspec.config import SpeculationConfig
from agentspec.engine import Engine, radix
from agentspec.engine.kvcache import TreeKVCache
from agentspec.engine.radix import KVPool, RadixCache

LAYERS, HEADS, DIM = 2, 2, 4


def make_cache(capacity: int = 1000) -> RadixCache:
    return RadixCache(KVPool(LAYERS, HEADS, DIM, capacity))


class BruteForce:
    """The cache's contract without a tree: every cached prefix -> the slot of its last token."""

    def __init__(self) -> None:
        self.slot_of: dict[tuple[int, ...], int] = {}

    def insert(self, tokens, slots) -> int:
        already = 0
        for i in range(len(tokens)):
            key = tuple(tokens[: i + 1])
            if key in self.slot_of:
                already = i + 1
            else:
                self.slot_of[key] = int(slots[i])
        return already

    def match(self, tokens) -> list[int]:
        out = []
        while tuple(tokens[: len(out) + 1]) in self.slot_of and len(out) < len(tokens):
            out.append(self.slot_of[tuple(tokens[: len(out) + 1])])
        return out


def random_sequence(rng: random.Random, pool: list[list[int]]) -> list[int]:
    """Often a prefix of an earlier sequence plus new tokens (so nodes split), over a small alphabet."""
    base = rng.choice(pool)[: rng.randrange(0, 12)] if pool and rng.random() < 0.8 else []
    return base + [rng.randrange(5) for _ in range(rng.randrange(0, 8))]


@pytest.mark.parametrize("seed", range(5))
def test_insert_and_match_agree_with_brute_force(seed):
    rng = random.Random(seed)
    cache, brute = make_cache(), BruteForce()
    inserted: list[list[int]] = []
    for _ in range(60):
        tokens = random_sequence(rng, inserted)
        if rng.random() < 0.5:
            slots = cache.pool.alloc(len(tokens))
            already = cache.insert(tokens, slots)
            assert already == brute.insert(tokens, slots)
            cache.pool.free(slots[:already])  # the caller's duplicate slots
            inserted.append(tokens)
        match = cache.match_prefix(tokens)
        want = brute.match(tokens)
        assert match.length == len(want)
        assert match.slots.tolist() == want
        cache.check_integrity()
    assert cache.total_tokens == len(brute.slot_of)
    assert cache.pool.num_used == len(brute.slot_of)


def test_nodes_split_where_sequences_part():
    cache = make_cache()
    cache.insert([1, 2, 3, 4, 5, 6], torch.arange(6))
    assert cache.insert([1, 2, 3, 4, 9], torch.tensor([10, 11, 12, 13, 14])) == 4
    root = cache._root("")
    (head,) = root.children.values()
    assert head.key == (1, 2, 3, 4) and sorted(c.key for c in head.children.values()) == [(5, 6), (9,)]
    match = cache.match_prefix([1, 2, 7])  # ends inside a segment: the node is split there
    assert match.length == 2 and match.slots.tolist() == [0, 1] and match.node.key == (1, 2)
    assert cache.match_prefix([1, 2, 3, 4, 9, 9]).slots.tolist() == [0, 1, 2, 3, 14]
    cache.check_integrity()


def test_match_never_removes():
    rng = random.Random(0)
    cache = make_cache()
    sequences = [[rng.randrange(4) for _ in range(rng.randrange(1, 20))] for _ in range(20)]
    for tokens in sequences:
        slots = cache.pool.alloc(len(tokens))
        cache.pool.free(slots[: cache.insert(tokens, slots)])
    before = cache.total_tokens
    for _ in range(3):
        for tokens in sequences:
            assert cache.match_prefix(tokens).length == len(tokens)
            cache.match_prefix(tokens[: len(tokens) // 2] + [99])
    assert cache.total_tokens == before
    cache.check_integrity()


def test_lru_leaf_eviction_keeps_locked_nodes_and_frees_slots():
    cache = make_cache(capacity=12)
    for first in (10, 20, 30):  # three disjoint sequences of 4 tokens: the pool is full
        cache.insert([first, 1, 2, 3], cache.alloc(4))
    assert cache.pool.num_free == 0
    cache.match_prefix([10, 1, 2, 3])  # 10... is now the most recently used; 20... the least
    locked = cache.match_prefix([20, 1])
    cache.lock(locked.node)  # 20 1 is in use: only its tail 2 3 may go
    slots = cache.alloc(6)
    assert slots is not None and len(slots) == 6
    # freed: 30... (LRU, 4 slots), then 20...'s unlocked tail (2 slots); 10... and 20 1 stay
    assert cache.match_prefix([10, 1, 2, 3]).length == 4
    assert cache.match_prefix([20, 1, 2, 3]).length == 2
    assert cache.match_prefix([30, 1, 2, 3]).length == 0
    assert cache.total_tokens == 6
    assert cache.alloc(4) is not None  # only 10... can still go: 20 1 is locked
    assert cache.match_prefix([10, 1]).length == 0 and cache.match_prefix([20, 1]).length == 2
    assert cache.alloc(1) is None  # 10 slots handed out, 2 locked
    cache.unlock(locked.node)
    assert cache.alloc(1) is not None  # now 20 1 goes too
    assert cache.total_tokens == 0
    cache.check_integrity()


def test_evict_then_the_slots_are_reused():
    cache = make_cache(capacity=8)
    cache.insert(list(range(8)), cache.alloc(8))
    assert cache.nbytes() == 8 * cache.pool.bytes_per_slot
    assert cache.evict(3) == 8  # whole leaves go
    assert cache.total_tokens == 0 and cache.pool.num_free == 8
    assert sorted(cache.alloc(8).tolist()) == list(range(8))


def test_namespaces_never_match_each_other():
    cache = make_cache()
    cache.insert([1, 2, 3], cache.alloc(3), namespace="a")
    assert cache.match_prefix([1, 2, 3], namespace="b").length == 0
    assert cache.match_prefix([1, 2, 3], namespace="a").length == 3


@pytest.mark.parametrize("max_runs", [64, 0])  # slice copies of slot runs; a gather / scatter per layer
def test_pool_round_trip_through_tree_caches(monkeypatch, max_runs):
    monkeypatch.setattr(radix, "MAX_RUNS", max_runs)
    torch.manual_seed(0)
    pool = KVPool(LAYERS, HEADS, DIM, capacity=100)
    src = TreeKVCache(LAYERS)
    for layer in src.layers:
        layer.update(torch.randn(1, HEADS, 10, DIM), torch.randn(1, HEADS, 10, DIM))
    slots = pool.alloc(20)
    pool.free(slots[[1, 3, 5, 6, 7, 11]])
    slots = pool.alloc(6)  # two runs, 1 and 3 apart from the rest
    assert slots.tolist() == [1, 3, 5, 6, 7, 11]
    pool.write_from(slots, src, 4)  # rows 4..9
    dst = TreeKVCache(LAYERS)
    pool.read_into(slots[2:], dst)  # rows 6..9, in order
    for a, b in zip(src.layers, dst.layers):
        assert torch.equal(b.keys, a.keys[:, :, 6:10]) and torch.equal(b.values, a.values[:, :, 6:10])
    assert pool.num_used == 20
    pool.free(slots)
    assert pool.num_used == 14 and pool.nbytes() == 14 * pool.bytes_per_slot


def test_budget_sets_capacity():
    pool = KVPool.for_budget(LAYERS, HEADS, DIM, max_bytes=10_000)
    assert pool.bytes_per_slot == 2 * LAYERS * HEADS * DIM * 4
    assert pool.capacity == 10_000 // pool.bytes_per_slot
    assert pool.alloc(pool.capacity + 1) is None


def test_cache_sequence_writes_only_new_rows():
    torch.manual_seed(0)
    cache = make_cache()
    kv = TreeKVCache(LAYERS)
    for layer in kv.layers:
        layer.update(torch.randn(1, HEADS, 12, DIM), torch.randn(1, HEADS, 12, DIM))
    assert cache.cache_sequence(list(range(8)), kv) == 8
    assert cache.cache_sequence(list(range(12)), kv) == 4  # extends the cached 8
    assert cache.pool.num_used == 12
    out = TreeKVCache(LAYERS)
    cache.pool.read_into(cache.match_prefix(list(range(12))).slots, out)
    assert torch.equal(out.layers[1].keys, kv.layers[1].keys)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_engine_outputs_identical_with_cache_on_and_off(tiny_model, default_tokenizer):
    """Two agent loops taking turns (each prompt extends that agent's last prompt and completion),
    then a branch off an earlier call: the same tokens with the radix cache as without it, and fewer
    prefilled tokens. The turns exercise both paths: the request's own buffers still holding the
    prefix (same agent twice in a row) and the copy from the pool (the other agent ran in between)."""
    engines = {
        on: Engine(tiny_model, default_tokenizer, drafter=None,
                   speculation=SpeculationConfig(enabled=False, adaptive=False, prefix_cache_bytes=2**26 if on else 0))
        for on in (True, False)
    }
    for engine in engines.values():
        engine.eos_ids = set()
    rng = random.Random(0)
    first = {agent: [rng.randrange(3, 512) for _ in range(30)] for agent in "ab"}
    prompts = dict(first)
    turns = ["a", "a", "b", "a", "b", "b", "branch"]
    prefill: dict[bool, list[int]] = {True: [], False: []}
    for turn in turns:
        prompt = first["a"] + [7, 8] if turn == "branch" else prompts[turn]
        results = {on: engine.generate(prompt, max_new_tokens=12) for on, engine in engines.items()}
        assert results[True].token_ids == results[False].token_ids
        for on, result in results.items():
            prefill[on].append(result.stats.prefill_tokens)
        if turn != "branch":
            prompts[turn] = prompt + results[True].token_ids + [rng.randrange(3, 512) for _ in range(5)]
    assert results[True].token_ids == hf_greedy(tiny_model, prompt, 12)
    assert prefill[False] == [30, 47, 30, 64, 47, 64, 32]  # every prompt in full
    # a call extending its agent's last one prefills the new observation plus that call's last token
    assert prefill[True] == [30, 6, 30, 6, 6, 6, 2]
    cache = engines[True].prefix_cache
    cache.check_integrity()
    assert cache.evictable_tokens() == cache.total_tokens  # every request unlocked its path
