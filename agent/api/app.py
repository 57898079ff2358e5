"""The FastAPI application: routes, body limit, error mapping, and the service's life cycle.

Every error answer is JSON `{"detail": ...}`. Caller mistakes are 4xx; anything else is a
bug, logged with a reference and answered 500 without internals.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import __version__
from agent.api.metrics import AgentMetrics
from agent.api.routes import router
from agent.service import (
    Conflict,
    InvalidRequest,
    NotFound,
    PlanNotApproved,
    QueueFull,
    ServiceError,
    SiteService,
    TooLarge,
)

log = logging.getLogger("fedsite.api")

SERVICE_ERROR_CODES: dict[type[ServiceError], int] = {
    InvalidRequest: 422,
    TooLarge: 413,
    PlanNotApproved: 403,
    NotFound: 404,
    Conflict: 409,
    QueueFull: 429,
}


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds api.max_body_bytes ({limit} bytes)")
        self.limit = limit


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes`: by Content-Length up front, and by counting the stream
    (chunked uploads, or a Content-Length that lies). Also counts answers for the metrics and
    adds a Server-Timing header with the agent's own time."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: AgentMetrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = str(scope.get("method", ""))
        started = time.perf_counter()

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(method=method, code=str(message["status"])).inc()
                # Server-Timing: how long the agent itself took, for operators and latency probes.
                took = (time.perf_counter() - started) * 1000.0
                message = dict(message)
                message["headers"] = [
                    *message.get("headers", []),
                    (b"server-timing", f"app;dur={took:.2f}".encode()),
                ]
            await send(message)

        length = None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                length = value
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _json(counted_send, 400, "invalid Content-Length header")
                return
            if declared > self.max_bytes:
                await _json(counted_send, 413, str(BodyTooLarge(self.max_bytes)))
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, counted_send)


async def _json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _install_error_handlers(app: FastAPI) -> None:
    async def service_error(_: Request, exc: Exception) -> JSONResponse:
        status = next((code for cls, code in SERVICE_ERROR_CODES.items() if isinstance(exc, cls)), 400)
        headers = {"Retry-After": "30"} if isinstance(exc, QueueFull) else None
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    async def too_large(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", ref, request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"detail": f"internal error (reference {ref}); the agent's log has the details"}, 500
        )

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(BodyTooLarge, too_large)
    app.add_exception_handler(Exception, internal)


def create_app(service: SiteService, *, scan_on_start: bool = True) -> FastAPI:
    """The agent's ASGI app; starting it (lifespan) starts the service, stopping it closes it."""
    cfg = service.cfg
    metrics = AgentMetrics(service.db)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(service.start, scan=scan_on_start)
        side: Any = None
        if cfg.api.metrics_port is not None:
            side = metrics.serve(cfg.api.host, cfg.api.metrics_port)
            log.info("metrics without auth on http://%s:%d/metrics", cfg.api.host, cfg.api.metrics_port)
        log.info("site %s ready", cfg.site.id)
        try:
            yield
        finally:
            if isinstance(side, tuple) and side:
                side[0].shutdown()
            log.info("stopping: jobs and database")
            await run_in_threadpool(service.close)

    app = FastAPI(
        title="fedsite site agent",
        version=__version__,
        summary="Control API of a federated-learning site: rounds, evaluations, audit.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics
    app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.api.max_body_bytes, metrics=metrics)
    _install_error_handlers(app)
    return app
