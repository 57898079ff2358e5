"""`fedsite serve`: run the agent's API with uvicorn.

On SIGTERM or Ctrl-C uvicorn stops accepting connections, lets open requests finish
(bounded), then the app's shutdown stops the job scheduler: a running worker is stopped
and its round marked `interrupted`, and the database is closed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import typer

from agent.certs import AuditSink, TlsError, check_tls_files, uvicorn_ssl_kwargs
from agent.config import AgentConfig, ConfigError, load_config

serve_app = typer.Typer(add_completion=False)
log = logging.getLogger("fedsite.serve")

GRACEFUL_SHUTDOWN_S = 10


def tls_options(cfg: AgentConfig, audit: AuditSink | None = None) -> dict[str, Any]:
    """uvicorn's TLS options from `api.tls` (empty without TLS). With `client_ca_file`, mutual
    TLS: requests without an allowed client certificate get 403 and an `api.refused` event in
    AUDIT (see agent.certs for why this is enforced per request, not in the handshake)."""
    return uvicorn_ssl_kwargs(cfg.api.tls, audit)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


@serve_app.command("serve")
def serve(
    config: Path = typer.Option(..., "--config", "-c", help="Path to the agent's config.yaml."),
    host: str | None = typer.Option(None, help="Bind address (default: api.host)."),
    port: int | None = typer.Option(None, help="Port (default: api.port)."),
    scan: bool = typer.Option(True, "--scan/--no-scan", help="Index the datasets before accepting rounds."),
) -> None:
    """Run the site agent: the REST control API and the round scheduler."""
    import uvicorn

    from agent.api.app import create_app
    from agent.jobs import start_fork_server
    from agent.service import SiteService

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
    configure_logging(cfg.log_level)
    # Before the database is opened and any thread started: workers are forks of it.
    fork_server = start_fork_server(cfg.device)
    service = SiteService.open(cfg, runner_options={"fork_server": fork_server})
    app = create_app(service, scan_on_start=scan)
    scheme = "https" if cfg.api.tls is not None else "http"
    log.info("site %s: serving on %s://%s:%d", cfg.site.id, scheme, cfg.api.host, cfg.api.port)
    uvicorn.run(
        app,
        host=cfg.api.host,
        port=cfg.api.port,
        log_level=cfg.log_level.lower(),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        server_header=False,
        **tls_options(cfg, service.audit),
    )
