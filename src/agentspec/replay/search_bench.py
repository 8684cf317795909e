"""The tree-search benchmark: accuracy, KV held and throughput of search policies on checkable tasks.

Every method samples ``W`` trajectories of each task at temperature 1.0 with the same seeds and
ranks them by the same score: the task's scorer where it names one (e.g. the arithmetic verifier of
the multi-step word problems), else the model's mean token log-probability; the top one is the
answer, checked by the task's program (:mod:`agentspec.replay.search_tasks`). Methods:

* ``hf``: HF ``generate(num_return_sequences=W)`` best-of-N, the baseline users have. Its KV is
  counted as it holds it: ``W`` copies of the prompt and of the longest output so far;
* ``loop``: the same engine generating the ``W`` samples one after another (``engine.generate``);
  no ranking (it returns no scores), so only its coverage and throughput are reported;
* ``best_of_n``, ``beam``, ``rebase``, ``ets``: ``engine.search`` with that policy, drafting across
  siblings; ``<policy>-nodraft``: the same without drafting; ``ets-coarse``: ETS with its step
  clusters cut at cosine distance 0.2 instead of the paper's 0.05 (hidden states of one model lie
  farther apart than a sentence embedder's: at 0.05 nearly every leaf is its own cluster).

Per method: accuracy with its 95% Wilson interval, coverage (any of the ``W`` correct), KV held
(peak and mean over a search, averaged over tasks), tokens/s across all trajectories, wall time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from agentspec.replay.search_tasks import SCORERS, SearchTask, wilson
from agentspec.search.selection import CLUSTER_DISTANCE

POLICIES = ("best_of_n", "beam", "rebase", "ets")
BASELINES = ("hf", "loop")
METHODS = BASELINES + POLICIES + tuple(f"{p}-nodraft" for p in POLICIES) + ("ets-coarse",)
COARSE_CLUSTER_DISTANCE = 0.2  # "ets-coarse": the cluster cut scaled to the model's hidden-state embeddings


@dataclass
class SearchBenchConfig:
    """Settings shared by every method (the papers' search settings, scaled to a CPU)."""

    width: int = 16  # trajectories per task (W)
    max_new_tokens: int = 64  # tokens per trajectory at most
    max_step_tokens: int = 32  # tokens per reasoning step at most
    step_stop: str = "\n\n"
    temperature: float = 1.0
    seed: int = 0  # task i uses seed + i in every method
    lambda_kv: float = 1.0
    lambda_cover: float = 1.5


@dataclass
class Run:
    """One method on one task."""

    task: str
    method: str
    correct: bool | None  # the top-ranked trajectory (None: the method ranks nothing)
    covered: bool  # any trajectory correct
    trajectories: int
    generated_tokens: int
    wall_seconds: float
    kv_peak_tokens: int
    kv_mean_tokens: float
    kv_bytes_per_token: int
    forwards: int = 0
    accepted_draft_tokens: int = 0
    best_text: str = ""


@dataclass
class MethodSummary:
    """A method's figures over all tasks."""

    method: str
    tasks: int
    correct: int | None
    accuracy: float | None
    accuracy_ci: tuple[float, float] | None
    coverage: float
    kv_peak_tokens: float  # mean over tasks of the search's peak
    kv_mean_tokens: float
    kv_peak_mb: float
    kv_mean_mb: float
    tokens_per_second: float  # all trajectories' tokens / all wall time
    wall_seconds: float
    draft_share: float  # generated tokens that came from accepted drafts


@dataclass
class SearchBenchReport:
    """Everything one run measured; ``save`` writes JSON."""

    tasks_path: str
    config: SearchBenchConfig
    runs: list[Run] = field(default_factory=list)

    def summaries(self) -> list[MethodSummary]:
        methods = list(dict.fromkeys(r.method for r in self.runs))
        return [summarize(m, [r for r in self.runs if r.method == m]) for m in methods]

    def to_dict(self) -> dict:
        return {"tasks_path": self.tasks_path, "config": asdict(self.config),
                "summary": [asdict(s) for s in self.summaries()], "targets": targets(self.summaries()),
                "runs": [asdict(r) for r in self.runs]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def summarize(method: str, runs: Sequence[Run]) -> MethodSummary:
    """Aggregate one method's runs."""
    n = len(runs)
    ranked = [r for r in runs if r.correct is not None]
    correct = sum(bool(r.correct) for r in ranked) if ranked else None
    mean = (lambda xs: sum(xs) / n if n else 0.0)  # noqa: E731
    wall = sum(r.wall_seconds for r in runs)
    generated = sum(r.generated_tokens for r in runs)
    mb = [r.kv_bytes_per_token / 2**20 for r in runs]
    return MethodSummary(
        method=method, tasks=n, correct=correct,
        accuracy=correct / len(ranked) if ranked else None,
        accuracy_ci=wilson(correct, len(ranked)) if ranked else None,
        coverage=mean([float(r.covered) for r in runs]),
        kv_peak_tokens=mean([r.kv_peak_tokens for r in runs]),
        kv_mean_tokens=mean([r.kv_mean_tokens for r in runs]),
        kv_peak_mb=mean([r.kv_peak_tokens * m for r, m in zip(runs, mb)]),
        kv_mean_mb=mean([r.kv_mean_tokens * m for r, m in zip(runs, mb)]),
        tokens_per_second=generated / wall if wall > 0 else 0.0, wall_seconds=wall,
        draft_share=sum(r.accepted_draft_tokens for r in runs) / generated if generated else 0.0,
    )


# ---------------------------------------------------------------------------------------- methods
def mean_logprob_ranking(texts: Sequence[str], logprobs: Sequence[float]) -> list[str]:
    """Texts best first by mean token log-probability (the search's default score)."""
    order = sorted(range(len(texts)), key=lambda i: -logprobs[i])
    return [texts[i] for i in order]


@torch.inference_mode()
def run_hf(engine: Any, task: SearchTask, config: SearchBenchConfig, seed: int) -> Run:
    """HF ``generate(num_return_sequences=W)`` best-of-N on the engine's model."""
    ids = torch.tensor([engine.encode_prompt(task.messages)], device=engine.device)
    eos = sorted(engine.eos_ids)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = engine.model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=config.temperature, top_p=1.0,
        top_k=0, num_return_sequences=config.width, max_new_tokens=config.max_new_tokens, eos_token_id=eos,
        pad_token_id=eos[0], output_scores=True, return_dict_in_generate=True)
    wall = time.perf_counter() - t0
    new = out.sequences[:, ids.shape[1]:]  # [W, T]
    logp = engine.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)  # [W, T]
    lengths = _lengths(new, set(eos))
    texts, means = [], []
    for row, n in enumerate(lengths):
        texts.append(engine.tokenizer.decode(new[row, :n].tolist(), skip_special_tokens=True))
        means.append(float(logp[row, :n].float().mean()) if n else -math.inf)
    steps = new.shape[1]  # every row keeps its KV until the longest ends
    prompt = ids.shape[1]
    ranked = rank_by_scorer(task, texts, mean_logprob_ranking(texts, means), config.step_stop)
    return _run(task, "hf", ranked, texts, generated=sum(lengths), wall=wall,
                kv_peak=config.width * (prompt + steps), kv_mean=config.width * (prompt + (steps + 1) / 2),
                bytes_per_token=kv_bytes_per_token(engine), forwards=steps)


