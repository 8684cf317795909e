"""``agentspec bench``: live (model) or teacher-forced (``--simulate``) benchmarks on recorded sessions."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer
from rich.console import Console

from agentspec.cli.data import read_sessions
from agentspec.cli.options import MEMORY, ModelOptions, fail, model_options
from agentspec.cli.search import bench_search

console = Console(stderr=True)
DEFAULT_DATA = ("swe_agent", "tau_bench/gpt-4o-airline.json")
METHODS = ("agentspec", "hf", "hf_pld", "llamacpp", "llamacpp_pld", "agentspec_int8", "hf_int8", "agentspec_nospec")


def register(app: typer.Typer) -> None:
    @app.command()
    @model_options
    def bench(
        paths: list[Path] = typer.Argument(None, help="Trajectory files or folders (default: the SWE-agent and "
                                           "tau-bench sessions of the data folder, $AGENTSPEC_DATA or "
                                           "../shared/data)."),
        simulate: bool = typer.Option(False, "--simulate", help="Teacher-forced drafting only: no model forward."),
        search: bool = typer.Option(False, "--search", help="The tree-search benchmark on checkable tasks "
                                    "(--tasks, --width, --temperature, --limit, --methods, --max-new-tokens, "
                                    "--report, --plot)."),
        tasks: Path = typer.Option(None, "--tasks", help="Search: task file (default: the bundled set)."),
        width: int = typer.Option(16, "--width", help="Search: trajectories per task."),
        temperature: float = typer.Option(1.0, "--temperature", min=0.0,
                                          help="Search: sampling temperature of every method (0: greedy)."),
        plot: Path = typer.Option(None, "--plot", help="Search: accuracy against KV held, as an image."),
        limit: int = typer.Option(None, help="Sessions per path (default: live 2, simulate all)."),
        calls: int = typer.Option(None, help="Calls per session (default: live 4, simulate all)."),
        max_new_tokens: int = typer.Option(128, min=1, help="Live: tokens generated per call."),
        max_context: int = typer.Option(4096, help="Live: prompt + output budget (oldest turns dropped)."),
        methods: str = typer.Option(None, help=f"Live: comma-separated methods among {', '.join(METHODS)} "
                                    "(hf_int8 is HF greedy on the int8 weights: the reference agentspec_int8 must "
                                    "equal; llamacpp_pld is llama.cpp's prompt-lookup speculation, checked against "
                                    "llamacpp) (default: agentspec, hf, hf_pld, and llamacpp where llama-cpp-python is "
                                    "installed; agentspec_nospec, speculation off, always runs)."),
        report: Path = typer.Option(None, "--report", help="Write the report as JSON here (live: rewritten after "
                                    "every call, so a long run interrupted keeps what it measured)."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
        cost_curve: str = typer.Option(None, "--cost-curve", help="Simulate: forward cost curve as 'k:ms,...' "
                                       "(e.g. 1:65,8:110,32:181) or a JSON file of [k, seconds] pairs (default: the "
                                       "built-in curve of the default model, fp32, 2 CPU threads)."),
        profile: bool = typer.Option(False, "--profile", help="Time one verification step by part (matmuls, "
                                     "attention, norms, rotary, element-wise, glue) against the memory bandwidth "
                                     "floor; no sessions are read."),
        contexts: str = typer.Option("1k,3k,6k", help="Profile: context lengths."),
        tree_sizes: str = typer.Option("1,4,8,16", help="Profile: tree sizes (tokens per step)."),
        options: ModelOptions = None,
    ) -> None:
        """Benchmark agentspec on recorded agent sessions.

        Live: replays each call's recorded prompt (the loop of `agentspec replay --mode live`) through
        plain HF greedy `generate`, HF prompt lookup (10 tokens), llama.cpp on the same GGUF file with its
        prefix reuse, agentspec on int8 weights (agentspec_int8) and agentspec, interleaved call by call
        in one process, and reports decode tokens/s, tokens per verification step, decode and end-to-end
        speedups over plain HF greedy, and how many outputs equal plain greedy. Its sessions go to a
        scratch store made for the run (removed at the end), so a benchmark never drafts from an earlier
        one and never fills your cache; `--store URL` keeps them there instead.

        --simulate: the teacher-forced drafting benchmark (the recorded completion decides what is
        accepted; no model forward) with the modelled speedup: plain decoding's forward cost over the cost
        of the verification forwards on the cost curve.
        """
        if profile:
            _profile(options, contexts, tree_sizes, report, as_json)
            return
        if search:
            bench_search(options.engine(MEMORY), tasks_path=tasks, limit=limit, width=width, methods=methods,
                         max_new_tokens=max_new_tokens, report_path=report, plot_path=plot, as_json=as_json,
                         temperature=temperature)
            return
        if simulate:
            sessions = read_sessions(paths, list(DEFAULT_DATA), limit=limit, per_path=True, calls=calls)
            _simulate(sessions, options.model, cost_curve, report, as_json)
            return
        compare = _comparisons(methods)
        sessions = read_sessions(paths, list(DEFAULT_DATA), limit=limit or 2, per_path=True, calls=calls or 4)
        with tempfile.TemporaryDirectory(prefix="agentspec-bench-") as scratch:
            store = options.store
            if store is None:
                store = f"sqlite:///{Path(scratch) / 'bench.db'}"
                console.print(f"sessions of this run go to a scratch store, {store} (removed at the end)")
            elif store != MEMORY:
                console.print(f"sessions of this run go to {store}")
            _live(sessions, options.engine(store), compare, max_new_tokens=max_new_tokens,
                  max_context=max_context, report_path=report, as_json=as_json)


def _comparisons(methods: str | None) -> list[str]:
    """The comparison methods named by ``--methods`` (agentspec itself always runs)."""
    from agentspec.replay.baselines import llamacpp_available  # deferred: torch loads only when a command runs

    if methods is None:
        return ["agentspec_nospec", "hf", "hf_pld"] + (["llamacpp"] if llamacpp_available() else [])
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise fail(f"unknown --methods {', '.join(unknown)}; choose among {', '.join(METHODS)}")
    for name in {"llamacpp", "llamacpp_pld"} & set(chosen):
        if not llamacpp_available():
            raise fail(f"--methods {name} needs llama-cpp-python: pip install 'agentspec[llamacpp]'")
    return ["agentspec_nospec"] + [m for m in chosen if m not in ("agentspec", "agentspec_nospec")]  # always beside


def _live(sessions, engine, compare: list[str], *, max_new_tokens: int, max_context: int,
          report_path: Path | None, as_json: bool) -> None:
    from tqdm import tqdm

    from agentspec.replay.live import replay_live
    from agentspec.replay.report import ReplayReport, render_methods

    result = ReplayReport("live")
    with tqdm(total=sum(len(s.calls) for s in sessions), desc="calls", unit="call", file=console.file) as bar:
        def tick(_record) -> None:
            bar.update(1)
            if report_path:
                result.save(report_path)

        replay_live(engine, sessions, max_new_tokens=max_new_tokens, max_context=max_context, compare=compare,
                    on_call=tick, report=result)
    _emit(result.to_dict(), render_methods(result), report_path, as_json, width=170)
    for note in result.skipped:
        console.print(f"[yellow]skipped[/yellow] {note}")


def parse_cost_curve(spec: str | None):
    """``'1:65,8:110'`` (milliseconds) or a JSON file of ``[k, seconds]`` pairs -> CostCurve."""
    from agentspec.lookahead import CostCurve

    if spec is None:
        return CostCurve()
    if Path(spec).is_file():
        return CostCurve.load(spec)
    try:
        points = [(int(k), float(ms) / 1000) for k, ms in (item.split(":") for item in spec.split(","))]
    except ValueError as exc:
        raise typer.BadParameter(f"expected 'k:ms,k:ms,...' or a JSON file, got {spec!r}",
                                 param_hint="--cost-curve") from exc
    return CostCurve(points)


def _simulate(sessions, model: str | None, cost_curve: str | None, report_path: Path | None, as_json: bool) -> None:
    """Teacher-forced drafting over ``sessions``: the same simulation as ``agentspec replay --mode simulate``."""
    from agentspec.engine.model import load_tokenizer
    from agentspec.replay.simulate import simulate_sessions
    from agentspec.replay.trajectories import tokenize_sessions

    cost = parse_cost_curve(cost_curve)
    tokenized = tokenize_sessions(load_tokenizer(model), sessions)
    report = simulate_sessions(tokenized, cost_curve=cost, progress=not as_json)
    _emit(report.to_dict(), report.render(f"teacher-forced drafting: {len(sessions)} sessions"), report_path, as_json)


def _profile(options: ModelOptions, contexts: str, tree_sizes: str, report_path: Path | None, as_json: bool) -> None:
    """``--profile``: one verification step by part, against the memory bandwidth floor."""
    from agentspec.engine.profile import machine_load, parse_sizes, profile_steps

    try:
        context_list, tree_list = parse_sizes(contexts), parse_sizes(tree_sizes)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    engine = options.engine(MEMORY)
    console.print(f"profiling {len(context_list) * len(tree_list)} step shapes (machine load {machine_load()})")
    report = profile_steps(engine, context_list, tree_list, on_step=lambda s: console.print(
        f"  context {s.context:,}, tree {s.tree}: {s.step_seconds * 1e3:.1f} ms"))
    _emit(report.to_dict(), report.render(), report_path, as_json, width=180)


def _emit(data: dict, table, report_path: Path | None, as_json: bool, width: int = 0) -> None:
    """Write a report's ``data`` as JSON to ``report_path``, then print it as JSON on stdout or ``table``."""
    if report_path:
        tmp = Path(report_path).with_name(Path(report_path).name + ".tmp")  # atomic: never half a report
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(report_path)
        console.print(f"report written to {report_path}")
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        Console(width=max(Console().width, width)).print(table)
