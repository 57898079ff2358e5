"""`GET /v1/info`: what a coordinator may know about the site before it sends a plan."""

from __future__ import annotations

from fastapi import APIRouter

from agent.api.deps import CoordinatorCaller, ServiceDep
from agent.api.schemas import AUTH_ERRORS, InfoOut

router = APIRouter(prefix="/info", tags=["site"])


@router.get("", response_model=InfoOut, responses=AUTH_ERRORS)
def info(_: CoordinatorCaller, service: ServiceDep) -> InfoOut:
    """Site id, agent version, device and the datasets (names and counts only)."""
    return InfoOut.model_validate(service.info())
