"""The FastAPI application: the routers (`agent.api.routers`), the body limit
(`agent.api.middleware`), error mapping, and the service's life cycle.

Every error answer is JSON `{"detail": ...}`. Caller mistakes are 4xx; anything else is a
bug, logged once with a reference and answered 500 without internals, on a connection that
stays usable (`agent.api.middleware.InternalErrorAnswer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from agent import __version__
from agent.api.metrics import AgentMetrics
from agent.api.middleware import BodyLimitMiddleware, InternalErrorAnswer
from agent.api.routers import audit, evaluations, health, info, rounds, secagg
from agent.api.routers import metrics as prometheus  # `metrics` names the AgentMetrics below
from agent.api.schemas import plan_schema_components
from agent.api.throttle import RefusalGuard
from agent.errors import (
    BodyTooLarge,
    Conflict,
    InvalidRequest,
    JobQueueFull,
    NotFound,
    PlanRefused,
    ServiceError,
    TooLarge,
)
from agent.service import SiteService

log = logging.getLogger("fedsite.api")

SERVICE_ERROR_CODES: dict[type[ServiceError], int] = {
    InvalidRequest: 422,
    TooLarge: 413,
    PlanRefused: 403,
    NotFound: 404,
    Conflict: 409,
    JobQueueFull: 429,
}


def _install_error_handlers(app: FastAPI) -> None:
    async def service_error(_: Request, exc: Exception) -> JSONResponse:
        status = next((code for cls, code in SERVICE_ERROR_CODES.items() if isinstance(exc, cls)), 400)
        headers = {"Retry-After": "30"} if isinstance(exc, JobQueueFull) else None
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    async def too_large(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)

    # Anything else is answered by `InternalErrorAnswer` (see agent.api.middleware for why
    # not by a handler for `Exception`).
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(BodyTooLarge, too_large)


class Companion(Protocol):
    """Something that runs beside the API for the service's lifetime (the outbound connector):
    started after the service, stopped before it closes. The API does not know what it is."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def _include_routers(app: FastAPI, *, control_api: bool = True) -> None:
    """Mount one router per resource; all but the Prometheus endpoint are under /v1. Without
    CONTROL_API (outbound mode) only the local probes: /v1/health and /metrics."""
    v1 = APIRouter(prefix="/v1")
    resources = (health, info, rounds, secagg, evaluations, audit) if control_api else (health,)
    for resource in resources:
        v1.include_router(resource.router)
    app.include_router(v1)
    app.include_router(prometheus.router)


def _publish_plan_schema(app: FastAPI) -> None:
    """Add the plan's JSON schema to the app's OpenAPI components, once, where the job form's
    `plan` part refers to it (`agent.api.schemas.JOB_FORM_OPENAPI`). FastAPI only publishes
    the models of parameters it parses itself, and the job form is parsed by hand."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()  # FastAPI keeps it as app.openapi_schema, and so do we
            document.setdefault("components", {}).setdefault("schemas", {}).update(plan_schema_components())
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    service: SiteService,
    *,
    scan_on_start: bool = True,
    control_api: bool = True,
    companions: Sequence[Companion] = (),
) -> FastAPI:
    """The agent's ASGI app; starting it (lifespan) starts the service, stopping it closes it.

    CONTROL_API False (`connect.mode: outbound`) mounts no control route at all: rounds,
    evaluations, info and audit do not exist on this app, only /v1/health and /metrics.
    COMPANIONS start after the service and stop before it closes, in reverse order."""
    cfg = service.cfg
    metrics = AgentMetrics(service.db, service.privacy_remaining)
    refusals = RefusalGuard(service.audit, cfg.api.refusals)

    async def summarise_refusals() -> None:
        # Summaries of refused requests are recorded when their window ends, even when no
        # further request comes to close it.
        period = max(1.0, cfg.api.refusals.window_seconds / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await run_in_threadpool(refusals.flush_due)
            except Exception:
                log.exception("could not record the summary of refused requests")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(service.start, scan=scan_on_start)
        side: Any = None
        if cfg.api.metrics_port is not None:
            side = metrics.serve(cfg.api.host, cfg.api.metrics_port)
            log.info("metrics without auth on http://%s:%d/metrics", cfg.api.host, cfg.api.metrics_port)
        summaries = asyncio.create_task(summarise_refusals())
        started: list[Companion] = []
        try:
            for companion in companions:
                await run_in_threadpool(companion.start)
                started.append(companion)
            log.info("site %s ready", cfg.site.id)
            yield
        finally:
            for companion in reversed(started):
                try:
                    await run_in_threadpool(companion.stop)
                except Exception:
                    log.exception("could not stop %s", type(companion).__name__)
            summaries.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await summaries
            if isinstance(side, tuple) and side:
                side[0].shutdown()
            log.info("stopping: jobs and database")
            try:
                await run_in_threadpool(refusals.flush)
            except Exception:
                log.exception("could not record the summary of refused requests")
            await run_in_threadpool(service.close)

    app = FastAPI(
        title="fedsite site agent",
        version=__version__,
        summary="Control API of a federated-learning site: rounds, evaluations, audit.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics
    # Refused callers: throttled per address, audited in bounded events (the token check and
    # the mutual-TLS gate of `agent.api.server` share it).
    app.state.refusals = refusals
    _include_routers(app, control_api=control_api)
    _publish_plan_schema(app)
    # Added first, so it runs inside the body limit: its 500s are counted and timed too.
    app.add_middleware(InternalErrorAnswer)
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.api.max_body_bytes, metrics=metrics)
    _install_error_handlers(app)
    return app
