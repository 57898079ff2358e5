"""Request and response bodies of the v1 API, in one place (they are the OpenAPI schema).

Every answer carries counts, metrics, hashes and ids only: never pixel data, file paths or
DICOM header values.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, GetPydanticSchema
from pydantic_core import core_schema

from agent.jobs.states import JobStatus

# A job's status: one of the values of `JobStatus`, published in the OpenAPI schema as an
# inline enum, as the v1 contract always has. (Annotated with the enum type itself, FastAPI
# would add the enum as a schema component of its own.)
Status = Annotated[
    str,
    GetPydanticSchema(lambda _type, _handler: core_schema.literal_schema([s.value for s in JobStatus])),
]
# The job models below are built from the job snapshot (`agent.jobs.store.JobView`) by its
# attributes, each showing only the fields it declares. An evaluation's id is its job's
# `round_id`, shown under its own name.
_JOB_SNAPSHOT = ConfigDict(from_attributes=True)
_EVALUATION_ID = AliasChoices("evaluation_id", "round_id")


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
    model_config = _JOB_SNAPSHOT

    round_id: str
    status: Status


class RoundOut(BaseModel):
    model_config = _JOB_SNAPSHOT

    round_id: str
    status: Status
    progress: dict[str, Any] = Field(
        description='Latest training progress: "epoch", "epochs", "step", "loss"...'
    )
    metrics: dict[str, Any] = Field(description="Local metrics once the round completed.")
    num_samples: int | None = Field(description="Training subjects (the FedAvg weight).")
    update_sha256: str | None = Field(description="SHA-256 of the released update (GET .../update).")
    error: str | None = None


class EvaluationAccepted(BaseModel):
    model_config = _JOB_SNAPSHOT

    evaluation_id: str = Field(validation_alias=_EVALUATION_ID)
    status: Status


class EvaluationOut(BaseModel):
    model_config = _JOB_SNAPSHOT

    evaluation_id: str = Field(validation_alias=_EVALUATION_ID)
    status: Status
    progress: dict[str, Any]
    metrics: dict[str, Any] = Field(description='"dice" (mean over subjects), quantiles, ...')
    num_samples: int | None = Field(description="Validation subjects evaluated.")
    error: str | None = None


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
