"""What a replay or benchmark measured: one :class:`ReplayedCall` per call, summed in a
:class:`ReplayReport`, shown as tables (``rich``) and a plot (``matplotlib``).

The rates (tokens per step, hit rate, ...) are :class:`agentspec.stats.DraftCounts`'s: each
call carries the engine's own :class:`~agentspec.stats.SpecStats`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

from rich.table import Table

from agentspec.stats import DraftCounts, SpecStats

AGENTSPEC = "agentspec"  # the engine under test; always run
# what agentspec is compared with (runners in agentspec.replay.baselines): name -> label
COMPARISONS = {
    "agentspec_nospec": "agentspec, speculation off",
    "hf": "HF greedy",
    "hf_pld": "HF prompt lookup",
    "llamacpp": "llama.cpp (GGUF, prefix reuse)",
    "llamacpp_pld": "llama.cpp, prompt lookup",
    "agentspec_int8": "agentspec, int8 weights",
    "hf_int8": "HF greedy, int8 weights",
}
# the plain greedy run a method's outputs must equal, token for token (default: "hf")
REFERENCES = {"agentspec_int8": "hf_int8", "llamacpp_pld": "llamacpp"}
SPECULATION_OFF = "agentspec_nospec"  # the same engine decoding one token per step: speculation's own gain
COPY_SHARE = 0.8  # an output is a copy of earlier text when its longest match in the prompt covers this much of it


def copied_share(output_ids: Sequence[int], prompt_ids: Sequence[int]) -> float:
    """The share of ``output_ids`` covered by its longest contiguous match in ``prompt_ids`` (0 to 1)."""
    if not output_ids:
        return 0.0
    matcher = SequenceMatcher(None, list(output_ids), list(prompt_ids), autojunk=False)
    return matcher.find_longest_match(0, len(output_ids), 0, len(prompt_ids)).size / len(output_ids)


@dataclass
class MethodRun:
    """One method's run of a call (agentspec, plain HF greedy, prompt lookup, llama.cpp, ...)."""

    output_tokens: int
    decode_seconds: float
    total_seconds: float
    steps: int  # decode forwards (the first token comes out of the prefill)
    identical: bool | None = None  # output == the reference greedy output (None: not compared)
    drafted_tokens: int = 0
    accepted_tokens: int = 0


@dataclass
class MethodTotals(DraftCounts):
    """One method's sums over the calls it ran."""

    calls: int = 0
    decode_tokens: int = 0  # tokens after each call's first one (that one comes out of the prefill)
    decode_seconds: float = 0.0
    total_seconds: float = 0.0
    identical: int = 0  # outputs equal to the reference greedy output, token for token
    compared: int = 0  # calls with a reference output to compare with

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def count(self, run: MethodRun) -> None:
        """Add one call's run."""
        self.calls += 1
        self.output_tokens += run.output_tokens
        self.decode_tokens += max(run.output_tokens - 1, 0)
        self.steps += run.steps
        self.drafted_tokens += run.drafted_tokens
        self.accepted_tokens += run.accepted_tokens
        self.decode_seconds += run.decode_seconds
        self.total_seconds += run.total_seconds
        self.identical += bool(run.identical)
        self.compared += run.identical is not None


@dataclass
class ReplayedCall:
    """What one replayed call did: agentspec's statistics, and the comparisons run on the same prompt."""

    session: str
    index: int  # call index within the session (0-based, recorded order)
    prompt_tokens: int
    stats: SpecStats = field(default_factory=SpecStats)
    fitted: bool = False  # the prompt was shortened to fit the window
    total_seconds: float | None = None  # live: the whole call, prefill included
    methods: dict[str, MethodRun] = field(default_factory=dict)  # comparisons run on the same prompt
    identical: bool | None = None  # live output == plain greedy output (HF, or speculation off), token for token
    modelled_seconds: float | None = None  # simulate: step costs on the cost curve
    copied: float | None = None  # live: agentspec's output share covered by its longest match in the prompt

    @property
    def is_copy(self) -> bool:
        """The output copies earlier text (see :data:`COPY_SHARE`)."""
        return self.copied is not None and self.copied >= COPY_SHARE

    def run(self, method: str) -> MethodRun | None:
        """``method``'s run of this call (``"agentspec"``: the engine's own, live mode only)."""
        if method != AGENTSPEC:
            return self.methods.get(method)
        if self.total_seconds is None:
            return None
        s = self.stats
        return MethodRun(s.output_tokens, s.decode_seconds, self.total_seconds, s.steps, self.identical,
                         s.drafted_tokens, s.accepted_tokens)


