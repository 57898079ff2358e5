"""`fedsite serve`: check the config and its TLS files, then run the agent (`agent.api.server`),
with the outbound connector (`agent.connect`) beside it when `connect.mode` asks for it."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from agent.config import AgentConfig, ConnectConfig, load_config
from agent.errors import ConfigError, TlsError
from agent.tls.files import check_tls_files

if TYPE_CHECKING:
    from agent.api.app import Companion
    from agent.service import SiteService

serve_app = typer.Typer(add_completion=False)


@serve_app.command("serve")
def serve(
    config: Path = typer.Option(..., "--config", "-c", help="Path to the agent's config.yaml."),
    host: str | None = typer.Option(None, help="Bind address (default: api.host)."),
    port: int | None = typer.Option(None, help="Port (default: api.port)."),
    scan: bool = typer.Option(True, "--scan/--no-scan", help="Index the datasets before accepting rounds."),
) -> None:
    """Run the site agent: the REST control API and the round scheduler; with connect.mode outbound,
    the connector to the coordinator's relay and no control API (health and metrics on 127.0.0.1)."""
    from agent.api.server import run_agent

    try:
        cfg = load_config(config)
        if cfg.api.tls is not None:
            check_tls_files(cfg.api.tls)
        if cfg.connect.enabled:
            _check_connect_tls(cfg.connect)
        if cfg.console.enabled and cfg.console.tls is not None:
            check_tls_files(cfg.console.tls)
        if cfg.secure_aggregation.configured:
            from agent.jobs.secure_round import check_setup

            check_setup(cfg)
    except (ConfigError, TlsError) as exc:
        typer.echo(f"{config}: {exc}" if isinstance(exc, TlsError) else str(exc), err=True)
        raise typer.Exit(2) from None
    if host is not None:
        cfg.api.host = host
    if port is not None:
        cfg.api.port = port
    if cfg.console.enabled and cfg.console.port == cfg.api.port:
        clash = f"console.port: {cfg.console.port} is the API's port (--port); the console needs its own"
        typer.echo(f"{config}: {clash}", err=True)
        raise typer.Exit(2)
    run_agent(
        cfg, scan=scan, companions=_companions(cfg) if cfg.connect.enabled or cfg.console.enabled else None
    )


def _check_connect_tls(connect: ConnectConfig) -> None:
    """The relay's CA bundle and the client certificate load, before anything starts."""
    from agent.connect.relay_client import ssl_verify

    try:
        ssl_verify(connect)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"connect.ca_file / connect.client_cert: cannot be used: {exc}") from None


def _companions(cfg: AgentConfig) -> Callable[[SiteService], list[Companion]]:
    """What runs beside the API: the outbound connector (connect.mode outbound or both) and the
    admin console on its own listener (console.enabled)."""

    def build(service: SiteService) -> list[Companion]:
        extra = _connector(service) if cfg.connect.enabled else []
        if cfg.console.enabled:
            from agent.console.server import ConsoleServer

            extra.append(ConsoleServer(service))
        return extra

    return build


def _connector(service: SiteService) -> list[Companion]:
    """The outbound connector (`connect.mode` outbound or both), composed in here because the
    API and the connector are siblings that do not import each other."""
    from agent.connect.connector import Connector

    return [Connector(service)]
