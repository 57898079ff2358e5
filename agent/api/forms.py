"""The multipart form of a job request (`POST /v1/rounds`, `POST /v1/evaluations`).

The form is read by hand rather than declared as FastAPI `Form`/`File` parameters: the
limits (number of parts, part size, plan size) apply while Starlette parses, and every
mistake is answered with a message naming the field. Its OpenAPI description is
`agent.api.schemas.JOB_FORM_OPENAPI`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.api.deps import ServiceDep

MULTIPART = "multipart/form-data"
JOB_FIELDS = ("plan", "weights")


@dataclass(frozen=True)
class JobForm:
    """The `plan` (JSON text, as sent) and the optional `weights` (safetensors bytes)."""

    plan: bytes
    weights: bytes | None


async def read_job_form(request: Request, service: ServiceDep) -> JobForm:
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
        return JobForm(plan=plan, weights=weights)
    finally:
        await form.close()


# Declared after the caller in a route's signature, so a refused token never gets the body read.
JobFormDep = Annotated[JobForm, Depends(read_job_form)]
