"""The console's own listener, run by `fedsite serve` beside the API (a `Companion` of its app).

A second uvicorn server in a thread of the agent's process: it shares the site service (the
database, the audit log, the job store) with the API without sharing its port. It binds
`console.host:console.port` (127.0.0.1 by default: reach it through an SSH tunnel, or bind the
hospital's internal interface), with HTTPS when `console.tls` is set. The config refuses a
console port equal to the API's (`agent.config`); a port that cannot be bound stops the agent
at start, with the reason in the log, rather than leaving the admin without a console.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from agent.api.server import quiet_server
from agent.console.app import create_console_app
from agent.errors import ConfigError
from agent.service import SiteService
from agent.tls.contexts import uvicorn_ssl_kwargs

log = logging.getLogger("fedsite.console")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class ConsoleServer:
    """Serves the console while the agent runs: start() returns once it listens."""

    def __init__(self, service: SiteService) -> None:
        self.service = service
        self.config = service.cfg.console
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._app: Any = None

    def start(self) -> None:

        cfg = self.config
        self._app = create_console_app(self.service, cfg)
        ssl: dict[str, Any] = uvicorn_ssl_kwargs(cfg.tls) if cfg.tls is not None else {}
        # Like the API's: asleep between requests, woken at once by `stop`.
        self._server = quiet_server(
            self._app,
            host=cfg.host,
            port=cfg.port,
            lifespan="off",
            log_level=self.service.cfg.log_level.lower(),
            server_header=False,
            access_log=False,
            **ssl,
        )
        self._thread = threading.Thread(target=self._server.run, name="console", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(
                    f"console: could not listen on {cfg.host}:{cfg.port} (console.host, console.port); "
                    "see the log line above"
                )
            time.sleep(0.05)
        scheme = "https" if cfg.tls is not None else "http"
        log.info("admin console on %s://%s:%d", scheme, cfg.host, cfg.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
        if self._app is not None:
            # Failed logins counted in the last window still get their summary event.
            self._app.state.login_guard.flush()
