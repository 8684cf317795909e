"""``agentspec search``: one tree search from a prompt; ``agentspec bench --search``: the search benchmark."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from agentspec.cli.options import ModelOptions, fail, model_options

console = Console(stderr=True)

POLICY_NAMES = ("ets", "rebase", "beam", "best_of_n")


def register(app: typer.Typer) -> None:
    @app.command()
    @model_options
    def search(
        prompt: str = typer.Argument(..., help="The prompt (one user message; the chat template is applied)."),
        width: int = typer.Option(16, "--width", "-w", help="Trajectories kept (W)."),
        policy: str = typer.Option("ets", help=f"Selection policy: {', '.join(POLICY_NAMES)}."),
        max_new_tokens: int = typer.Option(256, help="Tokens per trajectory at most."),
        max_step_tokens: int = typer.Option(64, help="Tokens per reasoning step at most."),
        step_stop: str = typer.Option("\n\n", help="Step delimiter."),
        temperature: float = typer.Option(1.0, help="Sampling temperature (0: greedy per step)."),
        seed: int = typer.Option(0, help="Sampling seed."),
        session: str = typer.Option(None, help="Session id whose cache also drafts for the search."),
        no_draft: bool = typer.Option(False, "--no-draft", help="No drafting across sibling trajectories."),
        show: int = typer.Option(5, help="Trajectories printed (best first)."),
        as_json: bool = typer.Option(False, "--json", help="Print trajectories and statistics as JSON."),
        options: ModelOptions = None,
    ) -> None:
        """Tree search over reasoning steps: `W` trajectories sharing one KV tree, all leaves in one forward.

        Prints the finished trajectories ranked by score (default: the model's mean token log-probability)
        and the search's statistics: KV held (peak, mean) beside what one copy per trajectory would hold,
        forwards, tokens generated and drafted, tokens/s, wall time.
        """
        if policy not in POLICY_NAMES:
            raise typer.BadParameter(f"expected one of {POLICY_NAMES}, got {policy!r}", param_hint="--policy")
        engine = options.engine()
        try:
            result = engine.search(prompt, width=width, policy=policy, step_stop=step_stop,
                                   max_step_tokens=max_step_tokens, max_new_tokens=max_new_tokens,
                                   temperature=temperature, seed=seed, session=session, draft=not no_draft)
        except ValueError as exc:
            raise fail(str(exc)) from exc
        if as_json:
            print(json.dumps({"trajectories": [asdict(t) for t in result.trajectories],
                              "stats": asdict(result.stats)}, indent=2))
            return
        out = Console()
        for rank, t in enumerate(result.trajectories[:show], 1):
            out.print(f"[bold]#{rank}[/bold] score {t.score:.3f}, {len(t.token_ids)} tokens, "
                      f"{len(t.step_scores)} steps")
            out.print(t.text, markup=False, highlight=False)
            out.print()
        out.print(stats_table(result.stats, len(result.trajectories)))


def stats_table(stats, finished: int) -> Table:
    """The statistics of one search as a two-column table."""
    mb = 2**20
    table = Table(title=f"{stats.policy} search, width {stats.width}: {finished} finished trajectories")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("KV held, peak", f"{stats.kv_peak_tokens} tokens ({stats.kv_peak_bytes / mb:.1f} MB)"),
        ("KV held, mean", f"{stats.kv_mean_tokens:.0f} tokens ({stats.kv_mean_bytes / mb:.1f} MB)"),
        ("one copy per trajectory, peak", f"{stats.copy_peak_tokens} tokens ({stats.copy_peak_bytes / mb:.1f} MB)"),
        ("forwards", str(stats.forwards)),
        ("tokens generated", str(stats.generated_tokens)),
        ("of them from drafts", str(stats.accepted_draft_tokens)),
        ("leaves pruned / dropped by the scorer", f"{stats.pruned} / {stats.dropped_by_scorer}"),
        ("tokens/s (all trajectories)", f"{stats.tokens_per_second:.1f}"),
        ("wall time", f"{stats.wall_seconds:.2f} s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def bench_search(engine, *, tasks_path: Path | None, limit: int | None, width: int, max_new_tokens: int,
                 methods: str | None, report_path: Path | None, plot_path: Path | None, as_json: bool,
                 temperature: float = 1.0) -> None:
    """``agentspec bench --search``: every method on every task, a progress bar, a table, a plot."""
    from tqdm import tqdm

    from agentspec.replay.search_bench import (
        SearchBenchConfig,
        SearchBenchReport,
        parse_methods,
        plot_report,
        render_table,
        run_bench,
    )
    from agentspec.replay.search_tasks import DEFAULT_TASKS, load_tasks

    try:
        chosen = parse_methods(methods)
    except ValueError as exc:
        raise fail(f"--methods: {exc}") from exc
    path = tasks_path or DEFAULT_TASKS
    tasks = load_tasks(path, limit)
    console.print(f"tasks: {len(tasks)} from {path}")
    config = SearchBenchConfig(width=width, max_new_tokens=max_new_tokens, temperature=temperature)
    report = SearchBenchReport(str(path), config)
    with tqdm(total=len(tasks) * len(chosen), desc="search bench", unit="run", file=console.file) as bar:
        def tick(run) -> None:
            bar.set_postfix_str(f"{run.task} {run.method}")
            bar.update(1)
            if report_path:
                report.save(report_path)

        run_bench(engine, tasks, config, chosen, on_run=tick, report=report)
    if report_path:
        report.save(report_path)
        console.print(f"report written to {report_path}")
    if plot_path:
        plot_report(report, plot_path)
        console.print(f"plot written to {plot_path}")
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    wide = Console(width=max(Console().width, 140))
    for table in render_table(report):
        wide.print(table)
