"""Request and response bodies of the v1 API, in one place (they are the OpenAPI schema).

Every answer carries counts, metrics, hashes and ids only: never pixel data, file paths or
DICOM header values.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from agent.service import JobStatus

Status = Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"]


class ErrorOut(BaseModel):
    detail: Any = Field(description="What was wrong, naming the offending input.")


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class DatasetOut(BaseModel):
    name: str
    format: str
    num_train: int
    num_val: int
    modalities: list[str]


class InfoOut(BaseModel):
    site_id: str
    agent_version: str
    device: str
    approval_policy: str
    datasets: list[DatasetOut]


class RoundAccepted(BaseModel):
    round_id: str
    status: Status


class RoundOut(BaseModel):
    round_id: str
    status: Status
    progress: dict[str, Any] = Field(
        description='Latest training progress: "epoch", "epochs", "step", "loss"...'
    )
    metrics: dict[str, Any] = Field(description="Local metrics once the round completed.")
    num_samples: int | None = Field(description="Training subjects (the FedAvg weight).")
    update_sha256: str | None = Field(description="SHA-256 of the released update (GET .../update).")
    error: str | None = None

    @classmethod
    def of(cls, st: JobStatus) -> RoundOut:
        return cls(
            round_id=st.round_id,
            status=st.status,  # type: ignore[arg-type]
            progress=st.progress,
            metrics=st.metrics,
            num_samples=st.num_samples,
            update_sha256=st.update_sha256,
            error=st.error,
        )


class EvaluationAccepted(BaseModel):
    evaluation_id: str
    status: Status


class EvaluationOut(BaseModel):
    evaluation_id: str
    status: Status
    progress: dict[str, Any]
    metrics: dict[str, Any] = Field(description='"dice" (mean over subjects), quantiles, ...')
    num_samples: int | None = Field(description="Validation subjects evaluated.")
    error: str | None = None

    @classmethod
    def of(cls, st: JobStatus) -> EvaluationOut:
        return cls(
            evaluation_id=st.round_id,
            status=st.status,  # type: ignore[arg-type]
            progress=st.progress,
            metrics=st.metrics,
            num_samples=st.num_samples,
            error=st.error,
        )


class AuditEventOut(BaseModel):
    id: int
    ts: str
    actor: str
    action: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


class AuditListOut(BaseModel):
    events: list[AuditEventOut]
    next_since_id: int = Field(description="Pass as since_id to read the following page.")


class AuditVerifyOut(BaseModel):
    ok: bool
    count: int
    first_bad_id: int | None
    reason: str


JOB_FORM_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["plan"],
                    "properties": {
                        "plan": {"type": "string", "description": "The plan as JSON text."},
                        "weights": {
                            "type": "string",
                            "format": "binary",
                            "description": "Global weights as a safetensors file "
                            "(may be omitted for a round whose plan.init is 'random').",
                        },
                    },
                }
            }
        },
    }
}
