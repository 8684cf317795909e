"""SuffixDrafter (request / session / global trees) and its compiled scorer, held to the reference."""

from __future__ import annotations

import numpy as np
import pytest
from reference.scoring import PyScorer

from agentspec.draft.base import DraftTree, Source
from agentspec.draft.builder import DrafterConfig, SuffixDrafter
from agentspec.draft.core import Scorer


def _drafter(**kw) -> SuffixDrafter:
    return SuffixDrafter(DrafterConfig(**kw))


def test_request_tree_drafts_from_the_prompt():
    d = _drafter(calibrate=False)
    d.start_request("r", None, [1, 2, 3, 4, 5, 9, 1, 2])
    tree = d.propose("r", 8)
    tree.check_integrity()
    assert tree.tokens[:2] == [3, 4] and tree.parents[:2] == [-1, 0]
    assert all(s == Source.REQUEST for s in tree.sources)
    d.accept("r", tree, [0, 1], [3, 4, 5])
    assert d.propose("r", 8).tokens[:1] == [9]
    d.stop_request("r")
    with pytest.raises(KeyError):
        d.propose("r", 8)


def test_session_and_global_trees_learn_finished_calls():
    d = _drafter(calibrate=False)
    d.add_history("s1", [7, 7], [40, 41, 42, 43])
    d.start_request("a", "s2", [9, 40, 41])  # other session: only the global tree knows 42 43
    tree = d.propose("a", 8)
    assert tree.tokens[:2] == [42, 43] and tree.sources[0] == Source.GLOBAL
    d.stop_request("a")
    d.add_history("s3", [1, 2, 3, 4], [5])
    d.start_request("b", "s3", [1, 2, 3, 4, 5, 6, 1, 2, 3])
    tree = d.propose("b", 8)
    assert Source.SESSION in tree.sources or Source.REQUEST in tree.sources
    assert tree.tokens[0] == 4


def test_merge_respects_budget_and_invariants():
    d = _drafter()
    for i in range(6):
        d.add_history(None, [], [1, 2, 10 + i % 3, 20 + i % 2, 30])
    d.start_request("r", None, [5, 1, 2, 11, 21, 30, 1, 2])
    for budget in (1, 2, 3, 32):
        tree = d.propose("r", budget)
        tree.check_integrity()
        assert 0 < len(tree) <= budget
        for i, p in enumerate(tree.parents):
            assert 0 <= tree.probs[i] <= 1
            if p >= 0:
                assert tree.probs[i] <= tree.probs[p] + 1e-12
    assert len(d.propose("r", 0)) == 0


def test_calibration_lowers_estimates_that_keep_failing():
    d = _drafter(use_global=False, use_session=False)
    d.start_request("r", None, [1, 2, 3, 1, 2, 3, 1, 2])
    first = d.propose("r", 1)
    for _ in range(50):
        tree = d.propose("r", 1)
        d.accept("r", tree, [], [99])  # always rejected
        d._requests["r"].output.clear()  # keep the same context
    assert d.propose("r", 1).probs[0] < 0.5 * first.probs[0]


def test_accept_learns_from_a_reindexed_subtree_of_the_proposal():
    d = _drafter(use_global=False, use_session=False)
    d.start_request("r", None, [1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 3, 4, 1, 2, 5, 7, 1, 2])
    tree = d.propose("r", 8)
    assert len(tree) >= 3 and sum(p < 0 for p in tree.parents) >= 2  # 3 and 5 both follow "1 2"
    first = next(i for i in range(len(tree)) if tree.parents[i] < 0 and i + 1 < len(tree) and tree.parents[i + 1] < 0)
    # drop the other root child (the sibling at index first + 1): later nodes are re-indexed
    keep = [i for i in range(len(tree)) if i != first + 1 and tree.parents[i] != first + 1]
    sub = tree.subtree(keep)
    assert any(p == first for p in sub.parents) and len(sub) < len(tree)
    tested = sum(1 for p in sub.parents if p < 0 or p == first)
    d.accept("r", sub, [first], [sub.tokens[first], 99])
    assert d.scorer.updates == tested
    assert d.scorer.accepted == 1