def run_loop(engine: Any, task: SearchTask, config: SearchBenchConfig, seed: int) -> Run:
    """``W`` samples one after another by the same engine (speculation on, as it ships)."""
    texts, generated, kv_peak, kv_sum, forwards, accepted = [], 0, 0, 0.0, 0, 0
    t0 = time.perf_counter()
    for i in range(config.width):
        result = engine.generate(task.messages, max_new_tokens=config.max_new_tokens,
                                 temperature=config.temperature, seed=seed * config.width + i)
        texts.append(result.text)
        n = len(result.token_ids)
        generated += n
        kv_peak = max(kv_peak, result.prompt_tokens + n)
        kv_sum += (result.prompt_tokens + (n + 1) / 2) * n  # one copy, growing through the sample
        forwards += result.stats.steps + 1  # the prefill, then one forward per decode step
        accepted += result.stats.accepted_tokens
    wall = time.perf_counter() - t0
    return _run(task, "loop", None, texts, generated=generated, wall=wall, kv_peak=kv_peak,
                kv_mean=kv_sum / generated if generated else 0.0, bytes_per_token=kv_bytes_per_token(engine),
                forwards=forwards, accepted=accepted)


def run_search(engine: Any, task: SearchTask, config: SearchBenchConfig, seed: int, method: str) -> Run:
    """A search with the policy ``method`` names (``-nodraft``: drafting across siblings off;
    ``ets-coarse``: ETS with clusters cut at :data:`COARSE_CLUSTER_DISTANCE`), ranked by the task's scorer."""
    policy, _, variant = method.partition("-")
    result = engine.search(
        task.messages, width=config.width, policy=policy, scorer=SCORERS.get(task.scorer or ""),
        step_stop=config.step_stop, max_step_tokens=config.max_step_tokens, max_new_tokens=config.max_new_tokens,
        temperature=config.temperature, seed=seed, lambda_kv=config.lambda_kv, lambda_cover=config.lambda_cover,
        draft=variant != "nodraft",
        cluster_distance=COARSE_CLUSTER_DISTANCE if variant == "coarse" else CLUSTER_DISTANCE)
    s = result.stats
    texts = [t.text for t in result.trajectories]  # best first
    return _run(task, method, texts, texts, generated=s.generated_tokens, wall=s.wall_seconds,
                kv_peak=s.kv_peak_tokens, kv_mean=s.kv_mean_tokens, bytes_per_token=s.kv_bytes_per_token,
                forwards=s.forwards, accepted=s.accepted_draft_tokens)


