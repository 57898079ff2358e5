"""FastAPI dependencies: the site service, the metrics, and bearer-token auth by role.

Routes declare what they need with the `Annotated` aliases at the end of this module
(`ServiceDep`, `MetricsDep`, `CoordinatorCaller`, `AdminCaller`) instead of repeating
`Depends(...)` defaults, so that the role an endpoint needs is read off its signature.

Auth runs before any body is read, so a refused call changes nothing and costs little.
Every refusal is counted and audited ("api.refused" with the reason, method, path and
client address; an expired token also by its name) through the app's `RefusalGuard`
(`agent.api.throttle`), which bounds what refusals can write (the first few of a window in
full, the rest counted in one summary per reason) and answers 429 with ``Retry-After`` to an
address that collected too many. The presented token itself is never stored or logged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool

from agent.api.metrics import AgentMetrics
from agent.api.throttle import THROTTLED_REASON, RefusalGuard
from agent.errors import TokenExpired
from agent.jobs.ends import MAX_WAIT_S
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


def _service(request: Request) -> SiteService:
    service: SiteService = request.app.state.service
    return service


def _metrics(request: Request) -> AgentMetrics:
    metrics: AgentMetrics = request.app.state.metrics
    return metrics


# The two dependencies below are coroutines although they only read an attribute: FastAPI
# calls a plain function dependency through the thread pool, and a status poll should not
# pay that hop twice (see `require_role`).


async def get_service(request: Request) -> SiteService:
    """The app's one `SiteService` (`create_app` puts it in `app.state`)."""
    return _service(request)


async def get_metrics(request: Request) -> AgentMetrics:
    """The app's `AgentMetrics` (`create_app` puts it in `app.state`)."""
    return _metrics(request)


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _guard(request: Request) -> RefusalGuard:
    guard: RefusalGuard = request.app.state.refusals
    return guard


def _refuse(
    request: Request, status: int, reason: str, detail: str, token_name: str | None = None
) -> HTTPException:
    _metrics(request).auth_failures.labels(reason=reason).inc()
    client = _client(request)
    details = {
        "reason": reason,
        "method": request.method,
        "path": request.url.path,
        "client": client,
    }
    if token_name is not None:
        details["token_name"] = token_name
    _guard(request).refused(
        client, actor=f"token:{token_name}" if token_name else "anonymous", reason=reason, details=details
    )
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return HTTPException(status_code=status, detail=detail, headers=headers)


def _throttle(request: Request, retry_after: int) -> HTTPException:
    _metrics(request).auth_failures.labels(reason=THROTTLED_REASON).inc()
    guard = _guard(request)
    guard.throttled(_client(request), method=request.method, path=request.url.path)
    detail, headers = guard.too_many(retry_after)
    return HTTPException(status_code=429, detail=detail, headers=headers)


async def _refusal(
    request: Request, status: int, reason: str, detail: str, token_name: str | None = None
) -> HTTPException:
    """The refusal to raise: 429 when the caller's address is throttled, else STATUS. Either
    is recorded (bounded) in the audit log, which may wait for the database's write lock, so
    in the thread pool."""
    retry_after = _guard(request).charge(_client(request))
    if retry_after is not None:
        return await run_in_threadpool(_throttle, request, retry_after)
    return await run_in_threadpool(_refuse, request, status, reason, detail, token_name)


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
    write lock, so that path runs in the thread pool. The token is checked before the
    throttle, so that a valid token is never answered 429.
    """

    async def dependency(request: Request) -> Caller:
        header = request.headers.get("authorization")
        token = bearer_token(request)
        if token is None:
            reason = "missing token" if header is None else "malformed authorization header"
            raise await _refusal(
                request, 401, reason, "authentication required: send 'Authorization: Bearer <token>'"
            )
        try:
            info = _service(request).authenticate(token)
        except TokenExpired as exc:
            raise await _refusal(
                request,
                401,
                "expired token",
                f"{exc}; ask the site for a new token",
                exc.name,
            ) from None
        if info is None:
            raise await _refusal(request, 401, "unknown or revoked token", "invalid or revoked token")
        if info.role not in roles:
            raise await _refusal(
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

ServiceDep = Annotated[SiteService, Depends(get_service)]
MetricsDep = Annotated[AgentMetrics, Depends(get_metrics)]
# A route's caller parameter comes first in its signature: FastAPI solves dependencies in
# the order they are declared, and the token must be checked before anything else runs
# (the job form, for one, reads the request body).
CoordinatorCaller = Annotated[Caller, Depends(require_coordinator)]
AdminCaller = Annotated[Caller, Depends(require_admin)]
# `?wait=` of a job's status: a long poll (agent.jobs.ends).
StatusWait = Annotated[
    float,
    Query(
        ge=0,
        le=MAX_WAIT_S,
        description=(
            f"Seconds (at most {MAX_WAIT_S:g}) to wait for the job to stop (completed, failed, "
            "cancelled or interrupted) before answering; the answer comes as soon as it does. "
            "0 (the default) answers at once."
        ),
    ),
]
