"""`/v1/audit`: the audit events, a page at a time, and the verification of their hash chain
(admin tokens only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from agent.api.deps import AdminCaller, ServiceDep
from agent.api.schemas import AUTH_ERRORS, AuditListOut, AuditVerifyOut

router = APIRouter(prefix="/audit", tags=["audit"])

# The largest id a database integer column holds (signed 64 bits, SQLite and PostgreSQL
# alike). A larger since_id would overflow the driver's parameter binding (a 500); bounded
# here, it is a 422 naming the parameter, and the bound is published in the OpenAPI schema.
MAX_EVENT_ID = 2**63 - 1


@router.get("", response_model=AuditListOut, responses=AUTH_ERRORS)
def audit_events(
    _: AdminCaller,
    service: ServiceDep,
    since_id: Annotated[int, Query(ge=0, le=MAX_EVENT_ID, description="Return events with a larger id.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    action: Annotated[
        str | None, Query(max_length=100, description="Only this action, e.g. round.completed.")
    ] = None,
) -> AuditListOut:
    """Audit events, oldest first, one page at a time."""
    events = service.audit_events(since_id=since_id, limit=limit, action=action)
    next_id = events[-1]["id"] if events else since_id
    return AuditListOut.model_validate({"events": events, "next_since_id": next_id})


@router.get("/verify", response_model=AuditVerifyOut, responses=AUTH_ERRORS)
def audit_verify(_: AdminCaller, service: ServiceDep) -> AuditVerifyOut:
    """Check the whole hash chain; names the first bad event."""
    return AuditVerifyOut.model_validate(service.verify_audit())
