"""The speculation counters and their rates: defined once, shared by every report."""

from __future__ import annotations

import pytest

from agentspec.replay.report import MethodTotals
from agentspec.replay.simulate import SimulationReport
from agentspec.stats import DraftCounts, SpecStats, counter_names


@pytest.mark.parametrize("cls", [SpecStats, SimulationReport, MethodTotals])
def test_every_report_uses_the_one_definition_of_the_rates(cls):
    for rate in ("tokens_per_step", "drafted_per_step", "acceptance_rate", "hit_rate"):
        assert getattr(cls, rate) is getattr(DraftCounts, rate), rate
    counts = cls(output_tokens=12, steps=4, drafted_tokens=10, accepted_tokens=6)
    assert (counts.tokens_per_step, counts.drafted_per_step, counts.acceptance_rate, counts.hit_rate) == (
        3.0, 2.5, 0.6, 0.5)
    assert cls().tokens_per_step == cls().hit_rate == 0.0  # nothing counted: no division by zero


def test_add_sums_every_counter_and_merges_the_sources():
    a = SpecStats(prompt_tokens=5, output_tokens=4, steps=2, decode_seconds=0.5, accepted_by_source={"global": 1})
    b = SpecStats(prompt_tokens=7, output_tokens=6, steps=3, decode_seconds=0.25,
                  accepted_by_source={"global": 2, "session": 1}, finish_reason="stop")
    total = SpecStats().add(a).add(b)
    for name in counter_names(SpecStats):
        assert getattr(total, name) == getattr(a, name) + getattr(b, name), name
    assert total.accepted_by_source == {"global": 3, "session": 1} and total.finish_reason == ""
    assert SpecStats.from_dict(total.to_dict()) == total


def test_the_store_keeps_every_counter_of_a_call():
    from agentspec.stores import sql

    assert set(sql.COUNTERS) <= set(counter_names(SpecStats))
