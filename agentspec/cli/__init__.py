"""The ``agentspec`` command. Each sub-module registers its own sub-commands."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="agentspec",
    help="Lossless speculative decoding for LLM agents, drafted from a persistent suffix-tree cache.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",  # docstrings are reflowed paragraphs, `code` shown as code
)

# one module per concern; each defines register(app: typer.Typer)
COMMAND_MODULES = ("run", "bench", "replay", "search", "sessions", "serve")

for _name in COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}").register(app)


def main() -> None:
    app()
