"""The relay's HTTP API (`/v1/relay/...`): what a pull-mode agent calls, and nothing else.

Each route is thin: it checks the token (the token names the site), lets `RelayStore` do the
work and answers JSON. Refusals from the store are service errors of `agent.errors`, answered
as `{"detail": ...}` with the status of `RELAY_ERROR_CODES`. Every route that touches the
database is a plain `def`, so FastAPI runs it in its thread pool; a long poll waits in a thread
of a pool of its own (`max_polls`), so that neither the event loop nor the other routes wait
behind the polls.

A middleware counts the body bytes of every request and answer per site (`RelayStore.traffic`),
so a benchmark can compare the bytes on the wire with push mode, which counts the same way.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.errors import Conflict, InvalidRequest, NotFound, ServiceError, TooLarge
from coordinator.relay.store import AGENT_STATUSES, RelayStore

RELAY_ERROR_CODES: dict[type[ServiceError], int] = {
    InvalidRequest: 400,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
}
_SITE_KEY = "relay_site"


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RegisterBody(_Body):
    info: dict[str, Any]
    running: list[str] = Field(default_factory=list)


class HeartbeatTask(_Body):
    task_id: str
    lease_id: str
    status: str
    progress: Any = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    num_samples: int | None = None
    error: str | None = None


class HeartbeatBody(_Body):
    tasks: list[HeartbeatTask] = Field(default_factory=list)


class CommitResult(_Body):
    num_samples: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    audit_anchor: dict[str, Any] | None = None


class CommitBody(_Body):
    lease_id: str
    manifest: list[str]
    sha256: str | None = None
    bytes: int = Field(ge=0)
    result: CommitResult = Field(default_factory=CommitResult)


class RefuseBody(_Body):
    lease_id: str
    code: str
    reason: str
    plan_hash: str | None = None


def get_store(request: Request) -> RelayStore:
    store: RelayStore = request.app.state.relay_store
    return store


StoreDep = Annotated[RelayStore, Depends(get_store)]


def authenticated_site(request: Request, store: StoreDep) -> str:
    """The site the bearer token belongs to (recorded as seen now); 401 otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    site = store.site_for_token(token.strip(), touch=True) if scheme.lower() == "bearer" else None
    if site is None:
        raise HTTPException(
            401,
            "missing or unknown site token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    request.scope.setdefault("state", {})[_SITE_KEY] = site
    return site


SiteDep = Annotated[str, Depends(authenticated_site)]


class TrafficCounter:
    """ASGI middleware: add each request's and answer's body bytes to the site's counter."""

    def __init__(self, app: ASGIApp, store: RelayStore) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counts = {"in": 0, "out": 0}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                counts["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                counts["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            site = scope.get("state", {}).get(_SITE_KEY)
            if site is not None:
                self.store.traffic(site).add(sent=counts["out"], received=counts["in"])


def _router() -> APIRouter:
    r = APIRouter(prefix="/v1/relay")

    @r.post("/register")
    def register(body: RegisterBody, site: SiteDep, store: StoreDep) -> dict[str, Any]:
        return store.register(site, body.info, body.running)

    @r.get("/tasks/next", response_model=None)
    async def next_task(
        request: Request, site: SiteDep, store: StoreDep, wait: Annotated[float | None, Query()] = None
    ) -> dict[str, Any] | Response:
        limit = store.limits.max_wait_s
        wait_s = min(max(limit if wait is None else wait, 0.0), limit)
        # A waiting poll holds a thread of its own pool, never one of the pool the other
        # routes run in: many sites waiting at once cannot starve heartbeats and uploads.
        task = await anyio.to_thread.run_sync(
            store.next_task, site, wait_s, limiter=request.app.state.poll_limiter
        )
        if task is None:
            return Response(status_code=204)
        return {"task": task}

    @r.get("/blobs/{sha256}")
    def blob(sha256: str, site: SiteDep, store: StoreDep) -> FileResponse:
        path = store.blob_for(site, sha256)
        return FileResponse(path, media_type="application/octet-stream", headers={"X-Content-SHA256": sha256})

    @r.post("/heartbeat")
    def heartbeat(body: HeartbeatBody, site: SiteDep, store: StoreDep) -> dict[str, Any]:
        for t in body.tasks:
            if t.status not in AGENT_STATUSES:
                raise InvalidRequest(
                    f"task {t.task_id}: status must be one of {', '.join(AGENT_STATUSES)}, got {t.status!r}"
                )
        return store.heartbeat(site, [t.model_dump() for t in body.tasks])

    @r.get("/tasks/{task_id}/chunks")
    def chunks(
        task_id: str, site: SiteDep, store: StoreDep, lease_id: Annotated[str, Query()]
    ) -> dict[str, Any]:
        return {"have": store.chunks_have(site, task_id, lease_id)}

    @r.put("/tasks/{task_id}/chunks/{sha256}", status_code=201)
    async def put_chunk(
        task_id: str,
        sha256: str,
        request: Request,
        site: SiteDep,
        store: StoreDep,
        lease_id: Annotated[str, Query()],
    ) -> dict[str, Any]:
        limit = store.limits.chunk_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"chunk of {declared} bytes is over chunk_bytes={limit}")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise TooLarge(f"chunk is over chunk_bytes={limit}")
        answer: dict[str, Any] = await run_in_threadpool(
            store.put_chunk, site, task_id, lease_id, sha256, bytes(body)
        )
        return answer

    @r.post("/tasks/{task_id}/commit")
    def commit(task_id: str, body: CommitBody, site: SiteDep, store: StoreDep) -> dict[str, Any]:
        return store.commit(
            site, task_id, body.lease_id, body.manifest, body.sha256, body.bytes, body.result.model_dump()
        )

    @r.post("/tasks/{task_id}/refuse")
    def refuse(task_id: str, body: RefuseBody, site: SiteDep, store: StoreDep) -> dict[str, Any]:
        store.refuse(site, task_id, body.lease_id, body.code, body.reason, body.plan_hash)
        return {"task_id": task_id, "status": "refused"}

    return r


def create_relay_app(store: RelayStore, *, max_polls: int = 512) -> FastAPI:
    """The relay for STORE; `app.state.relay_store` is the store it serves. At most MAX_POLLS
    long polls wait at once (each in a thread); more wait for a free one."""
    app = FastAPI(title="fedsite relay", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.relay_store = store
    app.state.poll_limiter = anyio.CapacityLimiter(max_polls)

    async def service_error(_: Request, exc: Exception) -> JSONResponse:
        status = next((code for cls, code in RELAY_ERROR_CODES.items() if isinstance(exc, cls)), 400)
        return JSONResponse({"detail": str(exc)}, status_code=status)

    app.add_exception_handler(ServiceError, service_error)

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(_router())
    app.add_middleware(TrafficCounter, store=store)
    return app
