"""Replay recorded agent trajectories through agentspec, one engine session per trajectory.

Two modes, one report (:class:`ReplayReport`, a :class:`CallRecord` per call):

* ``simulate``: teacher-forced drafting (no model forward). The recorded completion decides
  how many drafted tokens are accepted; the drafting code is :mod:`agentspec.replay.simulate`'s.
* ``live``: the engine generates each call from its recorded prompt (fitted to the window
  minus ``max_new_tokens`` by dropping the oldest turns), with ``session`` = trajectory id,
  calls in order, so the session's suffix trees grow as the agent's did. Comparison methods
  (``compare=["hf", "hf_pld", "llamacpp", "agentspec_int8"]``; ``baseline=True`` is plain HF
  greedy alone) run the same prompt ids right before each call, for side-by-side speedups and
  a token-for-token identity check against plain greedy. ``agentspec bench`` is this loop.

Typical use::

    sessions = load_sessions("../shared/data/swe_agent", limit=2)
    report = replay_live(Engine.from_pretrained(), sessions, max_new_tokens=64, baseline=True)
    Console().print(render_summary(report)); plot_report(report, "replay.png")
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentspec import chat
from agentspec.replay.trajectories import Session, tokenize_call

if TYPE_CHECKING:
    from agentspec.replay.baselines import Runner

MODES = ("simulate", "live")
AGENTSPEC = "agentspec"  # the engine under test, beside the comparisons of agentspec.replay.baselines


@dataclass
class MethodRun:
    """One comparison method's run of a call (plain HF greedy, prompt lookup, llama.cpp, ...)."""

    output_tokens: int
    decode_seconds: float
    total_seconds: float
    steps: int  # decode forwards
    identical: bool | None = None  # output == plain HF greedy output (None: HF not run)


@dataclass
class MethodTotals:
    """One method's sums over the calls every method ran."""

    calls: int = 0
    output_tokens: int = 0
    decode_tokens: int = 0  # tokens after each call's first one (that one comes out of prefill)
    decode_seconds: float = 0.0
    total_seconds: float = 0.0
    steps: int = 0
    identical: int = 0  # outputs equal to plain HF greedy's, token for token
    compared: int = 0  # calls with an HF greedy output to compare with

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.decode_tokens / self.steps if self.steps else 0.0


@dataclass
class CallRecord:
    """What one replayed call did. Timing and comparison fields are empty where not measured."""

    session: str
    index: int  # call index within the session (0-based, recorded order)
    prompt_tokens: int
    output_tokens: int
    steps: int  # verification steps (target forwards in the decode loop)
    drafted: int = 0
    accepted: int = 0
    fitted: bool = False  # the prompt was shortened to fit the window
    prefill_seconds: float | None = None
    decode_seconds: float | None = None
    total_seconds: float | None = None
    methods: dict[str, MethodRun] = field(default_factory=dict)  # comparisons run on the same prompt
    identical: bool | None = None  # live output == plain HF greedy output, token for token
    modelled_seconds: float | None = None  # simulate: step costs on the fp32 cost curve

    @property
    def tokens_per_step(self) -> float:
        return self.output_tokens / self.steps if self.steps else 0.0

    @property
    def hit_rate(self) -> float:
        """Share of output tokens that came from accepted drafts."""
        return self.accepted / self.output_tokens if self.output_tokens else 0.0

    def run(self, method: str) -> MethodRun | None:
        """``method``'s run of this call (``"agentspec"``: the engine's own, live mode only)."""
        if method == AGENTSPEC:
            if self.decode_seconds is None:
                return None
            return MethodRun(self.output_tokens, self.decode_seconds, self.total_seconds or 0.0, self.steps,
                             self.identical)
        return self.methods.get(method)