@dataclass
class ReplayReport:
    """All replayed calls plus what was skipped and why."""

    mode: str  # "simulate" | "live"
    calls: list[ReplayedCall] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<where>: <reason>"
    info: dict[str, Any] = field(default_factory=dict)  # model, settings, simulation extras
    compared: list[str] = field(default_factory=list)  # comparison methods run beside agentspec (live)

    @property
    def sessions(self) -> int:
        return len({c.session for c in self.calls})

    @property
    def stats(self) -> SpecStats:
        """agentspec's statistics summed over every call."""
        total = SpecStats()
        for call in self.calls:
            total.add(call.stats)
        return total

    @property
    def modelled_seconds(self) -> float:
        return sum(c.modelled_seconds or 0.0 for c in self.calls)

    def totals(self, method: str, over: str | None = None, *, not_copies: bool = False) -> MethodTotals:
        """``method``'s sums over the calls it ran (and ``over`` ran too, when given); with
        ``not_copies``, only over the calls whose output is not a copy of earlier text."""
        totals = MethodTotals()
        for call in self.calls:
            run = call.run(method)
            if run is not None and (over is None or call.run(over) is not None) and not (not_copies and call.is_copy):
                totals.count(run)
        return totals

    def speedup(self, method: str = AGENTSPEC, over: str = "hf", end_to_end: bool = False, *,
                not_copies: bool = False) -> float | None:
        """``method`` over ``over``: decode tokens/s ratio, or the wall-time ratio of whole calls
        (prefill included) with ``end_to_end``; ``None`` where either was not measured."""
        a, b = self.totals(method, over, not_copies=not_copies), self.totals(over, method, not_copies=not_copies)
        if end_to_end:
            return b.total_seconds / a.total_seconds if a.total_seconds and b.total_seconds else None
        ra, rb = a.decode_tokens_per_second, b.decode_tokens_per_second
        return ra / rb if ra and rb else None

    def modelled_speedup(self) -> float | None:
        """Simulate: output tokens x c(1) / sum of modelled step costs c(1 + drafted)."""
        return self.info.get("modelled_speedup")

    def tokens_per_second(self) -> float | None:
        """Live: agentspec's decode tokens/s; simulate: output tokens / modelled seconds."""
        if self.mode == "live":
            return self.totals(AGENTSPEC).decode_tokens_per_second or None
        return self.stats.output_tokens / self.modelled_seconds if self.modelled_seconds else None

    def to_dict(self) -> dict:
        calls = [asdict(c) | c.stats.rates() for c in self.calls]
        methods = {}
        for m in ([AGENTSPEC] + self.compared if self.mode == "live" else []):
            t = self.totals(m)
            methods[m] = asdict(t) | t.rates() | {
                "decode_tokens_per_second": t.decode_tokens_per_second,
                "decode_speedup_vs_hf": self.speedup(m, "hf"),
                "end_to_end_speedup_vs_hf": self.speedup(m, "hf", end_to_end=True),
                "not_copies": {"decode_tokens_per_second": self.totals(m, not_copies=True).decode_tokens_per_second,
                               "decode_speedup_vs_hf": self.speedup(m, "hf", not_copies=True)},
            }
        stats = self.stats
        return {
            "mode": self.mode,
            "summary": {
                "sessions": self.sessions, "calls": len(self.calls), "output_tokens": stats.output_tokens,
                **stats.rates(), "tokens_per_second": self.tokens_per_second(),
                "decode_speedup": self.speedup(AGENTSPEC, "hf"),
                "end_to_end_speedup": self.speedup(AGENTSPEC, "hf", end_to_end=True),
                "modelled_speedup": self.modelled_speedup(),
                "speculation_gain": self.speedup(AGENTSPEC, SPECULATION_OFF),
                "speculation_gain_not_copies": self.speedup(AGENTSPEC, SPECULATION_OFF, not_copies=True),
                "copies": sum(c.is_copy for c in self.calls),
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


# ---------------------------------------------------------------------------------------- tables
def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render_methods(report: ReplayReport):
    """A rich table, one row per method (live): decode tok/s, tokens/step, speedups vs HF greedy."""
    labels = {AGENTSPEC: "agentspec"} | COMPARISONS
    n = report.totals(AGENTSPEC).calls
    originals = report.totals(AGENTSPEC, not_copies=True).calls
    caption = (f"not copies: the {originals} of {n} calls whose output's longest match in the prompt covers less "
               f"than {COPY_SHARE:.0%} of it")
    if SPECULATION_OFF in report.compared:
        gain, gain_originals = (report.speedup(AGENTSPEC, SPECULATION_OFF, not_copies=c) for c in (False, True))
        caption += f"; speculation's own decode gain: {_ratio(gain)} (all), {_ratio(gain_originals)} (not copies)"
    table = Table(title=f"agentspec live benchmark: {report.sessions} sessions, {n} calls", caption=caption)
    for col in ("method", "out tokens", "decode tok/s", "tokens/step", "decode speedup", "end-to-end s",
                "e2e speedup", "tok/s, not copies", "speedup, not copies",
                "identical to plain greedy, same weights and KV"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=col == "method")
    for m in report.compared + [AGENTSPEC]:
        t, originals = report.totals(m), report.totals(m, not_copies=True)
        table.add_row(
            labels[m], str(t.output_tokens), f"{t.decode_tokens_per_second:.1f}", f"{t.tokens_per_step:.2f}",
            _ratio(report.speedup(m, "hf")), f"{t.total_seconds:.1f}",
            _ratio(report.speedup(m, "hf", end_to_end=True)), f"{originals.decode_tokens_per_second:.1f}",
            _ratio(report.speedup(m, "hf", not_copies=True)), f"{t.identical}/{t.compared}" if t.compared else "-",
        )
    return table


def render_summary(report: ReplayReport):
    """A rich table: calls, tokens, tokens per step, tokens/s, hit rate, speedups where measured."""
    stats = report.stats
    table = Table(title=f"agentspec replay ({report.mode}): {report.sessions} sessions, {len(report.calls)} calls")
    table.add_column("metric")
    table.add_column("value", justify="right")
    speed = report.tokens_per_second()
    speed_label = "decode tokens / s" if report.mode == "live" else "modelled tokens / s (cost curve)"
    rows = [
        ("calls replayed", str(len(report.calls))),
        ("calls skipped", str(len(report.skipped))),
        ("prompts fitted (oldest turns dropped)", str(sum(c.fitted for c in report.calls))),
        ("output tokens", f"{stats.output_tokens:,}"),
        ("tokens / verification step", f"{stats.tokens_per_step:.2f}"),
        (speed_label, "-" if speed is None else f"{speed:.1f}"),
        ("drafted / step", f"{stats.drafted_per_step:.1f}"),
        ("hit rate (tokens from drafts)", f"{stats.hit_rate:.1%}"),
    ]
    for label, value in (("modelled speedup (cost curve)", report.modelled_speedup()),
                         ("decode speedup vs HF greedy", report.speedup(AGENTSPEC, "hf")),
                         ("end-to-end speedup vs HF greedy", report.speedup(AGENTSPEC, "hf", end_to_end=True))):
        if value is not None:
            rows.append((label, _ratio(value)))
    compared = [c for c in report.calls if c.identical is not None]
    if compared:
        rows.append(("identical to plain greedy", f"{sum(c.identical for c in compared)}/{len(compared)}"))
    for row in rows:
        table.add_row(*row)
    return table


# ---------------------------------------------------------------------------------------- plot
def plot_report(report: ReplayReport, path: str | Path) -> Path:
    """Save a PNG: tokens per verification step vs call index within the session (one faint line
    per session, the mean in bold), and the cumulative hit rate over all calls in replay order."""
    import matplotlib  # deferred: only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_session: dict[str, list[ReplayedCall]] = {}
    by_index: dict[int, list[float]] = {}
    for c in report.calls:
        by_session.setdefault(c.session, []).append(c)
        by_index.setdefault(c.index, []).append(c.stats.tokens_per_step)
    for calls in by_session.values():
        left.plot([c.index for c in calls], [c.stats.tokens_per_step for c in calls], color="tab:blue", alpha=0.25,
                  lw=1)
    xs = sorted(by_index)
    left.plot(xs, [sum(by_index[x]) / len(by_index[x]) for x in xs], color="tab:blue", lw=2.5,
              label="mean over sessions")
    left.axhline(1.0, color="grey", ls=":", lw=1)
    left.set(xlabel="call index within the session", ylabel="tokens per verification step",
             title="Tokens per step by position in the session")
    left.legend(loc="upper left")

    running = SpecStats()
    cumulative = []
    for i, c in enumerate(report.calls):
        if i and c.session != report.calls[i - 1].session:
            right.axvline(i, color="grey", alpha=0.2, lw=0.8)
        cumulative.append(running.add(c.stats).hit_rate)
    right.plot(range(len(cumulative)), cumulative, color="tab:green", lw=2)
    right.set(xlabel="call (replay order; grey lines = new session)", ylabel="cumulative hit rate",
              title="Share of output tokens from accepted drafts", ylim=(0, 1))
    fig.suptitle(f"agentspec replay ({report.mode}): {report.sessions} sessions, {len(report.calls)} calls")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
