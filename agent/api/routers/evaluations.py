"""`/v1/evaluations`: queue an evaluation of given weights on the local validation split,
poll it, cancel it."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from agent.api.deps import CoordinatorCaller, ServiceDep, StatusWait
from agent.api.forms import JobFormDep
from agent.api.schemas import (
    JOB_ERRORS,
    JOB_FORM_OPENAPI,
    STATUS_ERRORS,
    ErrorOut,
    EvaluationAccepted,
    EvaluationOut,
)
from agent.jobs.ends import status_after_wait

router = APIRouter(prefix="/evaluations", tags=["evaluations"])


@router.post(
    "",
    status_code=202,
    response_model=EvaluationAccepted,
    responses=JOB_ERRORS,
    openapi_extra=JOB_FORM_OPENAPI,
)
async def create_evaluation(
    caller: CoordinatorCaller, form: JobFormDep, service: ServiceDep
) -> EvaluationAccepted:
    """Queue an evaluation of the given weights on the local validation split."""
    job = await run_in_threadpool(service.start_evaluation, form.plan, form.weights, caller.actor)
    return EvaluationAccepted.model_validate(job)


@router.get("/{evaluation_id}", response_model=EvaluationOut, responses=STATUS_ERRORS)
async def get_evaluation(
    evaluation_id: str, _: CoordinatorCaller, service: ServiceDep, wait: StatusWait = 0
) -> EvaluationOut:
    """An evaluation's status and, once completed, its metrics ("dice", ...) and subject count;
    with `wait`, once the evaluation has stopped or that many seconds have passed."""
    job = await status_after_wait(lambda: service.get_evaluation(evaluation_id), service.job_ends, wait)
    return EvaluationOut.model_validate(job)


@router.post(
    "/{evaluation_id}/cancel",
    response_model=EvaluationOut,
    responses={**STATUS_ERRORS, 409: {"model": ErrorOut, "description": "The evaluation already finished."}},
)
def cancel_evaluation(evaluation_id: str, caller: CoordinatorCaller, service: ServiceDep) -> EvaluationOut:
    """Cancel a queued or running evaluation."""
    return EvaluationOut.model_validate(service.cancel_evaluation(evaluation_id, caller.actor))
