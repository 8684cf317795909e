"""``agentspec run``: the quick-start demo, or one generation from a prompt."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from agentspec.cli.options import MEMORY, ModelOptions, model_options

console = Console()


def register(app: typer.Typer) -> None:
    @app.command()
    @model_options
    def run(
        prompt: str = typer.Option(None, "--prompt", "-p", help="Generate once from this prompt and stream it."),
        session: str = typer.Option("run", help="--prompt: the session the call belongs to (its earlier calls "
                                    "draft for it, and it is stored under this id)."),
        turns: int = typer.Option(4, help="Demo: assistant turns to play."),
        max_new_tokens: int = typer.Option(96, help="Tokens to generate per turn."),
        options: ModelOptions = None,
    ) -> None:
        """Run a short live agent session with and without speculation (or one --prompt).

        Calls are stored in the session store (`--store`; default: the persistent cache), so `agentspec stats`
        shows them and later runs draft from them.
        """
        engine = options.engine()
        if prompt is not None:
            stream = engine.stream(prompt, session=session, max_new_tokens=max_new_tokens)
            for delta in stream:
                print(delta, end="", flush=True)
            stats = stream.result.stats
            console.print(f"\n[dim]{stats.output_tokens} tokens, {stats.decode_tokens_per_second:.1f} tok/s, "
                          f"{stats.tokens_per_step:.2f} tokens/step, {stats.hit_rate:.0%} from drafts[/dim]")
            return
        from agentspec.replay.demo import run_demo, sample_path

        console.print(f"[bold]agentspec demo[/bold]: {engine.model_name}, a recorded tau-bench airline conversation "
                      f"({sample_path()}), {turns} live assistant turns, each decoded without and with speculation")
        if options.store != MEMORY:
            console.print(f"[dim]session 'demo' is stored in {options.store_url}: a second run drafts from this "
                          "one too (--store memory for a cold start)[/dim]")

        def show(turn):
            console.print(f"turn {turn.turn}: {turn.prompt_tokens} prompt tokens, {turn.output_tokens} new | "
                          f"plain {turn.plain_tokens_per_second:.1f} tok/s | agentspec "
                          f"{turn.spec_tokens_per_second:.1f} tok/s | {turn.hit_rate:.0%} from drafts"
                          f"{'' if turn.identical else ' | OUTPUT DIFFERS'}")
            console.print(f"  [dim]{turn.text[:160]!r}[/dim]")

        results = run_demo(engine, turns=turns, max_new_tokens=max_new_tokens, on_turn=show)
        table = Table(title="Decode speed over the session")
        for col in ("", "tokens", "tok/s", "tokens/step", "from drafts"):
            table.add_column(col, justify="right")
        out = sum(r.output_tokens for r in results)
        plain_s = sum(r.output_tokens / r.plain_tokens_per_second for r in results if r.plain_tokens_per_second)
        spec_s = sum(r.output_tokens / r.spec_tokens_per_second for r in results if r.spec_tokens_per_second)
        hits = sum(r.hit_rate * r.output_tokens for r in results)
        steps = sum(r.output_tokens / r.tokens_per_step for r in results if r.tokens_per_step)
        table.add_row("plain decoding", str(out), f"{out / plain_s:.1f}", "1.00", "-")
        table.add_row("agentspec", str(out), f"{out / spec_s:.1f}", f"{out / steps:.2f}", f"{hits / out:.0%}")
        console.print(table)
        console.print(f"speedup {plain_s / spec_s:.2f}x; outputs identical: "
                      f"{sum(r.identical for r in results)}/{len(results)}")
