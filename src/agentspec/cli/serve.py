"""``agentspec serve``: the OpenAI-compatible HTTP server (needs the ``server`` extra)."""

from __future__ import annotations

import socket
from pathlib import Path

import typer

from agentspec.cli.options import ModelOptions, model_options
from agentspec.engine.grammar_budget import GrammarLimits

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(app: typer.Typer) -> None:
    @app.command()
    @model_options
    def serve(
        host: str = typer.Option("127.0.0.1", help="Interface to bind (default: loopback only)."),
        port: int = typer.Option(8000, help="TCP port (checked before the model loads)."),
        api_key: list[str] = typer.Option(
            None, "--api-key", envvar="AGENTSPEC_API_KEY",
            help="Require 'Authorization: Bearer KEY' on /v1. Repeat as NAME=KEY for tenants (each key a "
                 "tenant with its own sessions); a bare KEY is one tenant (env AGENTSPEC_API_KEY)."),
        api_keys: Path = typer.Option(
            None, "--api-keys", exists=True, dir_okay=False, readable=True,
            help="File of tenants: one 'name=key' per line (split at the first '='; name: letters, digits, "
                 "'_', '.', '-'); blank lines and lines starting with '#' are skipped."),
        share_global: bool = typer.Option(
            False, "--share-global", help="Tenants draft from one pooled global tree (a single-team server); "
                                          "default: each tenant's global tree is its own."),
        hide_stats: bool = typer.Option(
            False, "--hide-stats", help="Leave the speculation statistics ('agentspec' key) out of responses."),
        max_tokens_cap: int = typer.Option(
            None, min=1, help="Largest max_tokens a request may ask for; more is a 400 that names the cap."),
        served_model_name: str = typer.Option(None, help="Model id clients must send (default: the model's name)."),
        max_queue: int = typer.Option(16, min=0, help="Requests allowed to wait; more get 503 + Retry-After."),
        max_body_bytes: int = typer.Option(4 * 2**20, min=1, help="Largest request body accepted (else 413)."),
        max_tokens: int = typer.Option(512, min=1, help="Default max_tokens when a request sets none."),
        max_request_tokens: int = typer.Option(
            16384, min=0, help="Compute cap: n x (prompt tokens + max_tokens) of one request; more is a 400 naming "
                               "it (0: no cap). The engine serves one request at a time: this bounds the wait."),
        grammar_timeout: float = typer.Option(
            5.0, min=0.01, help="Seconds a new grammar (response_format, tools) may take to compile; the compile "
                                "runs in a worker process that is killed then (a 400 naming the budget)."),
        grammar_memory_mb: int = typer.Option(1024, min=16, help="Memory a grammar compile may add (worker limit)."),
        grammar_max_schema_bytes: int = typer.Option(
            65536, min=1, help="Largest response_format schema, or all tools' parameters together, in bytes."),
        grammar_cache_mb: int = typer.Option(256, min=1, help="Memory kept by compiled grammars (LRU)."),
        tool_call_parser: str = typer.Option(
            None, help="How tool calls are read from answers: hermes | llama3_json | mistral | json "
                       "(default: chosen from the model's chat template)."),
        auto_tool_grammar: bool = typer.Option(
            True, help="With tool_choice 'auto', hold a call the model starts to its tool's schema (grammar)."),
        options: ModelOptions = None,
    ) -> None:
        """Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics.

        Sessions: the X-Session-Id header or the request's 'user'. Omitted temperature: greedy.
        """
        try:
            import uvicorn

            from agentspec.integrations.middleware import parse_api_keys
            from agentspec.integrations.server import create_app, limit_malloc_arenas
            from agentspec.integrations.toolcalls import PARSERS
        except ImportError as exc:
            typer.echo(f"error: the server needs its extra: pip install 'agentspec[server]' ({exc})", err=True)
            raise typer.Exit(2) from exc
        if tool_call_parser is not None and tool_call_parser not in PARSERS:
            typer.echo(f"error: --tool-call-parser must be one of {', '.join(PARSERS)}, got {tool_call_parser!r}",
                       err=True)
            raise typer.Exit(2)
        entries = list(api_key or []) + (api_keys.read_text().splitlines() if api_keys else [])
        try:
            keys = parse_api_keys(entries)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        if host not in LOOPBACK and not keys:
            typer.echo(f"warning: binding {host} without --api-key: anyone who can reach it can use the model",
                       err=True)
        limits = GrammarLimits(max_schema_bytes=grammar_max_schema_bytes, compile_timeout_s=grammar_timeout,
                               compile_memory_bytes=grammar_memory_mb * 2**20, cache_bytes=grammar_cache_mb * 2**20)
        limit_malloc_arenas()  # before the engine's threads allocate: see scripts/burst.py
        sock = _bind(host, port)  # before the model loads: a busy port fails in a second, not after loading
        engine = options.engine()
        app = create_app(engine, model_name=served_model_name, api_keys=keys, share_global=share_global,
                         hide_stats=hide_stats, max_tokens_cap=max_tokens_cap, max_queue=max_queue,
                         max_body_bytes=max_body_bytes, default_max_tokens=max_tokens,
                         max_request_tokens=max_request_tokens or None, grammar_limits=limits,
                         tool_call_parser=tool_call_parser, auto_tool_grammar=auto_tool_grammar)
        tenants = sorted({t for t in keys.values() if t})
        typer.echo(f"agentspec serving {app.state.model_name!r} on http://{host}:{port}/v1"
                   + (f" for tenants {', '.join(tenants)}" if tenants else ""))
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; exits with a one-line error when the port is taken."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        typer.echo(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from exc
    return sock
