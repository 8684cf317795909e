"""Teacher-forced drafting benchmark: replay recorded completions through a drafter, no model.

For each session (a list of calls ``(prompt_ids, completion_ids)``, completion incl. EOS), call
by call: ``start_request(prompt)``; at each step the drafter proposes a tree (pruned by the
lookahead policy when one is given), the recorded completion decides the accepted path (the
longest root path matching it), plus one bonus token (the next recorded token); the committed
tokens are fed back with ``accept``; at the end ``stop_request``.

Modelled speedup = completion tokens x c(1) / sum over steps of c(1 + drafted that step): the
forward cost of plain decoding over the cost of the verification passes (drafting time is not
charged; it is reported separately).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

from agentspec.draft.base import SOURCE_NAMES, Drafter, DraftTree, acceptance_walk
from agentspec.lookahead import CostCurve, LookaheadPolicy

Call = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, completion_ids)


@dataclass
class SimulationReport:
    """Figures of one teacher-forced run."""

    sessions: int = 0
    calls: int = 0
    completion_tokens: int = 0
    steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_by_source: dict[str, int] = field(default_factory=dict)
    step_cost_s: float = 0.0  # sum of modelled forward costs
    plain_cost_s: float = 0.0  # completion tokens x c(1)
    draft_us_median: float = 0.0  # propose (+ select) per step
    draft_us_mean: float = 0.0
    update_us_per_token: float = 0.0  # accept() time per committed token
    start_ms_per_call: float = 0.0  # start_request (request tree build) per call

    @property
    def tokens_per_step(self) -> float:
        return self.completion_tokens / self.steps if self.steps else 0.0

    @property
    def drafted_per_step(self) -> float:
        return self.drafted_tokens / self.steps if self.steps else 0.0

    @property
    def draft_share(self) -> float:
        """Share of completion tokens that came from drafts."""
        return self.accepted_tokens / self.completion_tokens if self.completion_tokens else 0.0

    @property
    def speedup(self) -> float:
        """Modelled speedup over plain decoding on the cost curve."""
        return self.plain_cost_s / self.step_cost_s if self.step_cost_s else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(tokens_per_step=self.tokens_per_step, drafted_per_step=self.drafted_per_step,
                   draft_share=self.draft_share, speedup=self.speedup)
        return out

    def render(self, title: str = "teacher-forced drafting"):
        """A ``rich`` table of the figures."""
        from rich.table import Table

        table = Table(title=title)
        table.add_column("metric")
        table.add_column("value", justify="right")
        rows = [
            ("sessions / calls", f"{self.sessions} / {self.calls}"),
            ("completion tokens", f"{self.completion_tokens:,}"),
            ("verification steps", f"{self.steps:,}"),
            ("tokens / step", f"{self.tokens_per_step:.2f}"),
            ("drafted / step", f"{self.drafted_per_step:.2f}"),
            ("share of tokens from drafts", f"{self.draft_share:.1%}"),
            ("accepted by source", ", ".join(f"{k} {v:,}" for k, v in sorted(self.accepted_by_source.items()))),
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
) -> SimulationReport:
    """Replay ``sessions`` through a fresh drafter; ``policy=True`` uses a LookaheadPolicy on ``cost_curve``.

    ``policy=False``/``None`` verifies every proposed tree as is (the plain SuffixDecoding protocol).
    """
    if drafter_factory is None:
        from agentspec.draft.builder import SuffixDrafter

        drafter_factory = SuffixDrafter
    cost = cost_curve or CostCurve()
    if policy is True:
        policy = LookaheadPolicy(cost)
    elif policy is False:
        policy = None
    drafter = drafter_factory()
    sessions = [list(s) for s in sessions]
    rep = SimulationReport(sessions=len(sessions))
    draft_times: list[float] = []
    update_time = start_time = 0.0
    bar = _progress(sum(len(s) for s in sessions)) if progress else None
    for si, calls in enumerate(sessions):
        session_id = f"sim-session-{si}"
        for ci, (prompt, completion) in enumerate(calls):
            rid = f"sim-{si}-{ci}"
            completion = [int(t) for t in completion]
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
                rep.steps += 1
                rep.drafted_tokens += len(tree)
                rep.accepted_tokens += len(path)
                rep.step_cost_s += cost(1 + len(tree))
                for i in path:
                    name = SOURCE_NAMES.get(tree.sources[i], str(tree.sources[i]))
                    rep.accepted_by_source[name] = rep.accepted_by_source.get(name, 0) + 1
                t0 = time.perf_counter()
                drafter.accept(rid, tree, path, new_tokens)
                update_time += time.perf_counter() - t0
            drafter.stop_request(rid)
            rep.calls += 1
            rep.completion_tokens += len(completion)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    rep.plain_cost_s = rep.completion_tokens * cost(1)
    if draft_times:
        rep.draft_us_median = statistics.median(draft_times) * 1e6
        rep.draft_us_mean = statistics.fmean(draft_times) * 1e6
    rep.update_us_per_token = update_time / max(rep.completion_tokens, 1) * 1e6
    rep.start_ms_per_call = start_time / max(rep.calls, 1) * 1e3
    return rep


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="call", desc="simulate")
