"""Run the agent's API with uvicorn (what `fedsite serve` does once the config is checked).

On SIGTERM or Ctrl-C uvicorn stops accepting connections, lets open requests finish
(bounded), then the app's shutdown stops the job scheduler: a running worker is stopped
and its round marked `interrupted`, and the database is closed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from agent.api.middleware import gated_protocol_class
from agent.api.throttle import RefusalGuard
from agent.audit.sink import AuditSink
from agent.config import AgentConfig, TlsConfig
from agent.tls.contexts import uvicorn_ssl_kwargs

if TYPE_CHECKING:
    from agent.api.app import Companion
    from agent.service import SiteService

log = logging.getLogger("fedsite.serve")

LOOPBACK = "127.0.0.1"

GRACEFUL_SHUTDOWN_S = 10


def tls_options(
    tls: TlsConfig | None, audit: AuditSink | None = None, guard: RefusalGuard | None = None
) -> dict[str, Any]:
    """uvicorn's TLS options from `api.tls` (empty without TLS): HTTPS from the config's
    certificate, and every connection wrapped in the mutual-TLS gate, so that with
    `client_ca_file` requests without an allowed client certificate get 403 and an
    `api.refused` event in AUDIT, through GUARD, the app's throttle of refused callers (see
    agent.api.middleware for why this is enforced per request, not in the handshake). Raises
    TlsError naming the file or key when the TLS material cannot be used."""
    if tls is None:
        return {}
    return {**uvicorn_ssl_kwargs(tls), "http": gated_protocol_class(tls, audit, guard)}


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # httpx logs every request at INFO: an outbound agent's long polls and heartbeats would fill
    # the log with a line every few seconds. What the connector does is logged by the connector.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def log_doctor(cfg: AgentConfig) -> None:
    """`fedsite doctor`'s checks as start-up log lines: one per check, at WARNING for a warning and
    ERROR for a failure (with its fix), so that the log of an agent with nothing to train on says
    why. They never stop the start: the agent serves /v1/info, which reports the same problems."""
    from agent.doctor import run_doctor

    try:
        report = run_doctor(cfg)
    except Exception as exc:  # a check that cannot run must not keep the site down
        log.warning("doctor: the checks could not run: %s: %s", type(exc).__name__, exc)
        return
    levels = {"ok": logging.INFO, "warn": logging.WARNING, "fail": logging.ERROR}
    for check in report.checks:
        log.log(levels[check.status], "doctor: %s", check.line())


def run_agent(
    cfg: AgentConfig,
    *,
    scan: bool = True,
    companions: Callable[[SiteService], Sequence[Companion]] | None = None,
) -> None:
    """Serve CFG's site until SIGTERM or Ctrl-C: the REST control API and the round scheduler.
    CFG is already checked (config and TLS files); SCAN indexes the datasets before rounds.
    COMPANIONS builds what runs beside the API from the service (the outbound connector,
    which the command line composes in: the API does not import it).

    With `connect.mode: outbound` no control route exists and the port answers only the local
    probes (/v1/health, /metrics), bound to 127.0.0.1 whatever api.host says."""
    import uvicorn

    from agent.api.app import create_app
    from agent.jobs.launch import start_launcher
    from agent.service import SiteService

    configure_logging(cfg.log_level)
    # Before any thread is started: a check as another uid forks.
    log_doctor(cfg)
    # Before the database is opened and any thread started: workers are forks of it.
    launcher = start_launcher(cfg.device)
    service = SiteService.open(cfg, runner_options={"launcher": launcher})
    control_api = cfg.connect.serves_control_api
    host = cfg.api.host
    if not control_api and host != LOOPBACK:
        log.info("connect.mode outbound: the local probes listen on %s, not on api.host %s", LOOPBACK, host)
        host = LOOPBACK
    extra = list(companions(service)) if companions is not None else []
    app = create_app(service, scan_on_start=scan, control_api=control_api, companions=extra)
    scheme = "https" if cfg.api.tls is not None else "http"
    if control_api:
        log.info("site %s: serving on %s://%s:%d", cfg.site.id, scheme, host, cfg.api.port)
    else:
        log.info(
            "site %s: outbound only, no control API; health and metrics on %s://%s:%d",
            cfg.site.id,
            scheme,
            host,
            cfg.api.port,
        )
    uvicorn.run(
        app,
        host=host,
        port=cfg.api.port,
        log_level=cfg.log_level.lower(),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        server_header=False,
        **tls_options(cfg.api.tls, service.audit, app.state.refusals),
    )
