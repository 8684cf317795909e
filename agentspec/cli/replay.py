"""``agentspec replay``: recorded agent trajectories through agentspec, one session each."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from agentspec.cli.options import ModelOptions, model_options

console = Console(stderr=True)


def _default_paths() -> list[Path]:
    from agentspec.replay.trajectories import default_data_dir

    data = Path(default_data_dir())
    swe = data / "swe_agent"
    return [swe] if swe.is_dir() else [data]


def register(app: typer.Typer) -> None:
    @app.command()
    @model_options
    def replay(
        paths: list[Path] = typer.Argument(None, help="Trajectory files or folders: SWE-agent .traj, mini-swe-agent "
                                           ".traj.json, tau-bench JSON, OpenHands log folders, generic JSONL "
                                           "(default: the SWE-agent trajectories in ../shared/data)."),
        mode: str = typer.Option("simulate", help="simulate: teacher-forced drafting, no model forward; "
                                 "live: the engine generates every call."),
        baseline: bool = typer.Option(False, "--baseline", help="Live: also run plain HF greedy generate on the "
                                      "same calls (interleaved) for speedups and an identity check."),
        max_new_tokens: int = typer.Option(128, help="Live: tokens generated per call."),
        max_context: int = typer.Option(None, help="Prompt + output budget in tokens (live default: the model's "
                                        "window; simulate default: no limit). Oldest turns are dropped to fit."),
        limit: int = typer.Option(None, help="Sessions to replay (default: simulate all, live 1)."),
        report: Path = typer.Option(None, "--report", help="Write the per-call report as JSON here (live: "
                                    "rewritten after every call)."),
        plot: Path = typer.Option(None, "--plot", help="Save a PNG: tokens per step vs call index, cumulative "
                                  "hit rate."),
        options: ModelOptions = None,
    ) -> None:
        """Replay recorded agent trajectories, one agent session per trajectory, calls in order.

        Unreadable files and calls that cannot fit the window are skipped with a note; the exit status is non-zero
        only if nothing could be replayed.
        """
        from tqdm import tqdm

        from agentspec.replay.live import MODES, ReplayReport, plot_report, render_summary, replay_live, replay_simulate
        from agentspec.replay.trajectories import load_sessions

        if mode not in MODES:
            raise typer.BadParameter(f"expected one of {', '.join(MODES)}, got {mode!r}", param_hint="--mode")
        if max_new_tokens <= 0:
            raise typer.BadParameter(f"must be positive, got {max_new_tokens}", param_hint="--max-new-tokens")
        paths = paths or _default_paths()
        if limit is None and mode == "live":
            limit = 1
        sessions = []
        for path in paths:
            if not path.exists():
                console.print(f"[yellow]skipped[/yellow] {path}: no such file or folder")
                continue
            left = None if limit is None else limit - len(sessions)
            if left is not None and left <= 0:
                break
            sessions += load_sessions(path, limit=left, on_error=lambda p, why: console.print(
                f"[yellow]skipped[/yellow] {p}: {why}"))
        if not sessions:
            console.print(f"[red]error:[/red] no trajectory could be read from {', '.join(map(str, paths))}")
            raise typer.Exit(1)
        total = sum(len(s.calls) for s in sessions)
        console.print(f"replaying {len(sessions)} sessions, {total} calls ({mode})")
        if mode == "live":
            engine = options.engine()
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
