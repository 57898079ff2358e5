"""Run the agent's API with uvicorn (what `fedsite serve` does once the config is checked).

On SIGTERM or Ctrl-C uvicorn stops accepting connections, lets open requests finish
(bounded), then the app's shutdown stops the job scheduler: a running worker is stopped
and its round marked `interrupted`, and the database is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from agent.api.middleware import DateHeader, gated_protocol_class
from agent.api.throttle import RefusalGuard
from agent.audit.sink import AuditSink
from agent.config import AgentConfig, TlsConfig
from agent.tls.contexts import uvicorn_ssl_kwargs

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import ASGIApp

    from agent.api.app import Companion
    from agent.service import SiteService

log = logging.getLogger("fedsite.serve")

LOOPBACK = "127.0.0.1"

GRACEFUL_SHUTDOWN_S = 10
# uvicorn's exit status when the server did not start.
STARTUP_FAILURE = 3


def tls_options(
    tls: TlsConfig | None, audit: AuditSink | None = None, guard: RefusalGuard | None = None
) -> dict[str, Any]:
    """uvicorn's TLS options from `api.tls` (empty without TLS): HTTPS from the config's
    certificate, and every connection wrapped in the mutual-TLS gate, so that with
    `client_ca_file` requests without an allowed client certificate get 403 and an
    `api.refused` event in AUDIT, through GUARD, the app's throttle of refused callers (see
    agent.api.middleware for why this is enforced per request, not in the handshake). The gate's
    connections give every answer its Date header themselves (`DateHeader`), uvicorn's is off.
    Raises TlsError naming the file or key when the TLS material cannot be used."""
    if tls is None:
        return {}
    return {**uvicorn_ssl_kwargs(tls), "http": gated_protocol_class(tls, audit, guard), "date_header": False}


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
    server = quiet_server(
        app,
        on_exit=service.job_ends.close,
        host=host,
        port=cfg.api.port,
        log_level=cfg.log_level.lower(),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        server_header=False,
        **tls_options(cfg.api.tls, service.audit, app.state.refusals),
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        # What uvicorn.run does when the server could not start (the port taken, say).
        sys.exit(STARTUP_FAILURE)


def quiet_server(
    app: ASGIApp, *, on_exit: Callable[[], None] | None = None, **options: Any
) -> uvicorn.Server:
    """uvicorn's server of APP with OPTIONS (`uvicorn.Config`'s), asleep until it is asked to
    stop instead of waking ten times a second.

    uvicorn's main loop wakes every 0.1 s to see whether it should stop and once a second
    refreshes its Date header. An idle agent should cost nothing: on a virtual machine each
    wake-up of a sleeping process costs milliseconds of CPU, and a federation's agents sharing
    a few cores (benchmarks/fanout.py, 28 on 2) spent a measurable share of them there. Here
    the loop sets uvicorn's default headers once and then waits for an event that setting
    `should_exit` sets, whoever sets it (SIGTERM and Ctrl-C do, through `handle_exit`); the
    Date header comes from `DateHeader` around APP instead, and uvicorn's own is turned off.
    ON_EXIT, if given, is called then as well (the service ends its long-polled status requests,
    which would otherwise hold the shutdown up for their wait). The admin console's server
    (`agent.console.server`, in a thread) is one too: setting `should_exit` from another thread
    wakes it the same way."""
    import uvicorn

    class QuietServer(uvicorn.Server):
        _exit: asyncio.Event | None = None
        _loop: asyncio.AbstractEventLoop | None = None
        _stop = False

        @property
        def should_exit(self) -> bool:
            return self._stop

        @should_exit.setter
        def should_exit(self, value: bool) -> None:
            self._stop = value
            loop, event = self._loop, self._exit
            if value and loop is not None and event is not None:
                # This may run as a signal handler, between any two bytecodes of the main
                # thread, which also runs the loop: ON_EXIT takes a lock that the interrupted
                # code may hold, so it runs on the loop, next, and not here.
                with contextlib.suppress(RuntimeError):  # the loop has already closed
                    loop.call_soon_threadsafe(_exit_now, event, on_exit)

        async def main_loop(self) -> None:
            self._loop = asyncio.get_running_loop()
            self._exit = asyncio.Event()
            # The default headers (the configured ones; no Date), and a stop asked for while
            # the server started.
            if await self.on_tick(0):
                return
            await self._exit.wait()

    def _exit_now(event: asyncio.Event, then: Callable[[], None] | None) -> None:
        event.set()
        if then is not None:
            then()

    return QuietServer(uvicorn.Config(DateHeader(app), **{**options, "date_header": False}))
