"""``agentspec serve``: the OpenAI-compatible HTTP server (needs the ``server`` extra)."""

from __future__ import annotations

import typer

from agentspec.cli.options import ModelOptions, model_options


def register(app: typer.Typer) -> None:
    @app.command()
    @model_options
    def serve(
        host: str = typer.Option("127.0.0.1", help="Interface to bind (default: loopback only)."),
        port: int = typer.Option(8000, help="TCP port."),
        api_key: str = typer.Option(None, envvar="AGENTSPEC_API_KEY",
                                    help="Require 'Authorization: Bearer <key>' on /v1 (env AGENTSPEC_API_KEY)."),
        served_model_name: str = typer.Option(None, help="Model id clients must send (default: the model's name)."),
        max_queue: int = typer.Option(16, min=0, help="Requests allowed to wait; more get 503 + Retry-After."),
        max_body_bytes: int = typer.Option(4 * 2**20, min=1, help="Largest request body accepted (else 413)."),
        max_tokens: int = typer.Option(512, min=1, help="Default max_tokens when a request sets none."),
        options: ModelOptions = None,
    ) -> None:
        """Serve /v1/chat/completions, /v1/models and /health (sessions: X-Session-Id header or 'user')."""
        try:
            import uvicorn

            from agentspec.integrations.server import create_app
        except ImportError as exc:
            typer.echo(f"error: the server needs its extra: pip install 'agentspec[server]' ({exc})", err=True)
            raise typer.Exit(2) from exc
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            typer.echo(f"warning: binding {host} without --api-key: anyone who can reach it can use the model",
                       err=True)
        engine = options.engine()
        app = create_app(engine, model_name=served_model_name, api_key=api_key, max_queue=max_queue,
                         max_body_bytes=max_body_bytes, default_max_tokens=max_tokens)
        typer.echo(f"agentspec serving {app.state.model_name!r} on http://{host}:{port}/v1")
        uvicorn.run(app, host=host, port=port, log_level="info")
