"""`/v1/rounds`: queue a training round, poll it, fetch its released update, cancel it."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from agent.api.deps import CoordinatorCaller, MetricsDep, ServiceDep, StatusWait
from agent.api.forms import JobFormDep
from agent.api.schemas import (
    JOB_ERRORS,
    JOB_FORM_OPENAPI,
    STATUS_ERRORS,
    AuditAnchorOut,
    ErrorOut,
    RoundAccepted,
    RoundOut,
)
from agent.jobs.ends import status_after_wait

router = APIRouter(prefix="/rounds", tags=["rounds"])


@router.post(
    "",
    status_code=202,
    response_model=RoundAccepted,
    responses=JOB_ERRORS,
    openapi_extra=JOB_FORM_OPENAPI,
)
async def create_round(caller: CoordinatorCaller, form: JobFormDep, service: ServiceDep) -> RoundAccepted:
    """Queue a training round: the plan and the global weights it starts from."""
    job = await run_in_threadpool(service.start_round, form.plan, form.weights, caller.actor)
    return RoundAccepted.model_validate(job)


@router.get("/{round_id}", response_model=RoundOut, responses=STATUS_ERRORS)
async def get_round(
    round_id: str, _: CoordinatorCaller, service: ServiceDep, wait: StatusWait = 0
) -> RoundOut:
    """A round's status, progress, metrics, sample count and update hash; with `wait`, once the
    round has stopped or that many seconds have passed."""
    # The hot path of a coordinator's polling: one indexed read (never blocked by the
    # worker's writes: WAL / MVCC), served on the event loop without a thread-pool hop.
    # A completed round adds the signed audit head: one more read and a signature (~0.1 ms).
    job = await status_after_wait(lambda: service.get_round(round_id), service.job_ends, wait)
    out = RoundOut.model_validate(job)
    anchor = service.round_anchor(job)
    if anchor is not None:
        out.audit_anchor = AuditAnchorOut.model_validate(anchor)
    return out


@router.get(
    "/{round_id}/update",
    response_class=Response,
    responses={
        **STATUS_ERRORS,
        200: {"content": {"application/octet-stream": {}}, "description": "The update as safetensors bytes."},
        409: {"model": ErrorOut, "description": "The round has not completed."},
    },
)
def get_update(
    round_id: str, caller: CoordinatorCaller, service: ServiceDep, metrics: MetricsDep
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
    "/{round_id}/cancel",
    response_model=RoundOut,
    responses={**STATUS_ERRORS, 409: {"model": ErrorOut, "description": "The round already finished."}},
)
def cancel_round(round_id: str, caller: CoordinatorCaller, service: ServiceDep) -> RoundOut:
    """Cancel a queued or running round; answers once the worker stopped (or after a few seconds)."""
    return RoundOut.model_validate(service.cancel_round(round_id, caller.actor))
