"""FastAPI dependencies: the site service, the metrics, and bearer-token auth by role.

Auth runs before any body is read, so a refused call changes nothing and costs little.
Every refusal is counted and audited ("api.refused" with the reason, method, path and
client address); the presented token itself is never stored or logged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from agent.api.metrics import AgentMetrics
from agent.service import SiteService

COORDINATOR = "coordinator"
ADMIN = "admin"


@dataclass(frozen=True)
class Caller:
    name: str
    role: str

    @property
    def actor(self) -> str:
        return f"token:{self.name}"


def get_service(request: Request) -> SiteService:
    service: SiteService = request.app.state.service
    return service


def get_metrics(request: Request) -> AgentMetrics:
    metrics: AgentMetrics = request.app.state.metrics
    return metrics


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _refuse(
    request: Request, status: int, reason: str, detail: str, token_name: str | None = None
) -> HTTPException:
    service = get_service(request)
    get_metrics(request).auth_failures.labels(reason=reason).inc()
    details = {
        "reason": reason,
        "method": request.method,
        "path": request.url.path,
        "client": _client(request),
    }
    if token_name is not None:
        details["token_name"] = token_name
    service.audit.append(
        "api.refused", actor=f"token:{token_name}" if token_name else "anonymous", details=details
    )
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return HTTPException(status_code=status, detail=detail, headers=headers)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def require_role(*roles: str) -> Callable[[Request], Awaitable[Caller]]:
    """A dependency that admits callers whose token has one of `roles`.

    The token check is one small indexed read and runs on the event loop: status polls are
    the hot path, and a hop to the thread pool and back costs more than the read itself
    on a busy machine. A refusal writes an audit event, which may wait for the database's
    write lock, so that path runs in the thread pool.
    """

    async def dependency(request: Request) -> Caller:
        header = request.headers.get("authorization")
        token = bearer_token(request)
        if token is None:
            reason = "missing token" if header is None else "malformed authorization header"
            raise await run_in_threadpool(
                _refuse, request, 401, reason, "authentication required: send 'Authorization: Bearer <token>'"
            )
        info = get_service(request).authenticate(token)
        if info is None:
            raise await run_in_threadpool(
                _refuse, request, 401, "unknown or revoked token", "invalid or revoked token"
            )
        if info.role not in roles:
            raise await run_in_threadpool(
                _refuse,
                request,
                403,
                "wrong role",
                f"this endpoint needs the role {' or '.join(roles)}; "
                f"token {info.name!r} has role {info.role}",
                info.name,
            )
        return Caller(name=info.name, role=info.role)

    dependency.__name__ = f"require_{'_or_'.join(roles)}"
    return dependency


require_coordinator = require_role(COORDINATOR)
require_admin = require_role(ADMIN)
