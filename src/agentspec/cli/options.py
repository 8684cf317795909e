"""Options shared by the commands that load a model (run, bench, replay, serve), and the
session store those commands write to."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import typer
from rich.console import Console

err = Console(stderr=True)

Dtype = Literal["float32", "bfloat16"]  # an enumerated option is a Literal: typer lists and checks the choices
Quantize = Literal["int8"]
KvDtype = Literal["float32", "float16", "bfloat16"]
Matmul = Literal["float32", "int8"]
DTYPES, QUANTIZE = get_args(Dtype), get_args(Quantize)
MEMORY = "memory"  # --store memory: sessions live in the process only


def default_store_url() -> str:
    """``sqlite:///$AGENTSPEC_HOME/cache.db``: where sessions persist unless told otherwise."""
    from agentspec.stores import default_url

    return default_url()


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error; the caller raises the returned ``typer.Exit``."""
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@dataclass
class ModelOptions:
    model: str | None = None
    dtype: str = "float32"
    quantize: str | None = None
    kv_dtype: str = "float32"
    matmul: str = "float32"
    store: str | None = None  # None: the default persistent store; "memory": none
    threads: int | None = None
    no_speculation: bool = False

    @property
    def store_url(self) -> str:
        """The store the engine writes to: ``--store``, else the default SQLite file."""
        return self.store or default_store_url()

    def engine(self, store: str | None = None):
        """Build the engine these options describe, writing sessions to ``store`` (default:
        :attr:`store_url`). A missing model, a bad store or a refused setting ends the command with
        a one-line error (exit 2)."""
        from agentspec.config import SpeculationConfig
        from agentspec.engine import Engine  # deferred: torch and transformers load only when a model is needed
        from agentspec.engine.model import ModelNotFoundError
        from agentspec.stores import StoreError

        try:
            return Engine.from_pretrained(
                self.model, dtype=self.dtype, quantize=self.quantize, store=store or self.store_url,
                threads=self.threads, speculation=SpeculationConfig(enabled=not self.no_speculation),
                kv_dtype=self.kv_dtype, matmul=self.matmul,
            )
        except (ModelNotFoundError, StoreError, ValueError) as exc:
            raise fail(str(exc)) from exc


_PARAMS = [
    inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
        None, "--model", "-m", help="A catalog name (`agentspec models list`; pulled with `agentspec models pull "
        "NAME`), a local HF model directory or a .gguf file (default: smollm2-135m-instruct).")),
    inspect.Parameter("dtype", inspect.Parameter.KEYWORD_ONLY, annotation=Dtype, default=typer.Option(
        "float32", help="Weights dtype.")),
    inspect.Parameter("quantize", inspect.Parameter.KEYWORD_ONLY, annotation=Quantize, default=typer.Option(
        None, help="int8: linear weights rounded to GGUF Q8_0 blocks, activations "
        "stay fp32 (CPU); outputs equal plain decoding of the same int8 weights.")),
    inspect.Parameter("kv_dtype", inspect.Parameter.KEYWORD_ONLY, annotation=KvDtype, default=typer.Option(
        "float32", help="KV cache dtype (CPU): float16/bfloat16 halve what attention reads; outputs equal "
        "plain decoding with the same KV precision.")),
    inspect.Parameter("matmul", inspect.Parameter.KEYWORD_ONLY, annotation=Matmul, default=typer.Option(
        "float32", help="GGUF-block layers (CPU): int8 rounds their inputs to 8-bit blocks and multiplies with "
        "VNNI integer dot products (as llama.cpp does; cheaper rows per verification step); outputs equal "
        "plain decoding in the same mode. float32 where the CPU lacks AVX-512 VNNI.")),
    inspect.Parameter("store", inspect.Parameter.KEYWORD_ONLY, annotation=str, default=typer.Option(
        None, help="Session store: a URL (sqlite:///path or postgresql+psycopg://...), or 'memory' to keep "
        "nothing (default: sqlite:///$AGENTSPEC_HOME/cache.db).")),
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
