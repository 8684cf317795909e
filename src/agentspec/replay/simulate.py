"""Teacher-forced drafting benchmark: replay recorded completions through a drafter, no model.

For each session (a list of calls ``(prompt_ids, completion_ids)``, completion incl. EOS), call
by call: ``start_request(prompt)``; at each step the drafter proposes a tree (pruned by the
lookahead policy when one is given), the recorded completion decides the accepted path (the
longest root path matching it), plus one bonus token (the next recorded token); the committed
tokens are fed back with ``accept``; at the end ``stop_request``.

Modelled speedup = completion tokens x c(1) / sum over steps of c(1 + drafted that step), where
c(k) is the cost of one forward over k tokens (:class:`agentspec.lookahead.CostCurve`; by default
the curve measured once for the default model in fp32 on 2 CPU threads after a 1000-token
context). It is the forward cost of plain decoding over the cost of the verification passes:
drafting time is not charged (it is reported separately), nor is the prefill.

:func:`simulate_sessions` runs token-id sessions; :func:`replay_simulate` runs recorded
trajectories and reports per call (the ``agentspec replay --mode simulate`` report).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

from rich.table import Table
from tqdm import tqdm

from agentspec.draft.base import SOURCE_NAMES, Drafter, DraftTree, acceptance_walk
from agentspec.draft.builder import SuffixDrafter
from agentspec.lookahead import CostCurve, LookaheadPolicy
from agentspec.replay.report import ReplayedCall, ReplayReport
from agentspec.replay.trajectories import Session, tokenize_call
from agentspec.stats import DraftCounts, SpecStats

Call = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, completion_ids)


@dataclass
class SimulationReport(DraftCounts):
    """Figures of one teacher-forced run (output tokens: the recorded completions, EOS included)."""

    sessions: int = 0
    calls: int = 0
    step_cost_s: float = 0.0  # sum of modelled forward costs
    plain_cost_s: float = 0.0  # output tokens x c(1)
    draft_us_median: float = 0.0  # propose (+ select) per step
    draft_us_mean: float = 0.0
    update_us_per_token: float = 0.0  # accept() time per committed token
    start_ms_per_call: float = 0.0  # start_request (request tree build) per call

    @property
    def speedup(self) -> float:
        """Modelled speedup over plain decoding on the cost curve."""
        return self.plain_cost_s / self.step_cost_s if self.step_cost_s else 0.0

    @property
    def modelled_tokens_per_second(self) -> float:
        """Output tokens per modelled second of verification forwards."""
        return self.output_tokens / self.step_cost_s if self.step_cost_s else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | self.rates() | {"speedup": self.speedup,
                                             "modelled_tokens_per_second": self.modelled_tokens_per_second}

    def render(self, title: str = "teacher-forced drafting") -> Table:
        """A ``rich`` table of the figures."""
        table = Table(title=title)
        table.add_column("metric")
        table.add_column("value", justify="right")
        plain = self.output_tokens / self.plain_cost_s if self.plain_cost_s else 0.0
        rows = [
            ("sessions / calls", f"{self.sessions} / {self.calls}"),
            ("output tokens", f"{self.output_tokens:,}"),
            ("verification steps", f"{self.steps:,}"),
            ("tokens / step", f"{self.tokens_per_step:.2f}"),
            ("drafted / step", f"{self.drafted_per_step:.2f}"),
            ("hit rate (tokens from drafts)", f"{self.hit_rate:.1%}"),
            ("accepted by source", ", ".join(f"{k} {v:,}" for k, v in sorted(self.accepted_by_source.items()))),
            ("modelled tokens / s (plain decoding)", f"{self.modelled_tokens_per_second:.1f} ({plain:.1f})"),
            ("drafter time / step (median)", f"{self.draft_us_median:.1f} us"),
            ("drafter update / token", f"{self.update_us_per_token:.2f} us"),
            ("request start / call", f"{self.start_ms_per_call:.2f} ms"),
            ("modelled speedup", f"{self.speedup:.2f}x"),
        ]
        for name, value in rows:
            table.add_row(name, value)
        return table


def accepted_path(tree: DraftTree, target: Sequence[int]) -> list[int]:
    """Node indices of the longest root path whose tokens are a prefix of ``target`` (the recorded
    completion plays the greedy target: the shared acceptance walk)."""
    depth = [0, *tree.depths()]
    path, _ = acceptance_walk(tree, lambda slot: int(target[depth[slot]]) if depth[slot] < len(target) else None)
    return path


def simulate_sessions(
    sessions: Iterable[Sequence[Call]],
    drafter_factory: Callable[[], Drafter] | None = None,
    cost_curve: CostCurve | None = None,
    policy: LookaheadPolicy | None | bool = True,
    budget: int = 32,
    progress: bool = False,
    on_call: Callable[[int, int, SpecStats, float], None] | None = None,
) -> SimulationReport:
    """Replay ``sessions`` through a fresh drafter; ``policy=True`` uses a LookaheadPolicy on ``cost_curve``.

    ``policy=False``/``None`` verifies every proposed tree as is (the plain SuffixDecoding protocol).
    ``on_call(session index, call index, stats, modelled seconds)`` gets each call's own figures.
    """
    cost = cost_curve or CostCurve()
    if policy is True:
        policy = LookaheadPolicy(cost)
    elif policy is False:
        policy = None
    drafter = (drafter_factory or SuffixDrafter)()
    sessions = [list(s) for s in sessions]
    rep = SimulationReport(sessions=len(sessions))
    draft_times: list[float] = []
    update_time = start_time = 0.0
    bar = tqdm(total=sum(len(s) for s in sessions), unit="call", desc="simulate") if progress else None
    for si, calls in enumerate(sessions):
        session_id = f"sim-session-{si}"
        for ci, (prompt, completion) in enumerate(calls):
            rid = f"sim-{si}-{ci}"
            completion = [int(t) for t in completion]
            call, seconds = SpecStats(prompt_tokens=len(prompt), output_tokens=len(completion)), 0.0
            t0 = time.perf_counter()
            drafter.start_request(rid, session_id, prompt)
            start_time += time.perf_counter() - t0
            pos = 0
            while pos < len(completion):
                t0 = time.perf_counter()
                tree = drafter.propose(rid, budget)
                if policy is not None and len(tree):
                    tree = policy.select(tree)
                draft_times.append(time.perf_counter() - t0)
                path = accepted_path(tree, completion[pos:])
                new_tokens = completion[pos : pos + len(path) + 1]  # accepted + bonus (if any left)
                pos += len(new_tokens)
                call.steps += 1
                call.drafted_tokens += len(tree)
                call.accepted_tokens += len(path)
                seconds += cost(1 + len(tree))
                for i in path:
                    name = SOURCE_NAMES.get(tree.sources[i], str(tree.sources[i]))
                    call.accepted_by_source[name] = call.accepted_by_source.get(name, 0) + 1
                t0 = time.perf_counter()
                drafter.accept(rid, tree, path, new_tokens)
                update_time += time.perf_counter() - t0
            drafter.stop_request(rid)
            rep.add(call)
            rep.calls += 1
            rep.step_cost_s += seconds
            if on_call is not None:
                on_call(si, ci, call, seconds)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    rep.plain_cost_s = rep.output_tokens * cost(1)
    if draft_times:
        rep.draft_us_median = statistics.median(draft_times) * 1e6
        rep.draft_us_mean = statistics.fmean(draft_times) * 1e6
    rep.update_us_per_token = update_time / max(rep.output_tokens, 1) * 1e6
    rep.start_ms_per_call = start_time / max(rep.calls, 1) * 1e3
    return rep


def replay_simulate(
    sessions: Sequence[Session],
    tokenizer,
    *,
    max_prompt_tokens: int | None = None,
    cost_curve: CostCurve | None = None,
    drafter_factory: Callable[[], Drafter] | None = None,
    policy: bool = True,
    budget: int = 32,
    on_call: Callable[[ReplayedCall | None], None] | None = None,
) -> ReplayReport:
    """:func:`simulate_sessions` over recorded trajectories, with a :class:`ReplayedCall` per call.

    Prompts are tokenised with ``tokenizer`` (fitted to ``max_prompt_tokens`` if given), the
    completion is the recorded one plus EOS. ``policy=False`` verifies every proposed tree as is.
    The modelled speedup uses ``cost_curve`` (default: :class:`~agentspec.lookahead.CostCurve`'s
    built-in fp32 curve of the default model).
    """
    report = ReplayReport("simulate", info={"max_prompt_tokens": max_prompt_tokens, "policy": policy,
                                            "budget": budget})
    tokenized, kept = [], []  # kept[si][ci]: the recorded call index of simulated call ci of session si
    for session in sessions:
        calls, indices = [], []
        for index, call in enumerate(session.calls):
            try:
                pair = tokenize_call(tokenizer, call, max_prompt_tokens)
                why = f"prompt cannot be fitted to {max_prompt_tokens} tokens"
            except Exception as exc:  # e.g. a message the chat template rejects
                pair, why = None, f"cannot render the prompt ({exc})"
            if pair is None:
                report.skipped.append(f"{session.id} call {index}: {why}")
                if on_call:
                    on_call(None)
                continue
            calls.append(pair)
            indices.append(index)
        if calls:
            tokenized.append(calls)
            kept.append((session.id, indices))

    def record(si: int, ci: int, stats: SpecStats, seconds: float) -> None:
        session_id, indices = kept[si]
        call = ReplayedCall(session_id, indices[ci], stats.prompt_tokens, stats, modelled_seconds=seconds)
        report.calls.append(call)
        if on_call:
            on_call(call)

    sim = simulate_sessions(tokenized, drafter_factory, cost_curve, policy, budget, on_call=record)
    report.info["modelled_speedup"] = sim.speedup
    report.info["simulation"] = sim.to_dict()
    return report
