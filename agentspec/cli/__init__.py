"""The ``agentspec`` command. Each sub-module registers its own sub-commands."""

from __future__ import annotations

import importlib

import typer

from agentspec import __version__

app = typer.Typer(
    name="agentspec",
    help="Lossless speculative decoding for LLM agents, drafted from a persistent suffix-tree cache.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",  # docstrings are reflowed paragraphs, `code` shown as code
)



def _version(value: bool) -> None:
    if value:
        typer.echo(f"agentspec {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    """Lossless speculative decoding for LLM agents, drafted from a persistent suffix-tree cache."""


# one module per concern; each defines register(app: typer.Typer)
COMMAND_MODULES = ("run", "bench", "replay", "sessions", "serve")

for _name in COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}").register(app)


def main() -> None:
    app()