@dataclass
class ReplayReport:
    """All replayed calls plus what was skipped and why."""

    mode: str
    calls: list[CallRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<where>: <reason>"
    info: dict[str, Any] = field(default_factory=dict)  # model, settings, simulation extras
    compared: list[str] = field(default_factory=list)  # comparison methods run beside agentspec (live)

    def _sum(self, name: str) -> float:
        return sum(getattr(c, name) or 0 for c in self.calls)

    @property
    def sessions(self) -> int:
        return len({c.session for c in self.calls})

    @property
    def output_tokens(self) -> int:
        return int(self._sum("output_tokens"))

    @property
    def tokens_per_step(self) -> float:
        steps = self._sum("steps")
        return self.output_tokens / steps if steps else 0.0

    @property
    def hit_rate(self) -> float:
        return self._sum("accepted") / self.output_tokens if self.output_tokens else 0.0

    @property
    def drafted_per_step(self) -> float:
        steps = self._sum("steps")
        return self._sum("drafted") / steps if steps else 0.0

    def totals(self, method: str, over: str | None = None) -> MethodTotals:
        """``method``'s sums over the calls it ran (and ``over`` ran too, when given)."""
        t = MethodTotals()
        for call in self.calls:
            run = call.run(method)
            if run is None or (over is not None and call.run(over) is None):
                continue
            t.calls += 1
            t.output_tokens += run.output_tokens
            t.decode_tokens += max(run.output_tokens - 1, 0)
            t.decode_seconds += run.decode_seconds
            t.total_seconds += run.total_seconds
            t.steps += run.steps
            t.identical += bool(run.identical)
            t.compared += run.identical is not None
        return t

    def speedup(self, method: str = AGENTSPEC, over: str = "hf", end_to_end: bool = False) -> float | None:
        """``method`` over ``over``: decode tokens/s ratio, or the wall-time ratio of whole calls
        (prefill included) with ``end_to_end``; ``None`` where either was not measured."""
        a, b = self.totals(method, over), self.totals(over, method)
        if end_to_end:
            return b.total_seconds / a.total_seconds if a.total_seconds and b.total_seconds else None
        ra, rb = a.decode_tokens_per_second, b.decode_tokens_per_second
        return ra / rb if ra and rb else None

    def decode_speedup(self) -> float | None:
        """Decode tokens/s of agentspec over plain HF greedy (live with the HF baseline only)."""
        return self.speedup(AGENTSPEC, "hf")

    def end_to_end_speedup(self) -> float | None:
        """Wall time of plain HF ``generate`` over agentspec's, whole calls (prefill included)."""
        return self.speedup(AGENTSPEC, "hf", end_to_end=True)

    def modelled_speedup(self) -> float | None:
        """Simulate: completion tokens x c(1) / sum of modelled step costs (see data/README.md)."""
        return self.info.get("modelled_speedup")

    def to_dict(self) -> dict:
        calls = [asdict(c) | {"tokens_per_step": c.tokens_per_step, "hit_rate": c.hit_rate} for c in self.calls]
        methods = {}
        for m in ([AGENTSPEC] + self.compared if self.mode == "live" else []):
            t = self.totals(m)
            methods[m] = asdict(t) | {
                "decode_tokens_per_second": t.decode_tokens_per_second, "tokens_per_step": t.tokens_per_step,
                "decode_speedup_vs_hf": self.speedup(m, "hf"),
                "end_to_end_speedup_vs_hf": self.speedup(m, "hf", end_to_end=True),
            }
        return {
            "mode": self.mode,
            "summary": {
                "sessions": self.sessions, "calls": len(self.calls), "output_tokens": self.output_tokens,
                "tokens_per_step": self.tokens_per_step, "drafted_per_step": self.drafted_per_step,
                "hit_rate": self.hit_rate, "decode_speedup": self.decode_speedup(),
                "end_to_end_speedup": self.end_to_end_speedup(), "modelled_speedup": self.modelled_speedup(),
                "identical": sum(bool(c.identical) for c in self.calls if c.identical is not None),
                "compared": sum(c.identical is not None for c in self.calls),
                "skipped": len(self.skipped),
            },
            "methods": methods,
            "info": self.info,
            "calls": calls,
            "skipped": self.skipped,
        }

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON (atomically: a crash never leaves half a report)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)


