"""The ClientApp a site's SuperNode runs: Flower messages in, jobs at the site's own agent.

The SuperNode's node config (`flower-supernode ... --node-config`) names the agent and a token
for it, and nothing else:

    agent-url='http://127.0.0.1:8443' token-file='/run/token' site='site-1'

`train` and `evaluate` hand the message's plan and arrays to the agent (`fedsite_flower.bridge`)
and answer with what the agent released: the update's arrays, `num-examples` and the metrics,
plus a `fedsite` config record (site, job id, the update's SHA-256 as the agent's audit log
recorded it, bytes exchanged with the agent). Whatever the agent refuses (a plan the site has
not approved, an unknown dataset, a failed job) is answered as a Flower error message carrying
the agent's reason, prefixed by the site's name: the run goes on without this site.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app import Error as FlowerError
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedsite_flower import bridge
from fedsite_flower.agent_api import AgentAPI, AgentApiError, PlanRefused
from fedsite_flower.arrays import ArrayCodecError

app = ClientApp()


def _site(context: Context) -> str:
    return str(context.node_config.get("site") or f"node {context.node_id}")


def _weights(msg: Message) -> dict[str, Any]:
    record = msg.content.array_records.get("arrays")
    if record is None:
        raise AgentApiError("the message carries no 'arrays' record (the global model)")
    return {name: array.numpy() for name, array in record.items()}


def _config(msg: Message) -> ConfigRecord:
    record = msg.content.config_records.get("config")
    if record is None:
        raise AgentApiError("the message carries no 'config' record (the plan and the server round)")
    return record


def _server_round(config: ConfigRecord) -> int:
    """The strategy's `server-round` (FedAvg puts it in every message's config)."""
    value = config.get("server-round")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AgentApiError(f"the message's config has no valid 'server-round' (got {value!r})")
    return value


def _job_timeout(context: Context) -> float:
    return float(context.node_config.get("job-timeout-s", bridge.DEFAULT_JOB_TIMEOUT_S))


def _failure(msg: Message, context: Context, exc: Exception) -> Message:
    """The agent's refusal as a Flower error reply; the site's plan hash stays in the text."""
    reason = f"site {_site(context)}: {exc}"
    if isinstance(exc, PlanRefused) and exc.plan_hash not in reason:
        reason += f" (plan {exc.plan_hash})"
    return Message(FlowerError(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _handle(
    msg: Message, context: Context, job: Callable[[AgentAPI, Message, Context], RecordDict]
) -> Message:
    try:
        with AgentAPI.from_node_config(context.node_config) as api:
            return Message(job(api, msg, context), reply_to=msg)
    except (AgentApiError, ArrayCodecError) as exc:
        return _failure(msg, context, exc)


def _train_job(api: AgentAPI, msg: Message, context: Context) -> RecordDict:
    config = _config(msg)
    plan = bridge.plan_from_config(config)
    round_id = bridge.job_id_for("train", context.run_id, _server_round(config), context.node_id)
    run = bridge.run_name(context.run_id)
    out = bridge.train(api, plan, _weights(msg), round_id, run_id=run, timeout=_job_timeout(context))
    return RecordDict(
        {
            "arrays": ArrayRecord({name: Array(value) for name, value in out.arrays.items()}),
            "metrics": MetricRecord({**out.metrics, "num-examples": out.num_examples}),
            "fedsite": ConfigRecord(
                {
                    "site": _site(context),
                    "job-id": out.round_id,
                    "update-sha256": out.update_sha256,
                    "bytes-to-agent": out.bytes_to_agent,
                    "bytes-from-agent": out.bytes_from_agent,
                    "seconds": out.seconds,
                    # The site's signed audit head after this round, as JSON ("" when none).
                    "audit-anchor": json.dumps(out.audit_anchor) if out.audit_anchor else "",
                }
            ),
        }
    )


def _evaluate_job(api: AgentAPI, msg: Message, context: Context) -> RecordDict:
    config = _config(msg)
    plan = bridge.plan_from_config(config)
    eval_id = bridge.job_id_for("eval", context.run_id, _server_round(config), context.node_id)
    run = bridge.run_name(context.run_id)
    out = bridge.evaluate(api, plan, _weights(msg), eval_id, run_id=run, timeout=_job_timeout(context))
    return RecordDict(
        {
            "metrics": MetricRecord({"dice": out.dice, "num-examples": out.num_examples}),
            "fedsite": ConfigRecord(
                {
                    "site": _site(context),
                    "job-id": out.evaluation_id,
                    "bytes-to-agent": out.bytes_to_agent,
                    "bytes-from-agent": out.bytes_from_agent,
                    "seconds": out.seconds,
                }
            ),
        }
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One fedsite round at this site's agent, from the message's global model."""
    return _handle(msg, context, _train_job)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """One fedsite evaluation of the message's model on this site's validation split."""
    return _handle(msg, context, _evaluate_job)
