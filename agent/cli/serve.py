"""`fedsite serve`: check the config and its TLS files, then run the agent (`agent.api.server`)."""

from __future__ import annotations

from pathlib import Path

import typer

from agent.config import load_config
from agent.errors import ConfigError, TlsError
from agent.tls.files import check_tls_files

serve_app = typer.Typer(add_completion=False)


@serve_app.command("serve")
def serve(
    config: Path = typer.Option(..., "--config", "-c", help="Path to the agent's config.yaml."),
    host: str | None = typer.Option(None, help="Bind address (default: api.host)."),
    port: int | None = typer.Option(None, help="Port (default: api.port)."),
    scan: bool = typer.Option(True, "--scan/--no-scan", help="Index the datasets before accepting rounds."),
) -> None:
    """Run the site agent: the REST control API and the round scheduler."""
    from agent.api.server import run_agent

    try:
        cfg = load_config(config)
        if cfg.api.tls is not None:
            check_tls_files(cfg.api.tls)
    except (ConfigError, TlsError) as exc:
        typer.echo(f"{config}: {exc}" if isinstance(exc, TlsError) else str(exc), err=True)
        raise typer.Exit(2) from None
    if host is not None:
        cfg.api.host = host
    if port is not None:
        cfg.api.port = port
    run_agent(cfg, scan=scan)
