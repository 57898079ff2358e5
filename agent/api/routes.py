"""The v1 routes: thin adapters from HTTP to `SiteService`.

Each route authenticates first (a dependency), then reads its input, then calls one
service method. Service errors become HTTP codes in `agent.api.app`, not here. Blocking
work (database, weight decoding) runs in the thread pool, so status polls stay fast
while an upload is checked.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.api.deps import Caller, get_metrics, get_service, require_admin, require_coordinator
from agent.api.metrics import CONTENT_TYPE, AgentMetrics
from agent.api.schemas import (
    JOB_FORM_OPENAPI,
    AuditListOut,
    AuditVerifyOut,
    ErrorOut,
    EvaluationAccepted,
    EvaluationOut,
    HealthOut,
    InfoOut,
    RoundAccepted,
    RoundOut,
)
from agent.service import SiteService

MULTIPART = "multipart/form-data"
JOB_FIELDS = ("plan", "weights")

_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "No token, or an invalid or revoked one."},
    403: {"model": ErrorOut, "description": "The token's role may not call this endpoint."},
}
_JOB_ERRORS: dict[int | str, dict[str, Any]] = {
    **_AUTH_ERRORS,
    400: {"model": ErrorOut, "description": "Malformed multipart body."},
    403: {
        "model": ErrorOut,
        "description": "Wrong role, or the plan is not approved at this site (hash given).",
    },
    409: {"model": ErrorOut, "description": "round_id already used with a different plan or weights."},
    413: {"model": ErrorOut, "description": "Body, plan or weights larger than the configured limits."},
    415: {"model": ErrorOut, "description": "Not a multipart/form-data body."},
    422: {
        "model": ErrorOut,
        "description": "Invalid plan (key named), unknown dataset, or weights that fail checks.",
    },
    429: {"model": ErrorOut, "description": "The job queue is full; retry later."},
}
_STATUS_ERRORS: dict[int | str, dict[str, Any]] = {
    **_AUTH_ERRORS,
    404: {"model": ErrorOut, "description": "No such id."},
}

router = APIRouter()


async def read_job_form(request: Request, service: SiteService) -> tuple[bytes, bytes | None]:
    """The `plan` text and the optional `weights` file of a multipart request."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith(MULTIPART):
        raise HTTPException(
            415,
            f"expected a {MULTIPART} body with the fields 'plan' (JSON text) and "
            f"'weights' (safetensors file), got {ctype or 'no content type'!r}",
        )
    limits = service.cfg.limits
    try:
        form = await request.form(
            max_files=len(JOB_FIELDS),
            max_fields=len(JOB_FIELDS) + 2,
            max_part_size=service.cfg.api.max_body_bytes,
        )
    except StarletteHTTPException as exc:  # how Starlette reports a broken multipart body
        raise HTTPException(400, f"malformed multipart body: {exc.detail}") from None
    try:
        unknown = sorted(set(form.keys()) - set(JOB_FIELDS))
        if unknown:
            raise HTTPException(
                422, f"unknown form field(s) {unknown}; expected 'plan' and optionally 'weights'"
            )
        for name in JOB_FIELDS:
            if len(form.getlist(name)) > 1:
                raise HTTPException(422, f"form field {name!r} given more than once")
        plan_part = form.get("plan")
        if plan_part is None:
            raise HTTPException(422, "missing form field 'plan' (the plan as JSON text)")
        if isinstance(plan_part, UploadFile):
            plan = await plan_part.read(limits.max_plan_bytes + 1)
        else:
            plan = plan_part.encode()
        weights_part = form.get("weights")
        weights: bytes | None = None
        if isinstance(weights_part, UploadFile):
            weights = await weights_part.read()
        elif weights_part is not None:
            raise HTTPException(422, "form field 'weights' must be a file part holding safetensors bytes")
        return plan, weights
    finally:
        await form.close()


@router.get("/v1/health", response_model=HealthOut, tags=["site"])
async def health() -> HealthOut:
    """Liveness: answers without a token."""
    return HealthOut()


@router.get("/v1/info", response_model=InfoOut, responses=_AUTH_ERRORS, tags=["site"])
def info(_: Caller = Depends(require_coordinator), service: SiteService = Depends(get_service)) -> InfoOut:
    """Site id, agent version, device and the datasets (names and counts only)."""
    return InfoOut.model_validate(service.info())


@router.post(
    "/v1/rounds",
    status_code=202,
    response_model=RoundAccepted,
    responses=_JOB_ERRORS,
    openapi_extra=JOB_FORM_OPENAPI,
    tags=["rounds"],
)
async def create_round(request: Request, caller: Caller = Depends(require_coordinator)) -> RoundAccepted:
    """Queue a training round: the plan and the global weights it starts from."""
    service = get_service(request)
    plan, weights = await read_job_form(request, service)
    st = await run_in_threadpool(service.start_round, plan, weights, caller.actor)
    return RoundAccepted.model_validate(st)


