"""Recorded trajectories for the commands that read them (``bench``, ``replay``): which paths,
what was read (always printed), and the per-session call limit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console

from agentspec.replay.trajectories import DATA_ENV, Session, default_data_dir, load_sessions

console = Console(stderr=True)


def default_paths(*relative: str) -> list[Path]:
    """``relative`` paths under the default data folder that exist, else the folder itself."""
    data = default_data_dir()
    return [data / r for r in relative if (data / r).exists()] or [data]


def read_sessions(paths: list[Path] | None, defaults: list[str], *, limit: int | None, per_path: bool = False,
                  calls: int | None = None) -> list[Session]:
    """Sessions from ``paths`` (or the ``defaults`` under the data folder), saying what was read.

    ``limit`` caps the sessions (per path with ``per_path``, else in all), ``calls`` the calls of
    each session. Unreadable files are skipped with a note; nothing read at all is an error (exit 1).
    """
    origin = ""
    if not paths:
        paths = default_paths(*defaults)
        origin = f" (default data folder; set {DATA_ENV} or pass paths to read other data)"
    sessions: list[Session] = []
    for path in paths:
        left = limit if per_path or limit is None else limit - len(sessions)
        if left is not None and left <= 0:
            break
        if not path.exists():
            console.print(f"[yellow]skipped[/yellow] {path}: no such file or folder")
            continue
        found = load_sessions(path, limit=left,
                              on_error=lambda p, why: console.print(f"[yellow]skipped[/yellow] {p}: {why}"))
        console.print(f"read {len(found)} sessions from {path.resolve()}{origin}")
        sessions += found
    if not sessions:
        console.print(f"[red]error:[/red] no trajectory could be read from {', '.join(map(str, paths))}")
        raise typer.Exit(1)
    if calls is not None:
        sessions = [replace(s, calls=s.calls[:calls]) for s in sessions]
    return sessions
