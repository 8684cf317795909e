"""Replay recorded SWE-agent (SWE-bench) trajectories through agentspec.

Each trajectory becomes one agent session and its LLM calls are replayed in order, so the
session's suffix-tree cache grows exactly as it would have behind the real agent.

    python examples/swebench_replay.py                           # teacher-forced, all sessions
    python examples/swebench_replay.py --live --limit 1          # the real model, one session
    python examples/swebench_replay.py --live --baseline --max-new-tokens 64 --plot swe.png

The same thing as a command: ``agentspec replay PATH --mode simulate|live``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from agentspec.replay.live import replay_live
from agentspec.replay.report import plot_report, render_summary
from agentspec.replay.simulate import replay_simulate
from agentspec.replay.trajectories import default_data_dir, load_sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", type=Path, default=default_data_dir() / "swe_agent",
                        help="SWE-agent .traj file or folder (default: swe_agent in $AGENTSPEC_DATA or "
                        "../shared/data: %(default)s)")
    parser.add_argument("--live", action="store_true", help="generate with the model (default: simulate)")
    parser.add_argument("--baseline", action="store_true", help="live: also time plain HF greedy generate")
    parser.add_argument("--limit", type=int, default=None, help="sessions to replay")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--plot", type=Path, default=None, help="save tokens-per-step / hit-rate plot here")
    args = parser.parse_args()

    console = Console()
    sessions = load_sessions(args.path, limit=args.limit,
                             on_error=lambda path, why: console.print(f"[yellow]skipped {path}: {why}"))
    console.print(f"{len(sessions)} sessions, {sum(len(s.calls) for s in sessions)} calls from "
                  f"{args.path.resolve()}")

    if args.live:
        from agentspec.engine import Engine

        engine = Engine.from_pretrained(store="memory")  # a measurement: start from an empty cache
        report = replay_live(engine, sessions, max_new_tokens=args.max_new_tokens, baseline=args.baseline,
                             on_call=lambda c: c and console.print(
                                 f"  {c.session} #{c.index}: {c.stats.output_tokens} tokens, "
                                 f"{c.stats.tokens_per_step:.2f} tokens/step, {c.stats.hit_rate:.0%} from drafts"))
    else:
        from agentspec.engine.model import load_tokenizer

        report = replay_simulate(sessions, load_tokenizer())

    console.print(render_summary(report))
    for note in report.skipped:
        console.print(f"[yellow]skipped[/yellow] {note}")
    if args.plot:
        console.print(f"plot saved to {plot_report(report, args.plot)}")


if __name__ == "__main__":
    main()