@router.get("/v1/rounds/{round_id}", response_model=RoundOut, responses=_STATUS_ERRORS, tags=["rounds"])
async def get_round(
    round_id: str, _: Caller = Depends(require_coordinator), service: SiteService = Depends(get_service)
) -> RoundOut:
    """A round's status, progress, metrics, sample count and update hash."""
    # The hot path of a coordinator's polling: one indexed read (never blocked by the
    # worker's writes: WAL / MVCC), served on the event loop without a thread-pool hop.
    return RoundOut.model_validate(service.get_round(round_id))


@router.get(
    "/v1/rounds/{round_id}/update",
    response_class=Response,
    responses={
        **_STATUS_ERRORS,
        200: {"content": {"application/octet-stream": {}}, "description": "The update as safetensors bytes."},
        409: {"model": ErrorOut, "description": "The round has not completed."},
    },
    tags=["rounds"],
)
def get_update(
    round_id: str,
    caller: Caller = Depends(require_coordinator),
    service: SiteService = Depends(get_service),
    metrics: AgentMetrics = Depends(get_metrics),
) -> Response:
    """The released update (safetensors); its SHA-256 is in the X-Content-SHA256 header."""
    update = service.get_update(round_id, caller.actor)
    metrics.update_bytes_sent.inc(len(update.data))
    return Response(
        content=update.data,
        media_type="application/octet-stream",
        headers={
            "X-Content-SHA256": update.sha256,
            "Content-Disposition": f'attachment; filename="{update.round_id}.safetensors"',
        },
    )


@router.post(
    "/v1/rounds/{round_id}/cancel",
    response_model=RoundOut,
    responses={**_STATUS_ERRORS, 409: {"model": ErrorOut, "description": "The round already finished."}},
    tags=["rounds"],
)
def cancel_round(
    round_id: str, caller: Caller = Depends(require_coordinator), service: SiteService = Depends(get_service)
) -> RoundOut:
    """Cancel a queued or running round; answers once the worker stopped (or after a few seconds)."""
    return RoundOut.model_validate(service.cancel_round(round_id, caller.actor))


@router.post(
    "/v1/evaluations",
    status_code=202,
    response_model=EvaluationAccepted,
    responses=_JOB_ERRORS,
    openapi_extra=JOB_FORM_OPENAPI,
    tags=["evaluations"],
)
async def create_evaluation(
    request: Request, caller: Caller = Depends(require_coordinator)
) -> EvaluationAccepted:
    """Queue an evaluation of the given weights on the local validation split."""
    service = get_service(request)
    plan, weights = await read_job_form(request, service)
    st = await run_in_threadpool(service.start_evaluation, plan, weights, caller.actor)
    return EvaluationAccepted.model_validate(st)


@router.get(
    "/v1/evaluations/{evaluation_id}",
    response_model=EvaluationOut,
    responses=_STATUS_ERRORS,
    tags=["evaluations"],
)
async def get_evaluation(
    evaluation_id: str, _: Caller = Depends(require_coordinator), service: SiteService = Depends(get_service)
) -> EvaluationOut:
    """An evaluation's status and, once completed, its metrics ("dice", ...) and subject count."""
    return EvaluationOut.model_validate(service.get_evaluation(evaluation_id))


@router.post(
    "/v1/evaluations/{evaluation_id}/cancel",
    response_model=EvaluationOut,
    responses={**_STATUS_ERRORS, 409: {"model": ErrorOut, "description": "The evaluation already finished."}},
    tags=["evaluations"],
)
def cancel_evaluation(
    evaluation_id: str,
    caller: Caller = Depends(require_coordinator),
    service: SiteService = Depends(get_service),
) -> EvaluationOut:
    """Cancel a queued or running evaluation."""
    return EvaluationOut.model_validate(service.cancel_evaluation(evaluation_id, caller.actor))


@router.get("/v1/audit", response_model=AuditListOut, responses=_AUTH_ERRORS, tags=["audit"])
def audit_events(
    since_id: int = Query(0, ge=0, description="Return events with a larger id."),
    limit: int = Query(100, ge=1, le=1000),
    action: str | None = Query(None, max_length=100, description="Only this action, e.g. round.completed."),
    _: Caller = Depends(require_admin),
    service: SiteService = Depends(get_service),
) -> AuditListOut:
    """Audit events, oldest first, one page at a time."""
    events = service.audit_events(since_id=since_id, limit=limit, action=action)
    next_id = events[-1]["id"] if events else since_id
    return AuditListOut.model_validate({"events": events, "next_since_id": next_id})


@router.get("/v1/audit/verify", response_model=AuditVerifyOut, responses=_AUTH_ERRORS, tags=["audit"])
def audit_verify(
    _: Caller = Depends(require_admin), service: SiteService = Depends(get_service)
) -> AuditVerifyOut:
    """Check the whole hash chain; names the first bad event."""
    return AuditVerifyOut.model_validate(service.verify_audit())


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        **_AUTH_ERRORS,
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format."},
    },
    tags=["site"],
)
def prometheus_metrics(
    _: Caller = Depends(require_admin), metrics: AgentMetrics = Depends(get_metrics)
) -> Response:
    """Prometheus metrics: jobs by status, job durations, bytes out, auth failures."""
    return Response(content=metrics.render(), media_type=CONTENT_TYPE)