def test_add_history_to_global_false_leaves_the_global_tree_alone():
    d = _drafter(calibrate=False)
    d.add_history("s1", [7, 7], [40, 41, 42, 43], to_global=False)
    d.start_request("a", "s2", [9, 40, 41])  # another session: nothing to draft from
    assert len(d.propose("a", 8)) == 0
    d.start_request("b", "s1", [9, 40, 41])  # the same session: its tree knows the call
    assert d.propose("b", 8).tokens[:2] == [42, 43]


def test_common_prefix():
    from agentspec.draft.builder import _common_prefix

    assert _common_prefix([1, 2, 3, 4], [1, 2, 3]) == 3
    assert _common_prefix([1, 2], [1, 2, 3]) == 2
    assert _common_prefix([1, 2, 9, 4], [1, 2, 3, 4]) == 2
    assert _common_prefix([], [1]) == 0 and _common_prefix([5], [6]) == 0


def test_merge_features_count_agreeing_sources_and_conflicts():
    d = _drafter(calibrate=False, use_session=False)
    d.add_history(None, [], [1, 2, 3, 4])  # global: "1 2" -> 3 -> 4
    d.start_request("r", None, [1, 2, 3, 7, 1, 2])  # request: "1 2" -> 3 -> 7
    tree = d.propose("r", 8)
    proposal = d._requests["r"].proposal
    # features: (source, estimate, token, previous, depth, rank, match, support, agree, conflict, state)
    feats = proposal.features
    node = {(p, t): i for i, (t, p) in enumerate(zip(proposal.tokens, proposal.parents))}
    three = node[(-1, 3)]
    assert feats[three][8:10] == (2, 0)  # both sources propose 3, nobody proposes anything else
    assert feats[three][2:5] == (3, 2, 0)  # token 3 after the context's last token 2, at depth 0
    four, seven = node[(three, 4)], node[(three, 7)]
    assert feats[four][8:10] == (1, 1) and feats[seven][8:10] == (1, 1)  # one source each, they disagree
    assert feats[four][3:5] == (3, 1)  # after 3, one level down
    assert {tree.sources[four], tree.sources[seven]} == {Source.GLOBAL, Source.REQUEST}


def _agent_stream(seed: int, calls: int = 6) -> list[tuple[list[int], list[int]]]:
    """Calls whose prompts extend each other and whose outputs repeat phrases, like an agent loop."""
    rng = np.random.default_rng(seed)
    phrases = [list(rng.integers(0, 60, size=int(rng.integers(3, 9)))) for _ in range(12)]
    history: list[int] = [int(t) for t in rng.integers(0, 60, size=30)]
    stream = []
    for _ in range(calls):
        output = [int(t) for i in rng.integers(0, len(phrases), size=6) for t in phrases[i]]
        if rng.random() < 0.5:
            output += [int(t) for t in rng.integers(0, 60, size=5)]  # some fresh text
        stream.append((list(history), output))
        history += output + [int(t) for t in rng.integers(0, 60, size=10)]
    return stream


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compiled_scorer_matches_the_reference(seed):
    """Same trees (tokens, parents, sources; probabilities to rounding) and same learning, step by step."""
    from agentspec.replay.simulate import accepted_path

    twins = [_drafter(), _drafter()]
    twins[1].scorer = PyScorer()
    assert type(twins[0].scorer).__name__ == "Scorer"
    for prompt, output in _agent_stream(seed):
        for d in twins:
            d.start_request("r", "s", prompt)
        pos = 0
        while pos < len(output):
            budget = 4 + (pos % 3) * 12
            trees = [d.propose("r", budget) for d in twins]
            a, b = trees
            assert (a.tokens, a.parents, a.sources) == (b.tokens, b.parents, b.sources)
            assert a.probs == pytest.approx(b.probs, rel=1e-12, abs=1e-15)
            fa, fb = (d._requests["r"].proposal.features for d in twins)
            assert [f[0] for f in fa] == [f[0] for f in fb]
            assert [tuple(f[2:]) for f in fa] == [tuple(f[2:]) for f in fb]
            path = accepted_path(a, output[pos:])
            new = output[pos : pos + len(path) + 1]
            pos += len(new)
            for d in twins:
                d.accept("r", a, path, new)
        for d in twins:
            d.stop_request("r")
    assert twins[0].scorer.updates == twins[1].scorer.updates > 50
    assert twins[0].scorer.accepted == twins[1].scorer.accepted > 0


