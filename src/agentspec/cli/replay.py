"""``agentspec replay``: recorded agent trajectories through agentspec, one session each."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import typer
from rich.console import Console

from agentspec.cli.data import read_sessions
from agentspec.cli.options import MEMORY, ModelOptions, model_options

console = Console(stderr=True)
Mode = Literal["simulate", "live"]
MODES = get_args(Mode)


def register(app: typer.Typer) -> None:
    @app.command()
    @model_options
    def replay(
        paths: list[Path] = typer.Argument(None, help="Trajectory files or folders: SWE-agent .traj, mini-swe-agent "
                                           ".traj.json, tau-bench JSON, OpenHands log folders, generic JSONL "
                                           "(default: the SWE-agent trajectories of the data folder, $AGENTSPEC_DATA "
                                           "or ../shared/data)."),
        mode: Mode = typer.Option("simulate", help="simulate: teacher-forced "
                                 "drafting, no model forward; live: the engine generates every call."),
        baseline: bool = typer.Option(False, "--baseline", help="Live: also run plain HF greedy generate on the "
                                      "same calls (interleaved) for speedups and an identity check."),
        max_new_tokens: int = typer.Option(128, min=1, help="Live: tokens generated per call."),
        max_context: int = typer.Option(None, help="Prompt + output budget in tokens (live default: the model's "
                                        "window; simulate default: no limit). Oldest turns are dropped to fit."),
        limit: int = typer.Option(None, help="Sessions to replay (default: simulate all, live 1)."),
        calls: int = typer.Option(None, min=1, help="Calls per session (default: all)."),
        report: Path = typer.Option(None, "--report", help="Write the per-call report as JSON here (live: "
                                    "rewritten after every call)."),
        plot: Path = typer.Option(None, "--plot", help="Save a PNG: tokens per step vs call index, cumulative "
                                  "hit rate."),
        options: ModelOptions = None,
    ) -> None:
        """Replay recorded agent trajectories, one agent session per trajectory, calls in order.

        Live mode writes the sessions to the session store (`--store`; default: the persistent cache), so a
        second replay of the same trajectories drafts from the first: use `--store memory` for a clean
        measurement. Unreadable files and calls that cannot fit the window are skipped with a note; the exit
        status is non-zero only if nothing could be replayed.
        """
        from tqdm import tqdm

        # deferred: torch and transformers load only when the command runs, not for --help
        from agentspec.replay.live import replay_live
        from agentspec.replay.report import ReplayReport, plot_report, render_summary
        from agentspec.replay.simulate import replay_simulate

        if limit is None and mode == "live":
            limit = 1
        sessions = read_sessions(paths, ["swe_agent"], limit=limit, calls=calls)
        total = sum(len(s.calls) for s in sessions)
        console.print(f"replaying {len(sessions)} sessions, {total} calls ({mode})")
        if mode == "live":
            engine = options.engine()
            if options.store != MEMORY:
                console.print(f"sessions go to {options.store_url}")
        else:
            from agentspec.engine.model import load_tokenizer

            tokenizer = load_tokenizer(options.model)
        result = ReplayReport(mode)
        with tqdm(total=total, desc=mode, unit="call", file=console.file) as bar:
            def tick(_record) -> None:
                bar.update(1)
                if report and mode == "live":  # a long live replay interrupted keeps what it measured
                    result.save(report)

            if mode == "live":
                replay_live(engine, sessions, max_new_tokens=max_new_tokens, max_context=max_context,
                            baseline=baseline, on_call=tick, report=result)
            else:
                budget = max_context - max_new_tokens if max_context else None
                result = replay_simulate(sessions, tokenizer, max_prompt_tokens=budget, on_call=tick)
        for note in result.skipped:
            console.print(f"[yellow]skipped[/yellow] {note}")
        Console().print(render_summary(result))
        if report:
            result.save(report)
            console.print(f"report written to {report}")
        if plot and result.calls:
            plot_report(result, plot)
            console.print(f"plot saved to {plot}")
        if not result.calls:
            console.print("[red]error:[/red] no call could be replayed")
            raise typer.Exit(1)
