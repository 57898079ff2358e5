"""Request and response bodies of the v1 API and its documented error answers, in one place
(they are the OpenAPI schema).

Every answer carries counts, metrics, hashes and ids only: never pixel data, file paths or
DICOM header values.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, GetPydanticSchema
from pydantic_core import core_schema

from agent.jobs.states import JobStatus
from agent.training.plan import Plan

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
    num_excluded: int = Field(
        description="Subjects kept out of training and evaluation by the site's exclude_warnings "
        "(volume warnings such as untrusted geometry); a count only, never which ones."
    )
    modalities: list[str]
    problems: list[str] = Field(
        default_factory=list,
        description="Why the dataset gives training less than it holds, in words without paths or "
        "subjects: e.g. '3 subject(s) unreadable by uid 10001', 'no subjects found', 'all 4 subject(s) "
        "excluded by volume warnings', 'dataset folder unreadable by uid 10001'. Empty when all is well.",
    )
    dp_required: bool = Field(
        default=False, description="Whether the site accepts only differentially private rounds (privacy.dp)."
    )
    epsilon_remaining: float | None = Field(
        default=None,
        description="The ε left in the dataset's privacy budget at the site (rounds in progress counted "
        "at their planned steps); null when the site sets no budget for it. A number, never the history.",
    )


class InfoOut(BaseModel):
    site_id: str
    agent_version: str
    device: str
    approval_policy: str
    audit_public_key: str = Field(
        description="The site's Ed25519 key that signs audit anchors: the hex of its 32 raw bytes."
    )
    datasets: list[DatasetOut]


class RoundAccepted(BaseModel):
    model_config = _JOB_SNAPSHOT

    round_id: str
    status: Status


class AuditAnchorOut(BaseModel):
    site_id: str
    round_id: str
    event_id: int = Field(description="The audit head's event id when the status was read.")
    hash: str = Field(description="That event's hash.")
    algorithm: Literal["ed25519"]
    key_fingerprint: str = Field(description="SHA-256 of the signing key's raw public bytes.")
    signature: str = Field(
        description='Ed25519 signature (hex) of the canonical JSON of ["fedsite.audit_anchor.v1", '
        "site_id, round_id, event_id, hash], by the key in /v1/info's audit_public_key."
    )


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
    audit_anchor: AuditAnchorOut | None = Field(
        default=None,
        description="Once completed: the site's audit head, signed; keep it to check the site's "
        "audit log later (fedsite audit verify --anchors).",
    )


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


# Built from the audit chain's `ChainReport` by its attributes. (The models here carry no
# docstrings: pydantic would publish them as schema descriptions in the OpenAPI document.)
class AuditVerifyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    ok: bool
    count: int
    first_bad_id: int | None
    reason: str


# Where the plan's JSON schema is published: as components of the OpenAPI document, under the
# names of the plan's pydantic models (`Plan`, `ModelSpec`, ...), so that a client generator
# names them as the agent does.
COMPONENTS_REF = "#/components/schemas/{model}"


def plan_schema_components() -> dict[str, dict[str, Any]]:
    """The JSON schema of the job form's `plan` part (`agent.training.plan.Plan`) and of each
    model it refers to, by component name; every reference points into the components.

    The schema is the plan model's own, so it cannot drift from what the server validates:
    the same keys, types, bounds, and no keys besides (the plan refuses unknown keys). What
    pydantic cannot express (the model arguments the registry checks, the consistency of
    model and data dimensions) is still refused by the server with a 422 naming the key.
    """
    schema = Plan.model_json_schema(ref_template=COMPONENTS_REF)
    defs: dict[str, dict[str, Any]] = schema.pop("$defs", {})
    return {"Plan": schema, **defs}


# The multipart form of a job request (read by `agent.api.forms`, which refuses other fields,
# repeated fields and a missing plan): the plan as a JSON part, the weights as a file part.
# The form is declared closed (`additionalProperties: false`) and the plan part by its schema,
# rather than as "any string", so that a schema-driven client or fuzzer sends what the server
# takes. The server also takes the plan as a file part or a text part without a content type.
JOB_FORM_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["plan"],
                    "additionalProperties": False,
                    "properties": {
                        "plan": {
                            "$ref": COMPONENTS_REF.format(model="Plan"),
                            "description": "The plan as JSON (at most limits.max_plan_bytes).",
                        },
                        "weights": {
                            "type": "string",
                            "contentMediaType": "application/octet-stream",
                            "description": "Global weights as a safetensors file "
                            "(may be omitted for a round whose plan.init is 'random').",
                        },
                    },
                },
                "encoding": {
                    "plan": {"contentType": "application/json"},
                    "weights": {"contentType": "application/octet-stream"},
                },
            }
        },
    }
}


# Documented error answers, per kind of endpoint (the `responses` of each route).
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "No token, or an invalid or revoked one."},
    403: {"model": ErrorOut, "description": "The token's role may not call this endpoint."},
}
JOB_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS,
    400: {"model": ErrorOut, "description": "Malformed multipart body."},
    403: {
        "model": ErrorOut,
        "description": "Wrong role, or the plan is not approved at this site (hash given).",
    },
    409: {"model": ErrorOut, "description": "round_id already used with a different plan or weights."},
    413: {"model": ErrorOut, "description": "Body, plan or weights larger than the configured limits."},
    415: {"model": ErrorOut, "description": "Not a multipart/form-data body."},
    422: {
        "model": ErrorOut,
        "description": "Invalid plan (key named), unknown dataset, or weights that fail checks.",
    },
    429: {"model": ErrorOut, "description": "The job queue is full; retry later."},
}
STATUS_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS,
    404: {"model": ErrorOut, "description": "No such id."},
}
