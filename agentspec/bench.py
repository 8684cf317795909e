"""Live benchmark: the same agent calls through plain HF greedy, HF prompt lookup and agentspec.

Calls are interleaved in one process (call k runs under every method before call k+1), so
the ratios compare like with like on a noisy machine. Decode speed excludes prefill: for HF
``generate`` it is timed from the first generated token (a streamer records when each step's
tokens arrive); agentspec reports its own prefill and decode times. End-to-end time is the
wall time of the whole call (agentspec reuses prefix KV across a session's calls; plain HF
``generate`` does not).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from agentspec import chat
from agentspec.baselines import hf_generate

METHODS = ("hf", "hf_pld", "agentspec", "llamacpp")
METHOD_LABELS = {"hf": "HF greedy", "hf_pld": "HF prompt lookup", "agentspec": "agentspec",
                 "llamacpp": "llama.cpp (GGUF, prefix reuse)"}


@dataclass
class MethodTotals:
    """Sums over the benchmarked calls for one method."""

    calls: int = 0
    output_tokens: int = 0
    decode_tokens: int = 0  # tokens after the first one (the first comes out of prefill)
    decode_seconds: float = 0.0
    total_seconds: float = 0.0
    steps: int = 0  # decode forwards (verification steps)
    identical: int = 0  # outputs equal to plain HF greedy, token for token

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.decode_tokens / self.steps if self.steps else 0.0


@dataclass
class CallResult:
    session: str
    call: int
    prompt_tokens: int
    token_ids: dict[str, list[int]] = field(default_factory=dict)
    decode_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    hit_rate: float = 0.0
    accepted: int = 0  # agentspec draft tokens accepted


@dataclass
class LiveReport:
    methods: Sequence[str]
    totals: dict[str, MethodTotals] = field(default_factory=dict)
    calls: list[CallResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    accepted_tokens: int = 0

    def speedup(self, method: str, base: str = "hf", end_to_end: bool = False) -> float:
        a, b = self.totals.get(method), self.totals.get(base)
        if not a or not b:
            return 0.0
        if end_to_end:
            return b.total_seconds / a.total_seconds if a.total_seconds else 0.0
        rb, ra = b.decode_tokens_per_second, a.decode_tokens_per_second
        return ra / rb if rb else 0.0

    def to_dict(self) -> dict:
        totals = {}
        for m, t in self.totals.items():
            totals[m] = asdict(t) | {
                "decode_tokens_per_second": t.decode_tokens_per_second,
                "tokens_per_step": t.tokens_per_step,
                "decode_speedup_vs_hf": self.speedup(m),
                "end_to_end_speedup_vs_hf": self.speedup(m, end_to_end=True),
            }
        out_tokens = self.totals["agentspec"].output_tokens if "agentspec" in self.totals else 0
        return {
            "methods": list(self.methods),
            "totals": totals,
            "agentspec_hit_rate": self.accepted_tokens / out_tokens if out_tokens else 0.0,
            "calls": [asdict(c) for c in self.calls],
            "skipped": self.skipped,
        }


def bench_call(engine, prompt_ids: list[int], session: str, methods: Sequence[str], max_new_tokens: int,
               result: CallResult, llamacpp=None) -> None:
    """Run one call under every method, filling ``result``."""
    for method in methods:
        if method == "llamacpp":
            ids, decode, total, steps = llamacpp.generate(prompt_ids, max_new_tokens, engine.eos_ids)
            result.token_ids[method], result.decode_seconds[method] = ids, decode
            result.total_seconds[method], result.steps[method] = total, steps
        elif method == "agentspec":
            t0 = time.perf_counter()
            out = engine.generate(prompt_ids, session=session, max_new_tokens=max_new_tokens)
            result.total_seconds[method] = time.perf_counter() - t0
            result.token_ids[method] = out.token_ids
            result.decode_seconds[method] = out.stats.decode_seconds
            result.steps[method] = out.stats.steps
            result.hit_rate = out.stats.hit_rate
            result.accepted = out.stats.accepted_tokens
        else:
            extra = {"prompt_lookup_num_tokens": 10} if method == "hf_pld" else {}
            ids, decode, total, steps = hf_generate(engine.model, prompt_ids, max_new_tokens, engine.eos_ids, **extra)
            result.token_ids[method] = ids
            result.decode_seconds[method] = decode
            result.total_seconds[method] = total
            result.steps[method] = steps


def run_live(
    engine,
    sessions,
    *,
    max_new_tokens: int = 128,
    max_context: int = 4096,
    calls_per_session: int | None = None,
    methods: Sequence[str] = METHODS,
    on_call: Callable[[CallResult], None] | None = None,
) -> LiveReport:
    """Benchmark ``sessions`` (from :func:`agentspec.trajectories.load_sessions`) call by call."""
    report = LiveReport(methods=list(methods), totals={m: MethodTotals() for m in methods})
    llamacpp = None
    if "llamacpp" in methods:
        from agentspec.baselines import LlamaCppBaseline
        from agentspec.model import resolve_model

        source = resolve_model(engine.model_source)
        if not source.is_gguf:
            raise ValueError("the llama.cpp baseline needs a GGUF model (the default one is)")
        llamacpp = LlamaCppBaseline(str(source.path), n_ctx=min(max_context, engine.context_window))
    budget = min(max_context, engine.context_window) - max_new_tokens
    for session in sessions:
        for index, call in enumerate(session.calls[:calls_per_session]):
            messages = chat.fit_messages(call.messages, engine.count_tokens, budget)
            if messages is None:
                report.skipped.append(f"{session.id} call {index}: prompt does not fit {budget} tokens")
                continue
            prompt_ids = chat.prompt_ids(engine.tokenizer, messages)
            result = CallResult(session.id, index, len(prompt_ids))
            bench_call(engine, prompt_ids, session.id, methods, max_new_tokens, result, llamacpp)
            _add(report, result)
            if on_call:
                on_call(result)
    return report


def _add(report: LiveReport, result: CallResult) -> None:
    report.calls.append(result)
    reference = result.token_ids.get("hf")
    for m in report.methods:
        t = report.totals[m]
        ids = result.token_ids[m]
        t.calls += 1
        t.output_tokens += len(ids)
        t.decode_tokens += max(len(ids) - 1, 0)
        t.decode_seconds += result.decode_seconds[m]
        t.total_seconds += result.total_seconds[m]
        t.steps += result.steps[m]
        t.identical += int(reference is not None and ids == reference)
    report.accepted_tokens += result.accepted


def render_live(report: LiveReport):
    """A rich table of the report."""
    from rich.table import Table

    table = Table(title=f"Live benchmark: {report.totals[report.methods[0]].calls} calls")
    for col in ("method", "out tokens", "decode tok/s", "tokens/step", "decode speedup", "end-to-end s",
                "e2e speedup", "identical to greedy"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for m in report.methods:
        t = report.totals[m]
        table.add_row(
            METHOD_LABELS[m], str(t.output_tokens), f"{t.decode_tokens_per_second:.1f}", f"{t.tokens_per_step:.2f}",
            f"{report.speedup(m):.2f}x", f"{t.total_seconds:.1f}", f"{report.speedup(m, end_to_end=True):.2f}x",
            f"{t.identical}/{t.calls}" if "hf" in report.totals else "-",
        )
    return table