# ---------------------------------------------------------------------------------------- live
def replay_live(
    engine,
    sessions: Sequence[Session],
    *,
    max_new_tokens: int = 128,
    max_context: int | None = None,
    baseline: bool = False,
    compare: Sequence[str] = (),
    calls_per_session: int | None = None,
    on_call: Callable[[CallRecord | None], None] | None = None,
    runners: dict[str, Runner] | None = None,
    report: ReplayReport | None = None,
) -> ReplayReport:
    """Generate every recorded call with ``engine``, session by session, calls in order.

    The prompt of each call is the recorded one, fitted to ``min(max_context, window) -
    max_new_tokens`` tokens (oldest turns dropped; a call that cannot fit is skipped with a
    note). Each comparison in ``compare`` (names from :data:`agentspec.replay.baselines.COMPARISONS`;
    ``baseline=True`` adds ``"hf"``, plain HF greedy) runs the same prompt ids right before
    agentspec, call by call, so ratios compare like with like on a noisy machine. ``runners``
    replaces the runner of a comparison (tests). ``on_call`` gets each :class:`CallRecord`
    (``None`` for a skipped call); with ``report`` given, that report is filled in place, so
    ``on_call`` can save it as it grows.
    """
    from agentspec.replay.baselines import COMPARISONS, comparison_runner

    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    window = min(max_context or engine.context_window, engine.context_window)
    budget = window - max_new_tokens
    if budget <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a {window}-token window")
    compare = list(dict.fromkeys((["hf"] if baseline else []) + list(compare)))
    unknown = [m for m in compare if m not in COMPARISONS]
    if unknown:
        raise ValueError(f"unknown comparison methods {unknown}; expected some of {list(COMPARISONS)}")
    runners = dict(runners or {})
    for name in compare:
        if name not in runners:
            runners[name] = comparison_runner(name, engine, window)
    report = report if report is not None else ReplayReport("live")
    report.compared = compare
    report.info.update(model=getattr(engine, "model_name", ""), max_new_tokens=max_new_tokens, window=window,
                       compared=compare)
    for session in sessions:
        for index, call in enumerate(session.calls[:calls_per_session]):
            record = _live_call(engine, session, index, call, budget, max_new_tokens, runners, report)
            if on_call:
                on_call(record)
    return report


def _live_call(engine, session: Session, index: int, call, budget: int, max_new_tokens: int,
               runners: dict[str, Runner], report: ReplayReport) -> CallRecord | None:
    where = f"{session.id} call {index}"
    try:
        prompt_ids = chat.prompt_ids(engine.tokenizer, call.messages)
        full = len(prompt_ids)
        if full > budget:  # drop the oldest turns (system prompt and task kept)
            pair = tokenize_call(engine.tokenizer, call, budget)
            if pair is None:
                report.skipped.append(f"{where}: prompt of {full} tokens cannot be fitted to {budget} tokens")
                return None
            prompt_ids = pair[0]
    except Exception as exc:  # e.g. a message the chat template rejects: skip the call, keep going
        report.skipped.append(f"{where}: cannot render the prompt ({exc})")
        return None
    record = CallRecord(session.id, index, len(prompt_ids), 0, 0, fitted=len(prompt_ids) < full)
    outputs = {}
    for name, runner in runners.items():
        ids, decode, total, steps = runner(prompt_ids, session.id, max_new_tokens)
        outputs[name] = ids
        record.methods[name] = MethodRun(len(ids), decode, total, steps)
    t0 = time.perf_counter()
    try:
        result = engine.generate(prompt_ids, session=session.id, max_new_tokens=max_new_tokens)
    except ValueError as exc:
        report.skipped.append(f"{where}: {exc}")
        return None
    record.total_seconds = time.perf_counter() - t0
    stats = result.stats
    record.output_tokens = len(result.token_ids)
    record.steps, record.drafted, record.accepted = stats.steps, stats.drafted_tokens, stats.accepted_tokens
    record.prefill_seconds, record.decode_seconds = stats.prefill_seconds, stats.decode_seconds
    if "hf" in outputs:
        record.identical = result.token_ids == outputs["hf"]
    from agentspec.replay.baselines import REFERENCES

    for name, run in record.methods.items():  # each against plain greedy decoding of the same weights
        reference = REFERENCES.get(name, "hf")
        run.identical = None if reference == name or reference not in outputs else outputs[name] == outputs[reference]
    report.calls.append(record)
    return record


