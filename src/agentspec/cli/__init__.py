"""The ``agentspec`` command. Each sub-module registers its own sub-commands.

Deferred imports, on purpose: a command function imports the engine, replay, search and store
modules it uses when it runs, because they pull in torch, transformers, SQLAlchemy and FastAPI
(seconds of start-up); ``agentspec --help`` and the light commands start at once. This is the one
place in the package where its own modules are imported inside functions (besides the optional
LangChain/FastAPI integrations and the compiled extension).
"""

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
COMMAND_MODULES = ("run", "bench", "replay", "search", "sessions", "serve", "models")

for _name in COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}").register(app)


def main() -> None:
    app()
