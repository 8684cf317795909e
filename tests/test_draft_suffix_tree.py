"""Suffix tree: the compiled core, held to its pure-Python reference (tests/reference/suffix_tree.py)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from reference.suffix_tree import PySuffixTree

from agentspec.draft.core import SuffixTree
from agentspec.replay.trajectories import default_data_dir

TAU = default_data_dir() / "tau_bench" / "gpt-4o-airline.json"
BOTH = pytest.mark.parametrize("make", [SuffixTree, PySuffixTree], ids=["compiled", "reference"])


def _same(a, b) -> bool:
    return (list(a.tokens), list(a.parents), list(a.probs), list(a.supports), a.match_len) == (
        list(b.tokens), list(b.parents), list(b.probs), list(b.supports), b.match_len)


@BOTH
def test_counts_and_draft_by_hand(make):
    t = make(64)
    t.extend(0, [1, 2, 3, 1, 2, 4])
    t.check_integrity()
    d = t.speculate([7, 1, 2], budget=8, alpha=1.0, beta=0.0, min_prob=0.1)
    # "1 2" occurs twice, followed by 3 once and by 4 once: two children at probability 1/2
    assert d.match_len == 2
    assert sorted(zip(d.tokens, d.parents, d.probs))[:2] == [(3, -1, 0.5), (4, -1, 0.5)]
    assert d.score == pytest.approx(sum(d.probs))
    d = t.speculate([2, 3], budget=8)  # "2 3" occurred once, followed by "1 2 4"
    assert list(d.tokens) == [1, 2] and list(d.probs) == [1.0, 1.0] and list(d.parents) == [-1, 0]


@BOTH
def test_min_prob_budget_and_alpha_limit(make):
    t = make(8)
    for s in range(10):
        t.extend(s, [5, 6, s % 3, 9])
    d = t.speculate([5, 6], budget=8, alpha=1.0, beta=0.0, min_prob=0.3)
    assert len(d.tokens) <= 2 and all(p >= 0.3 for p in d.probs)
    assert len(t.speculate([5, 6], budget=1, alpha=10.0).tokens) == 1
    assert len(t.speculate([5, 6], budget=100, alpha=0.0, beta=0.0).tokens) == 0


@BOTH
def test_equal_scores_prefer_the_longer_match(make):
    t = make(64)
    t.extend(0, [1, 2, 3, 4, 5, 6])
    d = t.speculate([1, 2], budget=1, alpha=1.0, beta=0.0, min_prob=0.1)  # p = 1 and p = 2 both score 1.0
    assert list(d.tokens) == [3] and d.match_len == 2
    assert t.speculate([9, 9], budget=4).match_len == 0  # no match: the empty draft


@BOTH
def test_depth_limit_and_integrity_on_random_sequences(make):
    rng = random.Random(0)
    for depth in (1, 2, 3, 7, 64):
        t = make(depth)
        for _ in range(300):
            t.append(rng.randrange(4), rng.randrange(3))
        t.check_integrity()


def test_reference_check_integrity_detects_corruption():
    t = PySuffixTree(16)
    t.extend(0, [1, 2, 1, 2, 3])
    t._count[2] += 1
    with pytest.raises(ValueError):
        t.check_integrity()


@BOTH
def test_eviction_drops_oldest_and_rebuilds(make):
    t = make(16)
    for s in range(5):
        t.extend(s, [s] * 10 + [100 + s])
    assert t.evict(25) == 3
    assert list(t.seq_ids()) == [3, 4] and t.num_tokens == 22
    t.check_integrity()
    assert len(t.speculate([0, 0], budget=4).tokens) == 0  # sequence 0 is gone
    assert list(t.speculate([4, 4], budget=4).tokens[:1]) == [4]
    t.remove(3)
    assert list(t.seq_ids()) == [4]
    t.check_integrity()


def test_compiled_matches_reference_on_random_sequences():
    rng = random.Random(1)
    for _ in range(150):
        depth, vocab = rng.choice([1, 2, 3, 8, 64]), rng.choice([2, 3, 5, 20])
        a, b = PySuffixTree(depth), SuffixTree(depth)
        for _ in range(rng.randrange(1, 150)):
            s, tok = rng.randrange(4), rng.randrange(vocab)
            a.append(s, tok)
            b.append(s, tok)
            if rng.random() < 0.01:
                assert a.evict(40) == b.evict(40)
        a.check_integrity()
        b.check_integrity()
        assert a.num_nodes == b.num_nodes and a.num_tokens == b.num_tokens
        for _ in range(10):
            ctx = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
            kw = dict(budget=rng.randrange(0, 20), alpha=rng.choice([0.5, 1.0, 2.0]),
                      beta=rng.choice([0.0, 1.0, 3.0]), min_prob=rng.choice([0.0, 0.1, 0.3]))
            assert _same(a.speculate(ctx, **kw), b.speculate(ctx, **kw))


@pytest.mark.skipif(not TAU.is_file(), reason=f"needs the tau-bench trajectories: {TAU} is missing "
                    "(set AGENTSPEC_DATA to the shared data folder)")
def test_compiled_matches_reference_on_real_tokens(default_tokenizer):
    from agentspec.chat import assistant_text

    traj = json.loads(TAU.read_text())[0]["traj"]
    texts = [assistant_text(m) if m["role"] == "assistant" else str(m.get("content") or "") for m in traj[1:]]
    seqs = [default_tokenizer.encode(t, add_special_tokens=False) for t in texts if t]
    a, b = PySuffixTree(64), SuffixTree(64)
    for i, s in enumerate(seqs):
        a.extend(i, s)
        b.extend(i, s)
    a.check_integrity()
    b.check_integrity()
    flat = [t for s in seqs for t in s]
    for end in range(5, len(flat), 7):
        ctx = flat[max(0, end - 80) : end]
        assert _same(a.speculate(ctx, 32, 1.0, 0.0, 0.1), b.speculate(ctx, 32, 1.0, 0.0, 0.1))
    assert b.estimate_memory() > 0


def test_compiled_core_errors_are_clear():
    t = SuffixTree(8)
    with pytest.raises(KeyError):
        t.get_sequence(3)
    with pytest.raises(ValueError):
        SuffixTree(0)


def test_missing_core_is_an_import_error_that_says_how_to_build_it():
    code = ("import sys; sys.modules['agentspec.draft._suffix_core'] = None\n"
            "import agentspec.draft.builder")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "not built" in run.stderr and "pip install" in run.stderr


def test_the_package_never_imports_the_reference():
    code = ("import sys, agentspec.draft.builder, agentspec.lookahead, agentspec.sessions\n"
            "print(sorted(m for m in sys.modules if m.startswith('reference')))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # importable, were the package to try
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