# ---------------------------------------------------------------------------------------- simulate
class _CallRecorder:
    """A drafter proxy: :func:`agentspec.replay.simulate.simulate_sessions` drives the real drafter
    through it, and it turns the calls it sees into :class:`CallRecord` s (the simulation
    itself stays in one place, :mod:`agentspec.replay.simulate`)."""

    def __init__(self, inner, order: list[tuple[str, int]], cost, on_call) -> None:
        self._inner = inner
        self._order = iter(order)  # (session id, call index) of each call, in simulation order
        self._cost = cost
        self._on_call = on_call
        self._open: dict[str, CallRecord] = {}
        self.records: list[CallRecord] = []

    def start_request(self, request_id: str, session_id: str | None, prompt_ids) -> None:
        sid, index = next(self._order)
        self._open[request_id] = CallRecord(sid, index, len(prompt_ids), 0, 0, modelled_seconds=0.0)
        self._inner.start_request(request_id, session_id, prompt_ids)

    def propose(self, request_id: str, budget: int):
        return self._inner.propose(request_id, budget)

    def accept(self, request_id: str, tree, accepted, new_tokens) -> None:
        r = self._open[request_id]
        r.steps += 1
        r.drafted += len(tree)
        r.accepted += len(accepted)
        r.output_tokens += len(new_tokens)
        r.modelled_seconds += self._cost(1 + len(tree))
        self._inner.accept(request_id, tree, accepted, new_tokens)

    def stop_request(self, request_id: str) -> None:
        self._inner.stop_request(request_id)
        record = self._open.pop(request_id)
        self.records.append(record)
        if self._on_call:
            self._on_call(record)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def replay_simulate(
    sessions: Sequence[Session],
    tokenizer,
    *,
    max_prompt_tokens: int | None = None,
    drafter_factory: Callable[[], Any] | None = None,
    policy: bool = True,
    budget: int = 32,
    on_call: Callable[[CallRecord | None], None] | None = None,
) -> ReplayReport:
    """Teacher-forced drafting over ``sessions`` (no model forward), via
    :func:`agentspec.replay.simulate.simulate_sessions`, with a :class:`CallRecord` per call.

    Prompts are tokenised with ``tokenizer`` (fitted to ``max_prompt_tokens`` if given), the
    completion is the recorded one plus EOS. ``policy=False`` verifies every proposed tree as is.
    The modelled speedup uses the fp32 cost curve of DESIGN.md.
    """
    from agentspec.lookahead import CostCurve
    from agentspec.replay.simulate import simulate_sessions

    report = ReplayReport("simulate", info={"max_prompt_tokens": max_prompt_tokens, "policy": policy,
                                            "budget": budget})
    tokenized, order = [], []
    for session in sessions:
        calls = []
        for index, call in enumerate(session.calls):
            where = f"{session.id} call {index}"
            try:
                pair = tokenize_call(tokenizer, call, max_prompt_tokens)
            except Exception as exc:  # e.g. a message the chat template rejects
                report.skipped.append(f"{where}: cannot render the prompt ({exc})")
                pair = None
            else:
                if pair is None:
                    report.skipped.append(f"{where}: prompt cannot be fitted to {max_prompt_tokens} tokens")
            if pair is None:
                if on_call:
                    on_call(None)
                continue
            calls.append(pair)
            order.append((session.id, index))
        if calls:
            tokenized.append(calls)
    if drafter_factory is None:
        from agentspec.draft.builder import SuffixDrafter

        drafter_factory = SuffixDrafter
    cost = CostCurve()
    recorder: list[_CallRecorder] = []

    def factory():
        recorder.append(_CallRecorder(drafter_factory(), order, cost, on_call))
        return recorder[-1]

    sim = simulate_sessions(tokenized, drafter_factory=factory, cost_curve=cost, policy=policy, budget=budget)
    report.calls = recorder[0].records if recorder else []
    report.info["modelled_speedup"] = sim.speedup
    report.info["simulation"] = sim.to_dict()
    return report


