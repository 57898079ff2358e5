"""`GET /metrics`: Prometheus text for admin tokens (a separate port may serve it without auth,
see `agent.api.app`)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from agent.api.deps import AdminCaller, MetricsDep
from agent.api.metrics import CONTENT_TYPE
from agent.api.schemas import AUTH_ERRORS

router = APIRouter(prefix="/metrics", tags=["site"])


@router.get(
    "",
    response_class=Response,
    responses={
        **AUTH_ERRORS,
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format."},
    },
)
def prometheus_metrics(_: AdminCaller, metrics: MetricsDep) -> Response:
    """Prometheus metrics: jobs by status, job durations, bytes out, auth failures."""
    return Response(content=metrics.render(), media_type=CONTENT_TYPE)