def test_compiled_calibrator_matches_the_reference():
    cpp, py = Scorer(), PyScorer()
    rng = np.random.default_rng(3)
    for _ in range(500):
        source, prob = int(rng.integers(0, 3)), float(rng.choice([0.05, 0.35, 0.65, 0.95]))
        feats = [int(v) for v in rng.integers(0, 4, size=int(rng.integers(0, 10)))]
        assert cpp.predict(source, prob, feats) == pytest.approx(py.predict(source, prob, feats), rel=1e-12)
        accepted = bool(rng.random() < 0.3 + 0.1 * source)
        cpp.update(source, prob, feats, accepted)
        py.update(source, prob, feats, accepted)
    assert cpp.updates == py.updates == 500 and cpp.accepted == py.accepted


def test_calibrator_learns_per_source():
    cal = Scorer()
    assert cal.predict(0, 0.8) == pytest.approx(0.8)  # no evidence: the estimate itself
    for i in range(400):
        cal.update(0, 0.85, (1, 2), i % 4 == 0)  # 25% accepted
        cal.update(2, 0.85, (5, 2), True)
    assert cal.predict(0, 0.85, (1, 2)) == pytest.approx(0.25, abs=0.05)
    assert cal.predict(0, 0.85, (7, 3)) < 0.6  # unseen token ids: the source's own weights still apply
    assert cal.predict(2, 0.85, (5, 2)) > 0.95
    assert cal.predict(1, 0.8) == pytest.approx(0.8)  # another source, no shared feature: untouched
    assert cal.updates == 800 and cal.accepted == 500


def test_calibrator_separates_tokens_it_sees_fail():
    """Token-id weights are shared across sources: a token that keeps failing is trusted less everywhere."""
    cal = Scorer()
    for i in range(300):
        cal.update(i % 3, 0.65, (10, 0), False)
        cal.update(i % 3, 0.65, (11, 0), True)
    assert cal.predict(1, 0.65, (10, 0)) < 0.2 < 0.8 < cal.predict(1, 0.65, (11, 0))


def test_calibrator_crosses_let_a_token_depend_on_depth_and_match():
    """Token x depth and token x match crosses: the same token, right at depth 0, wrong deeper (or at a
    short match), is told apart; without the crosses the additive weights could not do it for one
    token while other tokens show the opposite pattern."""
    cal = Scorer()
    # features: token, previous, depth, rank, match
    for _ in range(300):
        cal.update(0, 0.5, (7, 0, 0, 0, 3), True)
        cal.update(0, 0.5, (7, 0, 2, 0, 3), False)
        cal.update(0, 0.5, (8, 0, 0, 0, 3), False)
        cal.update(0, 0.5, (8, 0, 2, 0, 3), True)
        cal.update(0, 0.5, (9, 0, 1, 0, 1), False)
        cal.update(0, 0.5, (9, 0, 1, 0, 5), True)
    assert cal.predict(0, 0.5, (7, 0, 0, 0, 3)) > 0.8 > 0.2 > cal.predict(0, 0.5, (7, 0, 2, 0, 3))
    assert cal.predict(0, 0.5, (8, 0, 2, 0, 3)) > 0.8 > 0.2 > cal.predict(0, 0.5, (8, 0, 0, 0, 3))
    assert cal.predict(0, 0.5, (9, 0, 1, 0, 5)) > 0.8 > 0.2 > cal.predict(0, 0.5, (9, 0, 1, 0, 1))


def test_acceptance_walk_follows_the_target_and_returns_the_token_after():
    from agentspec.draft.base import acceptance_walk

    # root -> 5 (0) -> 6 (1) -> 7 (3); root -> 8 (2)
    tree = DraftTree([5, 6, 8, 7], [-1, 0, -1, 1], [0.9, 0.8, 0.1, 0.7], [0] * 4)
    after = {0: 5, 1: 6, 2: 7, 4: 1}  # the target's token after each slot (0 = root, 1 + i = node i)
    assert acceptance_walk(tree, after.__getitem__) == ([0, 1, 3], 1)
    assert acceptance_walk(tree, lambda slot: 8 if slot == 0 else 4) == ([2], 4)
    assert acceptance_walk(tree, lambda slot: 3) == ([], 3)
    assert acceptance_walk(tree, lambda slot: 5 if slot == 0 else None) == ([0], None)  # the target ran out