# ---------------------------------------------------------------------------------------- output
def render_methods(report: ReplayReport):
    """A rich table, one row per method (live): decode tok/s, tokens/step, speedups vs HF greedy."""
    from rich.table import Table

    from agentspec.replay.baselines import COMPARISONS

    labels = {AGENTSPEC: "agentspec"} | COMPARISONS
    methods = report.compared + [AGENTSPEC]
    n = report.totals(AGENTSPEC).calls
    table = Table(title=f"agentspec live benchmark: {report.sessions} sessions, {n} calls")
    for col in ("method", "out tokens", "decode tok/s", "tokens/step", "decode speedup", "end-to-end s",
                "e2e speedup", "identical to plain greedy, same weights"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m in methods:
        t = report.totals(m)
        decode, e2e = report.speedup(m, "hf"), report.speedup(m, "hf", end_to_end=True)
        table.add_row(
            labels[m], str(t.output_tokens), f"{t.decode_tokens_per_second:.1f}", f"{t.tokens_per_step:.2f}",
            "-" if decode is None else f"{decode:.2f}x", f"{t.total_seconds:.1f}",
            "-" if e2e is None else f"{e2e:.2f}x", f"{t.identical}/{t.compared}" if t.compared else "-",
        )
    return table


def render_summary(report: ReplayReport):
    """A rich table: calls, tokens, tokens per step, hit rate, speedups where measured."""
    from rich.table import Table

    table = Table(title=f"agentspec replay ({report.mode}): {report.sessions} sessions, {len(report.calls)} calls")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("calls replayed", str(len(report.calls))),
        ("calls skipped", str(len(report.skipped))),
        ("prompts fitted (oldest turns dropped)", str(sum(c.fitted for c in report.calls))),
        ("output tokens", f"{report.output_tokens:,}"),
        ("tokens / verification step", f"{report.tokens_per_step:.2f}"),
        ("drafted / step", f"{report.drafted_per_step:.1f}"),
        ("hit rate (tokens from drafts)", f"{report.hit_rate:.1%}"),
    ]
    for label, value in (("modelled speedup (fp32 cost curve)", report.modelled_speedup()),
                         ("decode speedup vs HF greedy", report.decode_speedup()),
                         ("end-to-end speedup vs HF greedy", report.end_to_end_speedup())):
        if value is not None:
            rows.append((label, f"{value:.2f}x"))
    compared = [c for c in report.calls if c.identical is not None]
    if compared:
        rows.append(("identical to HF greedy", f"{sum(c.identical for c in compared)}/{len(compared)}"))
    for row in rows:
        table.add_row(*row)
    return table


def plot_report(report: ReplayReport, path: str | Path) -> Path:
    """Save a PNG: tokens per verification step vs call index within the session (one faint line
    per session, the mean in bold), and the cumulative hit rate over all calls in replay order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_session: dict[str, list[CallRecord]] = {}
    for c in report.calls:
        by_session.setdefault(c.session, []).append(c)
    for calls in by_session.values():
        left.plot([c.index for c in calls], [c.tokens_per_step for c in calls], color="tab:blue", alpha=0.25, lw=1)
    sums: dict[int, list[float]] = {}
    for c in report.calls:
        sums.setdefault(c.index, []).append(c.tokens_per_step)
    xs = sorted(sums)
    left.plot(xs, [sum(sums[x]) / len(sums[x]) for x in xs], color="tab:blue", lw=2.5, label="mean over sessions")
    left.axhline(1.0, color="grey", ls=":", lw=1)
    left.set(xlabel="call index within the session", ylabel="tokens per verification step",
             title="Tokens per step by position in the session")
    left.legend(loc="upper left")

    accepted = output = 0
    cumulative = []
    boundaries = []
    for i, c in enumerate(report.calls):
        if i and c.session != report.calls[i - 1].session:
            boundaries.append(i)
        accepted += c.accepted
        output += c.output_tokens
        cumulative.append(accepted / output if output else 0.0)
    right.plot(range(len(cumulative)), cumulative, color="tab:green", lw=2)
    for b in boundaries:
        right.axvline(b, color="grey", alpha=0.2, lw=0.8)
    right.set(xlabel="call (replay order; grey lines = new session)", ylabel="cumulative hit rate",
              title="Share of output tokens from accepted drafts", ylim=(0, 1))
    fig.suptitle(f"agentspec replay ({report.mode}): {report.sessions} sessions, {len(report.calls)} calls")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