def rank_by_scorer(task: SearchTask, texts: Sequence[str], ranked: list[str], step_stop: str) -> list[str]:
    """``ranked`` (best first by the default score) re-ranked by the task's scorer where it names one
    (each text split into steps at ``step_stop``; ties keep the default order)."""
    scorer = SCORERS.get(task.scorer or "")
    if scorer is None:
        return ranked
    prompt = task.messages[-1]["content"]
    return sorted(ranked, key=lambda t: -scorer(prompt, [s for s in t.split(step_stop) if s.strip()] or [""]))


def _run(task: SearchTask, method: str, ranked: Sequence[str] | None, texts: Sequence[str], *, generated: int,
         wall: float, kv_peak: float, kv_mean: float, bytes_per_token: int, forwards: int = 0,
         accepted: int = 0) -> Run:
    best = ranked[0] if ranked else ""
    return Run(task=task.id, method=method, correct=task.check(best) if ranked is not None else None,
               covered=any(task.check(t) for t in texts), trajectories=len(texts), generated_tokens=generated,
               wall_seconds=wall, kv_peak_tokens=int(kv_peak), kv_mean_tokens=float(kv_mean),
               kv_bytes_per_token=bytes_per_token, forwards=forwards, accepted_draft_tokens=accepted,
               best_text=best[:200])


def _lengths(rows: torch.Tensor, eos: set[int]) -> list[int]:
    """Tokens of each generated row up to and including its first EOS."""
    lengths = []
    for row in rows.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        lengths.append(end)
    return lengths


def kv_bytes_per_token(engine: Any) -> int:
    """Bytes of K and V one token holds across all layers."""
    c = engine.model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * engine.dtype.itemsize


def run_method(engine: Any, task: SearchTask, config: SearchBenchConfig, seed: int, method: str) -> Run:
    """Dispatch one method on one task."""
    if method == "hf":
        return run_hf(engine, task, config, seed)
    if method == "loop":
        return run_loop(engine, task, config, seed)
    if method in METHODS:
        return run_search(engine, task, config, seed, method)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def parse_methods(spec: str | None) -> list[str]:
    """``"hf,ets,ets-nodraft"`` -> methods (default: all); ``ValueError`` names unknown ones."""
    if not spec:
        return list(METHODS)
    chosen = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {list(METHODS)}")
    return chosen


def run_bench(engine: Any, tasks: Sequence[SearchTask], config: SearchBenchConfig, methods: Sequence[str], *,
              tasks_path: str = "", on_run: Callable[[Run], None] | None = None,
              report: SearchBenchReport | None = None) -> SearchBenchReport:
    """Every method on every task, interleaved task by task (a busy machine slows all methods alike).

    Runs are appended to ``report`` (a new one by default) as they finish; ``on_run`` sees each.
    """
    report = report if report is not None else SearchBenchReport(tasks_path, config)
    for i, task in enumerate(tasks):
        for method in methods:
            report.runs.append(run_method(engine, task, config, config.seed + i, method))
            if on_run:
                on_run(report.runs[-1])
    return report


