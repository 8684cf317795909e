"""Teacher-forced simulation: figures on a tiny hand-checkable session."""

from __future__ import annotations

import pytest

from agentspec.draft.base import DraftTree
from agentspec.lookahead import CostCurve
from agentspec.replay.simulate import accepted_path, simulate_sessions


class ScriptedDrafter:
    """Always proposes the chain [10, 11, 12]."""

    def __init__(self) -> None:
        self.accepted: list[list[int]] = []
        self.stopped: list[str] = []

    def start_request(self, request_id, session_id, prompt_ids):
        self.accepted.append([])

    def propose(self, request_id, budget):
        return DraftTree([10, 11, 12][:budget], [-1, 0, 1][:budget], [0.9, 0.8, 0.7][:budget], [0, 0, 0][:budget])

    def accept(self, request_id, tree, accepted, new_tokens):
        self.accepted[-1].extend(new_tokens)

    def stop_request(self, request_id):
        self.stopped.append(request_id)

    def add_history(self, session_id, prompt_ids, output_ids):
        pass


def test_accepted_path():
    tree = DraftTree([5, 6, 7, 8], [-1, 0, 0, 2], [1, 1, 1, 1], [0] * 4)
    assert accepted_path(tree, [5, 7, 8, 9]) == [0, 2, 3]
    assert accepted_path(tree, [6]) == []


def test_simulation_figures_by_hand():
    drafter = ScriptedDrafter()
    cost = CostCurve([(1, 1.0), (4, 2.0)])  # c(k) = 1 + (k - 1) / 3
    # completion 10 11 5 10 11 12 13: steps accept [10 11]+5, [10 11 12]+13 -> 2 steps
    rep = simulate_sessions([[([1, 2], [10, 11, 5, 10, 11, 12, 13])]], lambda: drafter, cost_curve=cost,
                            policy=False)
    assert drafter.accepted == [[10, 11, 5, 10, 11, 12, 13]] and drafter.stopped == ["sim-0-0"]
    assert (rep.steps, rep.drafted_tokens, rep.accepted_tokens, rep.output_tokens) == (2, 6, 5, 7)
    assert rep.tokens_per_step == pytest.approx(3.5)
    assert rep.hit_rate == pytest.approx(5 / 7)
    assert rep.modelled_tokens_per_second == pytest.approx(7 / 4.0)
    assert rep.speedup == pytest.approx(7 * 1.0 / (2 * 2.0))
    assert rep.accepted_by_source == {"request": 5}
    d = rep.to_dict()
    assert d["speedup"] == pytest.approx(1.75) and d["calls"] == 1 and d["hit_rate"] == pytest.approx(5 / 7)
    rep.render()


def test_per_call_figures_sum_to_the_report():
    seen = []
    calls = [([1, 2], [10, 11, 5, 10, 11, 12, 13]), ([3], [10, 11])]
    rep = simulate_sessions([calls], ScriptedDrafter, cost_curve=CostCurve([(1, 1.0), (4, 2.0)]), policy=False,
                            on_call=lambda si, ci, stats, seconds: seen.append((si, ci, stats, seconds)))
    assert [(si, ci) for si, ci, _, _ in seen] == [(0, 0), (0, 1)]
    assert [(s.output_tokens, s.steps, s.accepted_tokens, s.prompt_tokens) for _, _, s, _ in seen] == [
        (7, 2, 5, 2), (2, 1, 2, 1)]
    assert sum(seconds for *_, seconds in seen) == pytest.approx(rep.step_cost_s) == 6.0


def test_simulation_stops_at_the_end_of_the_completion():
    rep = simulate_sessions([[([1], [10, 11])]], ScriptedDrafter, cost_curve=CostCurve([(1, 1.0), (4, 2.0)]),
                            policy=False)
    # the tree covers the whole completion: no bonus token, one step
    assert (rep.steps, rep.accepted_tokens, rep.output_tokens) == (1, 2, 2)


def test_default_drafter_on_a_repetitive_session():
    calls = [([1, 2, 3], [7, 8, 9, 10, 11, 2]), ([1, 2, 3, 4], [7, 8, 9, 10, 11, 2])]
    rep = simulate_sessions([calls], cost_curve=CostCurve(), policy=True)
    assert rep.calls == 2 and rep.output_tokens == 12
    assert rep.tokens_per_step > 1.0 and rep.speedup > 1.0
