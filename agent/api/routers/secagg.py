"""`/v1/rounds/{round_id}/secagg/...`: the secure-aggregation steps of one round (coordinator role).

Thin routes: each passes the JSON message to the site service (`agent.jobs.secure_round`),
which checks it against the site's roster and minimums. A refusal is 409 with the reason in
the detail (``secure aggregation refused (<reason>): ...``), a malformed message 422. The
masked update comes back as safetensors bytes (one uint32 tensor) with its SHA-256 in
``X-Content-SHA256``, exactly as the egress gate recorded it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool

from agent.api.deps import CoordinatorCaller, MetricsDep, ServiceDep
from agent.api.schemas import STATUS_ERRORS, ErrorOut
from agent.exchange.secagg.messages import MAX_MESSAGE_BYTES

router = APIRouter(prefix="/rounds/{round_id}/secagg", tags=["secure aggregation"])


async def read_message(request: Request) -> dict[str, Any]:
    """The step's JSON message, read only after the caller's token was checked (a dependency
    declared after the caller, like the job form) and at most MAX_MESSAGE_BYTES long."""
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_MESSAGE_BYTES:
            raise HTTPException(413, f"a secure-aggregation message is at most {MAX_MESSAGE_BYTES} bytes")
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise HTTPException(422, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise HTTPException(422, f"the body must be a JSON object, got {type(data).__name__}")
    return data


# The step's message (agent.exchange.secagg.messages), after the caller in every signature.
Message = Annotated[dict[str, Any], Depends(read_message)]
STEP_ERRORS: dict[int | str, dict[str, Any]] = {
    **STATUS_ERRORS,
    409: {
        "model": ErrorOut,
        "description": "Refused (reason given), or the round is not a completed secure one.",
    },
    422: {"model": ErrorOut, "description": "A malformed message (the field is named)."},
}


@router.post("/advertise", responses=STEP_ERRORS)
async def advertise(
    round_id: str, caller: CoordinatorCaller, message: Message, service: ServiceDep
) -> dict[str, Any]:
    """Step 0: the site's two fresh public keys for the round, signed with its site key."""
    return await run_in_threadpool(service.secagg_advertise, round_id, message, caller.actor)


@router.post("/share", responses=STEP_ERRORS)
async def share(
    round_id: str, caller: CoordinatorCaller, message: Message, service: ServiceDep
) -> dict[str, Any]:
    """Step 1: every site's bundle, checked against the site's roster -> sealed shares for the others."""
    return await run_in_threadpool(service.secagg_share, round_id, message, caller.actor)


@router.post(
    "/mask",
    response_class=Response,
    responses={
        **STEP_ERRORS,
        200: {"content": {"application/octet-stream": {}}, "description": "The masked update (safetensors)."},
    },
)
async def mask(
    round_id: str, caller: CoordinatorCaller, message: Message, service: ServiceDep, metrics: MetricsDep
) -> Response:
    """Step 2: the survivors of the share step -> the masked update, released through the egress gate."""
    update = await run_in_threadpool(service.secagg_mask, round_id, message, caller.actor)
    metrics.update_bytes_sent.inc(len(update.data))
    return Response(
        content=update.data,
        media_type="application/octet-stream",
        headers={
            "X-Content-SHA256": update.sha256,
            "Content-Disposition": f'attachment; filename="{update.round_id}.masked.safetensors"',
        },
    )


@router.post("/unmask", responses=STEP_ERRORS)
async def unmask(
    round_id: str, caller: CoordinatorCaller, message: Message, service: ServiceDep
) -> dict[str, Any]:
    """Step 3, answered once: b-shares of the survivors, s-shares of those who dropped after sharing."""
    return await run_in_threadpool(service.secagg_unmask, round_id, message, caller.actor)