# ---------------------------------------------------------------------------------------- report
def targets(summaries: Sequence[MethodSummary]) -> list[dict]:
    """The search design targets, measured side by side: ``{"target", "measured", "met"}`` for each that applies."""
    by = {s.method: s for s in summaries}
    out: list[dict] = []

    def add(target: str, measured: float, met: bool) -> None:
        out.append({"target": target, "measured": round(measured, 3), "met": bool(met)})

    def ratio(a: float, b: float) -> float:
        return a / b if b else math.inf

    if "ets" in by and "rebase" in by:
        ets, rebase = by["ets"], by["rebase"]
        add("ETS peak KV / REBASE peak KV <= 0.5", ratio(ets.kv_peak_tokens, rebase.kv_peak_tokens),
            ets.kv_peak_tokens <= 0.5 * rebase.kv_peak_tokens)
        add("ETS mean KV / REBASE mean KV <= 0.5", ratio(ets.kv_mean_tokens, rebase.kv_mean_tokens),
            ets.kv_mean_tokens <= 0.5 * rebase.kv_mean_tokens)
        if ets.accuracy is not None and rebase.accuracy_ci is not None:
            lo, hi = rebase.accuracy_ci
            add("ETS accuracy within REBASE's 95% interval", ets.accuracy, lo <= ets.accuracy <= hi)
    if "hf" in by:
        hf = by["hf"]
        for s in summaries:
            if s.method not in BASELINES:
                add(f"{s.method} peak KV / hf peak KV <= 0.25", ratio(s.kv_peak_tokens, hf.kv_peak_tokens),
                    s.kv_peak_tokens <= 0.25 * hf.kv_peak_tokens)
        if "best_of_n" in by:
            add("best_of_n tokens/s / hf tokens/s >= 3", ratio(by["best_of_n"].tokens_per_second,
                                                            hf.tokens_per_second),
                by["best_of_n"].tokens_per_second >= 3 * hf.tokens_per_second)
    if "loop" in by:
        for name in ("best_of_n-nodraft", "best_of_n"):
            if name in by:
                r = ratio(by[name].tokens_per_second, by["loop"].tokens_per_second)
                add(f"{name} tokens/s / loop tokens/s >= 4", r, r >= 4)
    for p in POLICIES:
        if p in by and f"{p}-nodraft" in by:
            r = ratio(by[p].tokens_per_second, by[f"{p}-nodraft"].tokens_per_second)
            add(f"{p} tokens/s with / without drafting >= 1.5", r, r >= 1.5)
    return out


def render_table(report: SearchBenchReport):
    """A rich table of the summaries and one of the targets."""
    from rich.table import Table

    c = report.config
    table = Table(title=f"tree search, W={c.width}, {len({r.task for r in report.runs})} tasks "
                        f"({report.tasks_path}), temperature {c.temperature}")
    for col in ("method", "accuracy [95% CI]", "coverage", "KV peak tok", "KV mean tok", "KV peak MB",
                "tokens/s", "draft share", "wall s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for s in report.summaries():
        acc = "-" if s.accuracy is None else f"{s.accuracy:.2f} [{s.accuracy_ci[0]:.2f}, {s.accuracy_ci[1]:.2f}]"
        table.add_row(s.method, acc, f"{s.coverage:.2f}", f"{s.kv_peak_tokens:.0f}", f"{s.kv_mean_tokens:.0f}",
                      f"{s.kv_peak_mb:.1f}", f"{s.tokens_per_second:.1f}", f"{s.draft_share:.2f}",
                      f"{s.wall_seconds:.1f}")
    checks = Table(title="targets (measured side by side in this run)")
    for col in ("target", "measured", "met"):
        checks.add_column(col)
    for t in targets(report.summaries()):
        checks.add_row(t["target"], f"{t['measured']:.3g}", "yes" if t["met"] else "no")
    return table, checks


def plot_report(report: SearchBenchReport, path: str | Path) -> None:
    """Accuracy (with its 95% interval) against mean KV held, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in report.summaries():
        if s.accuracy is None:
            continue
        lo, hi = s.accuracy_ci
        ax.errorbar(s.kv_mean_tokens, s.accuracy, yerr=[[s.accuracy - lo], [hi - s.accuracy]], fmt="o", capsize=3,
                    label=s.method)
    ax.set_xscale("log")
    ax.set_xlabel("KV held, mean over a search (tokens, log scale)")
    ax.set_ylabel("accuracy of the top-ranked answer")
    ax.set_title(f"tree search at W={report.config.width}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
