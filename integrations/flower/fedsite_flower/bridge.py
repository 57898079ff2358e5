"""One Flower job at the site's agent, without Flower: what the ClientApp's handlers do.

A train message becomes a fedsite round, an evaluate message a fedsite evaluation: the plan
comes from the message's config (the ServerApp puts the run's plan there as JSON text), the
weights are the message's arrays in the agent's own safetensors encoding, and the job id is
derived from the Flower run, the server round and the node, so that a message Flower delivers
again finds the job already started (the agent's round ids are idempotent) instead of training
twice. Nothing here reads the site's data or imports training code: the agent does the work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedsite_flower import arrays as codec
from fedsite_flower.agent_api import AgentAPI, AgentApiError, JobEnded

DEFAULT_JOB_TIMEOUT_S = 3600.0


def run_name(run_id: int) -> str:
    """The plan's `run_id` for a Flower run: what the agent scopes kept optimizer state by."""
    return f"flwr-{int(run_id)}"


def job_id_for(kind: str, run_id: int, server_round: int, node_id: int) -> str:
    """The agent job id of one Flower message: the same message always maps to the same job."""
    if kind not in ("train", "eval"):
        raise ValueError(f"kind must be 'train' or 'eval', got {kind!r}")
    return f"{run_name(run_id)}-r{int(server_round):03d}-n{int(node_id)}-{kind}"


def plan_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The fedsite plan in a message's config (`plan`, JSON text); any `round_id` and `run_id` in
    it are dropped (the bridge names the job and the run)."""
    text = config.get("plan")
    if not isinstance(text, str) or not text.strip():
        raise AgentApiError("the message's config has no 'plan' (the fedsite plan as JSON text)")
    try:
        plan = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AgentApiError(f"the message's 'plan' is not valid JSON: {exc}") from None
    if not isinstance(plan, dict):
        raise AgentApiError("the message's 'plan' is not a JSON object")
    plan.pop("round_id", None)
    plan.pop("run_id", None)
    return plan


def _job_plan(plan: Mapping[str, Any], job_id: str, run_id: str | None) -> dict[str, Any]:
    """PLAN as the agent's job JOB_ID: with `run_id` only where the plan keeps optimizer state
    between rounds, as the fedsite coordinator sends it (`agent.training.plan.job_plan`, which
    this side, without the agent's package, cannot import)."""
    job = {**plan, "round_id": job_id}
    job.pop("run_id", None)
    optimizer = plan.get("optimizer")
    if run_id is not None and isinstance(optimizer, Mapping) and optimizer.get("keep_state"):
        job["run_id"] = run_id
    return job


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The agent's scalar numeric metrics (Flower metric records hold numbers only)."""
    return {
        str(k): float(v)
        for k, v in sorted(metrics.items())
        if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
    }


@dataclass
class TrainOutcome:
    round_id: str
    update: bytes
    update_sha256: str
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    bytes_to_agent: int
    bytes_from_agent: int
    seconds: float
    audit_anchor: dict[str, Any] | None = None


@dataclass
class EvaluateOutcome:
    evaluation_id: str
    dice: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_to_agent: int = 0
    bytes_from_agent: int = 0
    seconds: float = 0.0


def train(
    api: AgentAPI,
    plan: Mapping[str, Any],
    weights: Mapping[str, np.ndarray],
    round_id: str,
    *,
    run_id: str | None = None,
    timeout: float = DEFAULT_JOB_TIMEOUT_S,
) -> TrainOutcome:
    """Train at the agent from WEIGHTS (a round of the run RUN_ID); the released update,
    hash-checked, with its sample count."""
    t0 = time.monotonic()
    sent0, recv0 = api.transfer.sent, api.transfer.received
    job = api.start_round(_job_plan(plan, round_id, run_id), codec.encode(weights))
    try:
        status = api.wait("round", job, timeout=timeout)
    except JobEnded:
        _cancel_quietly(api, "round", job)
        raise
    if status.num_samples is None or status.num_samples <= 0:
        raise AgentApiError(f"round {job} completed without a positive num_samples ({status.num_samples})")
    data = api.download_update(job, status.update_sha256)
    return TrainOutcome(
        round_id=job,
        update=data,
        update_sha256=codec.sha256(data),
        arrays=codec.decode(data),
        num_examples=status.num_samples,
        metrics=numeric_metrics(status.metrics),
        bytes_to_agent=api.transfer.sent - sent0,
        bytes_from_agent=api.transfer.received - recv0,
        seconds=round(time.monotonic() - t0, 3),
        audit_anchor=status.audit_anchor,
    )


def evaluate(
    api: AgentAPI,
    plan: Mapping[str, Any],
    weights: Mapping[str, np.ndarray],
    evaluation_id: str,
    *,
    run_id: str | None = None,
    timeout: float = DEFAULT_JOB_TIMEOUT_S,
) -> EvaluateOutcome:
    """Evaluate WEIGHTS on the site's validation split; its Dice and subject count."""
    t0 = time.monotonic()
    sent0, recv0 = api.transfer.sent, api.transfer.received
    body = {k: v for k, v in plan.items() if k != "early_stopping"}
    job = api.start_evaluation(_job_plan(body, evaluation_id, run_id), codec.encode(weights))
    try:
        status = api.wait("evaluation", job, timeout=timeout)
    except JobEnded:
        _cancel_quietly(api, "evaluation", job)
        raise
    dice = status.metrics.get("dice")
    if not isinstance(dice, int | float):
        raise AgentApiError(f"evaluation {job} completed without a 'dice' metric")
    return EvaluateOutcome(
        evaluation_id=job,
        dice=float(dice),
        num_examples=int(status.num_samples or 0),
        metrics=numeric_metrics(status.metrics),
        bytes_to_agent=api.transfer.sent - sent0,
        bytes_from_agent=api.transfer.received - recv0,
        seconds=round(time.monotonic() - t0, 3),
    )


def _cancel_quietly(api: AgentAPI, kind: str, job: str) -> None:
    try:
        api.cancel(kind, job)
    except AgentApiError:
        return
