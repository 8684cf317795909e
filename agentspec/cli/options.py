"""Options shared by the commands that load a model (run, bench, replay, serve)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import typer


@dataclass
class ModelOptions:
    model: str | None = None
    dtype: str = "float32"
    quantize: str | None = None
    store: str | None = None
    threads: int | None = None
    no_speculation: bool = False

    def engine(self):
        """Build the engine these options describe (exits with a clear message if the model is missing)."""
        from rich.console import Console

        from agentspec.config import SpeculationConfig
        from agentspec.engine import Engine
        from agentspec.engine.model import ModelNotFoundError

        try:
            return Engine.from_pretrained(
                self.model, dtype=self.dtype, quantize=self.quantize, store=self.store, threads=self.threads,
                speculation=SpeculationConfig(enabled=not self.no_speculation),
            )
        except ModelNotFoundError as exc:
            Console(stderr=True).print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc


_PARAMS = [
    inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
        None, "--model", "-m", help="Local HF model directory or .gguf file (default: SmolLM2-135M-Instruct).")),
    inspect.Parameter("dtype", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
        "float32", help="Weights dtype: float32 or bfloat16.")),
    inspect.Parameter("quantize", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
        None, help="'int8': dynamic int8 linear layers (CPU).")),
    inspect.Parameter("store", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
        None, help="Session store URL (sqlite:///path or postgresql+psycopg://...); default: in memory.")),
    inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, annotation=int, default=typer.Option(
        None, help="torch CPU threads (default: torch's choice).")),
    inspect.Parameter("no_speculation", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--no-speculation", help="Decode one token per step (baseline).")),
]


def model_options(fn: Callable) -> Callable:
    """Add the model options to a command; it receives them as ``options: ModelOptions``."""
    names = [p.name for p in _PARAMS]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        options = ModelOptions(**{n: kwargs.pop(n) for n in names})
        return fn(*args, options=options, **kwargs)

    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "options"]
    wrapper.__signature__ = sig.replace(parameters=params + _PARAMS)
    return wrapper
