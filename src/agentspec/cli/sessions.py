"""``agentspec sessions|prune|stats``: look into and maintain the persistent session store."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from agentspec.draft.base import SOURCE_NAMES

console = Console()
err = Console(stderr=True)

STORE_HELP = "Store URL (default: sqlite:///$AGENTSPEC_HOME/cache.db; or postgresql+psycopg://...)."
TENANT_HELP = "The tenant (namespace) whose sessions to use; default: the sessions of no tenant."


def _open(url: str | None, tenant: str | None = None, create: bool = False, check: bool = True):
    """The store (a tenant's view of it with ``tenant``); read commands never create one."""
    from agentspec.stores import StoreError, open_store

    try:
        store = open_store(url, create=create, check=check)
        return store.scoped(tenant) if tenant else store
    except (StoreError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def session_totals(store, session_id: str | None = None) -> dict[str, dict]:
    """Per-session totals of the stored call statistics (and ``"*"`` for all sessions), with the
    derived rates. Totals count every call ever appended, pruned ones included."""
    from agentspec.stats import SpecStats

    totals = {sid: (d["calls"], SpecStats.from_dict(d)) for sid, d in store.session_stats(session_id).items()}
    if totals:
        everything = SpecStats()
        for _, s in totals.values():
            everything.add(s)
        totals["*"] = (sum(calls for calls, _ in totals.values()), everything)
    out = {}
    for key, (calls, s) in totals.items():
        d = s.to_dict()
        d["calls"] = calls
        out[key] = {k: d[k] for k in ("calls", "prompt_tokens", "output_tokens", "steps", "drafted_tokens",
                                      "accepted_tokens", "acceptance_rate", "tokens_per_step", "hit_rate",
                                      "decode_tokens_per_second", "accepted_by_source")}
    return out


def _stats_table(rows: dict[str, dict]) -> Table:
    table = Table(title="agentspec cache statistics")
    cols = ("session", "calls", "prompt tok", "output tok", "drafted", "accepted", "accept rate", "tok/step",
            "tok/s", "hit rate", f"accepted from ({'/'.join(SOURCE_NAMES.values())})")
    for col in cols:
        table.add_column(col, justify="left" if col in ("session", cols[-1]) else "right")
    for sid, r in sorted(rows.items(), key=lambda kv: (kv[0] == "*", kv[0])):
        src = r["accepted_by_source"]
        table.add_row("all sessions" if sid == "*" else sid, str(r["calls"]), f"{r['prompt_tokens']:,}",
                      f"{r['output_tokens']:,}", f"{r['drafted_tokens']:,}", f"{r['accepted_tokens']:,}",
                      f"{r['acceptance_rate']:.1%}", f"{r['tokens_per_step']:.2f}",
                      f"{r['decode_tokens_per_second']:.1f}", f"{r['hit_rate']:.1%}",
                      " / ".join(str(src.get(name, 0)) for name in SOURCE_NAMES.values()))
    return table


def _plainly(run):
    """``run()`` with store errors said plainly."""
    from agentspec.stores import StoreError

    try:
        return run()
    except StoreError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _export_into(url: str | None, into: str) -> None:
    from agentspec.stores.repair import salvage

    source, target = _open(url, check=False), _open(into, create=True)
    report = _plainly(lambda: salvage(source, target))
    for line in report.bad[:20]:
        err.print(f"[yellow]not saved:[/yellow] {line}")
    console.print(f"saved {report.records} calls of {len(report.sessions)} sessions into {target._safe_url()}; "
                  f"{len(report.bad)} calls could not be read, {report.missing} record ids not found (deleted "
                  "earlier, or lost)")


def register(app: typer.Typer) -> None:
    sessions = typer.Typer(help="List, show, drop, export and import stored agent sessions.", no_args_is_help=True)
    app.add_typer(sessions, name="sessions")

    @sessions.command("list")
    def list_(store: str = typer.Option(None, help=STORE_HELP), tenant: str = typer.Option(None, help=TENANT_HELP),
              as_json: bool = typer.Option(False, "--json", help="JSON on stdout.")) -> None:
        """Every session with its calls and tokens, most recently used first."""
        opened = _open(store, tenant)
        infos = _plainly(opened.list_sessions)
        if as_json:
            print(json.dumps([i.__dict__ for i in infos], indent=2))
            return
        table = Table(title=f"{len(infos)} sessions")
        for col in ("session", "calls", "prompt tokens", "output tokens", "tokenizer"):
            table.add_column(col)
        for i in infos:
            table.add_row(i.session_id, str(i.calls), f"{i.prompt_tokens:,}", f"{i.output_tokens:,}", i.fingerprint)
        console.print(table)
        others = [t for t in opened.namespaces() if t != (tenant or "")]
        if others:
            names = ", ".join(repr(t) for t in others)
            console.print(f"other tenants hold sessions too (see them with --tenant NAME): {names}")

    @sessions.command("show")
    def show(session_id: str, store: str = typer.Option(None, help=STORE_HELP),
             tenant: str = typer.Option(None, help=TENANT_HELP)) -> None:
        """A session's calls: tokens and speculation figures per call."""
        opened = _open(store, tenant)
        loaded = _plainly(lambda: opened.load_session(session_id))
        if loaded.info is None:
            err.print(f"[red]error:[/red] no session {session_id!r}")
            raise typer.Exit(1)
        table = Table(title=f"session {session_id}: {loaded.info.calls} calls"
                      + (f", {loaded.skipped} corrupt records skipped" if loaded.skipped else ""))
        for col in ("#", "prompt", "output", "tok/step", "hit rate"):
            table.add_column(col, justify="right")
        for n, call in enumerate(loaded.calls, 1):
            table.add_row(str(n), str(len(call.prompt_ids)), str(len(call.output_ids)),
                          f"{call.stats.get('tokens_per_step', 0):.2f}", f"{call.stats.get('hit_rate', 0):.0%}")
        console.print(table)

    @sessions.command("drop")
    def drop(session_id: str, store: str = typer.Option(None, help=STORE_HELP),
             tenant: str = typer.Option(None, help=TENANT_HELP)) -> None:
        """Delete a session and all its calls."""
        if not _open(store, tenant).delete_session(session_id):
            err.print(f"[red]error:[/red] no session {session_id!r}")
            raise typer.Exit(1)
        console.print(f"dropped {session_id}")

    @sessions.command("export")
    def export(session_id: str = typer.Argument(None, help="The session to write (with PATH)."),
               path: Path = typer.Argument(None, help="The JSON-lines file to write."),
               into: str = typer.Option(None, help="Instead: copy every session of every tenant that can still be "
                                                   "read into a new store at this URL (the way out of a damaged "
                                                   "store)."),
               store: str = typer.Option(None, help=STORE_HELP), tenant: str = typer.Option(None, help=TENANT_HELP),
               ) -> None:
        """Write a session to a JSON-lines file, or (`--into URL`) copy what can still be read of the
        whole store into a new one; unreadable calls are counted and named."""
        if into is not None:
            _export_into(store, into)
            return
        if session_id is None or path is None:
            raise typer.BadParameter("give SESSION_ID and PATH, or --into URL")
        opened = _open(store, tenant, check=False)
        try:
            n = _plainly(lambda: opened.export_session(session_id, path))
        except KeyError as exc:
            err.print(f"[red]error:[/red] {exc.args[0]}")
            raise typer.Exit(1) from exc
        console.print(f"exported {n} calls of {session_id} to {path}")

    @sessions.command("check")
    def check(store: str = typer.Option(None, help=STORE_HELP),
              repair: bool = typer.Option(False, "--repair", help="Rebuild damaged session headers and totals from "
                                                                  "the calls, and accept lost commits.")) -> None:
        """Check the whole store: the database file (SQLite: PRAGMA integrity_check, the commit counter),
        every session header and running total, and every stored call's checksums. Exit status 1 when
        anything is damaged (after --repair: anything left damaged), with the way out."""
        from agentspec.stores.repair import repair as rebuild
        from agentspec.stores.repair import scan

        opened = _open(store, check=False)
        report = _plainly(lambda: scan(opened))
        where = opened._safe_url()
        for line in report.damage(where) + report.bad[:20]:
            console.print(f"[red]damaged:[/red] {line}")
        if len(report.bad) > 20:
            console.print(f"... and {len(report.bad) - 20} more damaged records")
        console.print(f"{report.records} calls in {len(report.sessions)} sessions read back intact, "
                      f"{len(report.bad)} damaged")
        if repair and not report.ok:
            for line in _plainly(lambda: rebuild(opened, report)):
                console.print(f"[green]repair:[/green] {line}")
            report = _plainly(lambda: scan(opened))
            console.print("after the repair: " + ("intact" if report.ok else "still damaged"))
        if report.problems or report.bad:
            console.print(f"save what can still be read into a new store: agentspec sessions export --into "
                          f"sqlite:///NEW.db --store {where}")
        elif not report.ok:
            console.print(f"repair it: agentspec sessions check --repair --store {where}")
        if not report.ok:
            raise typer.Exit(1)

    @sessions.command("import")
    def import_(path: Path, session_id: str = typer.Option(None, "--as", help="Store it under this id."),
                store: str = typer.Option(None, help=STORE_HELP), tenant: str = typer.Option(None, help=TENANT_HELP),
                ) -> None:
        """Read a session exported by `agentspec sessions export`."""
        from agentspec.stores import StoreError

        try:
            sid = _open(store, tenant, create=True).import_session(path, session_id)
        except (OSError, StoreError) as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc
        console.print(f"imported {path} as {sid}")

    @sessions.command("bench")
    def bench(store: str = typer.Option(None, help="Store URL to benchmark (default: a new SQLite file)."),
              calls: int = typer.Option(2000, help="Small calls to append for the append rate."),
              session_tokens: int = typer.Option(1_000_000, help="Tokens in the large session."),
              output_len: int = typer.Option(120, help="Output tokens per call of the large session."),
              as_json: bool = typer.Option(False, "--json", help="JSON on stdout.")) -> None:
        """Append rate, load + rebuild time of a large session, stored bytes per token.
        Writes benchmark sessions into the store: use a scratch store."""
        from agentspec.replay.store_bench import run

        result = run(store, append_calls=calls, session_tokens=session_tokens, output_len=output_len).to_dict()
        if as_json:
            print(json.dumps(result, indent=2))
            return
        table = Table(title="store benchmark")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in result.items():
            table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
        console.print(table)

    @app.command()
    def prune(
        max_session_tokens: int = typer.Option(None, help="Keep at most this many tokens per session."),
        max_total_tokens: int = typer.Option(None, help="Keep at most this many tokens in all."),
        store: str = typer.Option(None, help=STORE_HELP),
        tenant: str = typer.Option(None, help=TENANT_HELP),
    ) -> None:
        """Delete the oldest calls beyond a token budget (per session and/or in total) of one tenant."""
        if max_session_tokens is None and max_total_tokens is None:
            raise typer.BadParameter("give --max-session-tokens and/or --max-total-tokens")
        n = _open(store, tenant).prune(max_session_tokens, max_total_tokens)
        console.print(f"deleted {n} calls")

    @app.command()
    def stats(
        session: str = typer.Option(None, help="Only this session."),
        as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
        store: str = typer.Option(None, help=STORE_HELP),
        tenant: str = typer.Option(None, help=TENANT_HELP),
    ) -> None:
        """Cache hit rates per session and overall: calls, tokens, drafted and accepted tokens, acceptance,
        tokens per verification step, share of output from drafts, and which tree the drafts came from.
        Totals count every call ever stored, including calls `agentspec prune` has deleted since."""
        opened = _open(store, tenant)
        rows = _plainly(lambda: session_totals(opened, session))
        if session is not None and not rows:
            err.print(f"[red]error:[/red] no session {session!r}")
            raise typer.Exit(1)
        if as_json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            console.print("no calls stored yet")
        else:
            Console(width=max(console.width, 150)).print(_stats_table(rows))
