"""`GET /v1/health`: liveness, the one endpoint without a token."""

from __future__ import annotations

from fastapi import APIRouter

from agent.api.schemas import HealthOut

router = APIRouter(prefix="/health", tags=["site"])


@router.get("", response_model=HealthOut)
async def health() -> HealthOut:
    """Liveness: answers without a token."""
    return HealthOut()
