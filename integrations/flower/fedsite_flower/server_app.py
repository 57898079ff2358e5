"""The ServerApp: Flower's FedAvg over fedsite sites, averaged and recorded like `fedsite coordinate`.

Run config (`flwr run ... --run-config "..."`; defaults in this app's pyproject.toml):

- `plan-file`: the fedsite plan (JSON). It is sent, as JSON text, in every train and evaluate
  message; each site's agent decides whether it may run (its approval policy). FedProx is the
  plan's `fedprox_mu`: the proximal term is applied by the agents, the server still averages.
- `initial-weights`: the model the run starts from, as safetensors (written in the agent's
  environment from the plan's registry entry: `python -m fedsite_flower.initial_weights` there).
- `out-dir`: where results.json, the models, the Dice plot and `received_updates.jsonl` go.
- `num-server-rounds`, `min-nodes` (nodes to wait for and to sample), `round-timeout-s`.

Every round trains at every connected site, evaluates the new global model at every site and
records the round; a site whose agent refused (plan not approved, ...) is listed under
`left_out` with the agent's reason, which names the plan hash. The round's mean is the
coordinator's (`fedsite_flower.aggregate`): whatever order the sites answer in, the run releases
the model `fedsite coordinate` releases from the same sites, plan and seed.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedsite_flower import aggregate
from fedsite_flower import arrays as codec
from fedsite_flower.results import RunRecorder, weighted_dice

app = ServerApp()
_SITE_IN_REASON = re.compile(r"site (\S+?):")


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def _site_of(msg: Message) -> str:
    if msg.has_error():
        found = _SITE_IN_REASON.search(msg.error.reason or "")
        return found.group(1) if found else f"node {msg.metadata.src_node_id}"
    fed = msg.content.config_records.get("fedsite")
    return str(fed["site"]) if fed is not None and "site" in fed else f"node {msg.metadata.src_node_id}"


def _number(value: object, what: str) -> float:
    """A metric that must be one number (Flower's metric values may also be lists)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"metric {what!r} is {value!r}, not a number")
    return float(value)


def _fed(msg: Message, key: str, default: Any = 0) -> Any:
    fed = msg.content.config_records.get("fedsite")
    return fed[key] if fed is not None and key in fed else default


class FedsiteFedAvg(FedAvg):
    """Flower's FedAvg, averaging and recording each round as the reference coordinator does."""

    def __init__(self, recorder: RunRecorder, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recorder = recorder
        self._t0 = 0.0
        self._round: dict[str, Any] = {}
        self.global_arrays: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._t0 = time.monotonic()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._round = {
            "flower_bytes_to_nodes": arrays.count_bytes() * len(messages),
            "flower_bytes_from_nodes": 0,
        }
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        training: dict[str, Any] = {}
        left_out: list[dict[str, str]] = []
        for msg in replies:
            site = _site_of(msg)
            if msg.has_error():
                left_out.append({"site": site, "reason": str(msg.error.reason)})
                continue
            received = msg.content.array_records["arrays"]
            self._round["flower_bytes_from_nodes"] += received.count_bytes()
            digest = codec.arrays_sha256(_numpy(received))
            self.recorder.log_update(
                {
                    "round": server_round,
                    "site": site,
                    "node_id": msg.metadata.src_node_id,
                    "sha256": digest,
                    "agent_sha256": _fed(msg, "update-sha256", None),
                    "job_id": _fed(msg, "job-id", None),
                }
            )
            anchor = str(_fed(msg, "audit-anchor", ""))
            if anchor:
                # As the coordinator keeps them: per site, for `fedsite audit verify --anchors`.
                self.recorder.add_anchor(site, json.loads(anchor))
            site_metrics = dict(msg.content.metric_records["metrics"])
            training[site] = {
                "round_id": _fed(msg, "job-id", None),
                "num_samples": int(_number(site_metrics.pop("num-examples"), "num-examples")),
                "metrics": site_metrics,
                "update_sha256": digest,
                "bytes_sent": int(_fed(msg, "bytes-to-agent")),
                "bytes_received": int(_fed(msg, "bytes-from-agent")),
                "duration_s": float(_fed(msg, "seconds", 0.0)),
            }
        arrays, metrics = self._fedavg(replies)
        if arrays is None:
            reasons = "; ".join(f"{x['site']}: {x['reason']}" for x in left_out) or "no site answered"
            self.recorder.add_round(
                {
                    "index": server_round,
                    "label": f"round {server_round}",
                    "participants": [],
                    "left_out": left_out,
                    "failed": True,
                    "duration_s": round(time.monotonic() - self._t0, 3),
                }
            )
            raise RuntimeError(f"round {server_round} failed: no update arrived ({reasons})")
        self.global_arrays = arrays
        self._round.update(training=training, left_out=left_out)
        return arrays, metrics

    def _fedavg(self, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAvg step with the coordinator's mean (`fedsite_flower.aggregate`): the
        same checks of the replies and the same metrics, the arrays averaged in float64 over the
        sites in name order instead of in float32 in the order they answered."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        valid = sorted(valid, key=_site_of)
        mean = aggregate.weighted_mean(
            [
                aggregate.SiteArrays(
                    site=_site_of(msg),
                    arrays=_numpy(msg.content.array_records[self.arrayrecord_key]),
                    num_samples=int(
                        _number(
                            msg.content.metric_records["metrics"][self.weighted_by_key], self.weighted_by_key
                        )
                    ),
                )
                for msg in valid
            ]
        )
        contents = [msg.content for msg in valid]
        return _record(mean), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        evaluation: dict[str, dict[str, Any]] = {}
        for msg in replies:
            site = _site_of(msg)
            if msg.has_error():
                evaluation[site] = {"error": str(msg.error.reason)}
                continue
            site_metrics = dict(msg.content.metric_records["metrics"])
            evaluation[site] = {
                "evaluation_id": _fed(msg, "job-id", None),
                "dice": _number(site_metrics["dice"], "dice"),
                "num_samples": int(_number(site_metrics["num-examples"], "num-examples")),
                "bytes_sent": int(_fed(msg, "bytes-to-agent")),
                "bytes_received": int(_fed(msg, "bytes-from-agent")),
                "duration_s": float(_fed(msg, "seconds", 0.0)),
            }
        metrics = super().aggregate_evaluate(server_round, replies)
        self._finish_round(server_round, evaluation, len(replies))
        return metrics

    def _finish_round(self, index: int, evaluation: dict[str, dict[str, Any]], evaluated: int) -> None:
        assert self.global_arrays is not None
        data = codec.encode(_numpy(self.global_arrays))
        rel, sha = self.recorder.save_model(index, data)
        training = self._round.get("training", {})
        record = {
            "index": index,
            "label": f"round {index}",
            "participants": sorted(training),
            "left_out": self._round.get("left_out", []),
            "training": training,
            "evaluation": evaluation,
            "weighted_dice": weighted_dice(evaluation),
            "bytes_sent": sum(t["bytes_sent"] for t in training.values())
            + sum(int(e.get("bytes_sent", 0)) for e in evaluation.values()),
            "bytes_received": sum(t["bytes_received"] for t in training.values())
            + sum(int(e.get("bytes_received", 0)) for e in evaluation.values()),
            # The arrays Flower itself carried between the SuperLink and the SuperNodes this round.
            "flower_bytes_to_nodes": self._round["flower_bytes_to_nodes"]
            + self.global_arrays.count_bytes() * evaluated,
            "flower_bytes_from_nodes": self._round["flower_bytes_from_nodes"],
            "duration_s": round(time.monotonic() - self._t0, 3),
            "model": rel,
            "model_sha256": sha,
        }
        self.recorder.add_round(record)


def _read_plan(path: Path) -> dict[str, Any]:
    try:
        plan = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"run config plan-file {path}: cannot read the plan: {exc}") from None
    if not isinstance(plan, dict):
        raise ValueError(f"run config plan-file {path}: the plan is not a JSON object")
    if plan.get("send", "weights") != "weights":
        raise ValueError(
            f"run config plan-file {path}: send={plan.get('send')!r}; FedAvg under Flower averages "
            "weights, so the plan must send 'weights'"
        )
    plan.pop("round_id", None)
    return plan


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg over the connected sites and record it under the run config's out-dir."""
    rc = context.run_config
    plan = _read_plan(Path(str(rc["plan-file"])))
    init_path = Path(str(rc["initial-weights"]))
    initial = codec.decode(init_path.read_bytes())
    rounds = int(rc["num-server-rounds"])
    min_nodes = int(rc["min-nodes"])
    mu = float(plan.get("fedprox_mu") or 0.0)
    recorder = RunRecorder(
        Path(str(rc["out-dir"])),
        {
            "run_id": f"flwr-{context.run_id}",
            "engine": "flower",
            "strategy": "fedprox" if mu > 0 else "fedavg",
            "round_label": "round",
            "sites": [s for s in str(rc.get("sites", "")).split(",") if s],
            "outside_sites": [],
            "pull_sites": [],
            "min_sites": min_nodes,
            "update_kind": "weights",
            "plan": plan,
            "options": {"rounds": rounds, "fedprox_mu": mu},
        },
    )
    rel, sha = recorder.save_model(0, codec.encode(initial), "initial.safetensors")
    recorder.doc["initial_model"] = {"path": rel, "sha256": sha}
    strategy = FedsiteFedAvg(
        recorder,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )
    plan_text = json.dumps(plan)
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=_record(initial),
            num_rounds=rounds,
            timeout=float(rc.get("round-timeout-s", 3600)),
            train_config=ConfigRecord({"plan": plan_text}),
            evaluate_config=ConfigRecord({"plan": plan_text}),
        )
    except Exception as exc:
        recorder.finish("failed", error=str(exc))
        raise
    data = codec.encode(_numpy(result.arrays))
    rel, sha = recorder.save_model(0, data, "final.safetensors")
    final: dict[str, Any] = {"model": rel, "model_sha256": sha}
    if recorder.doc["rounds"]:
        last = recorder.doc["rounds"][-1]
        final["weighted_dice"] = last.get("weighted_dice")
        final["evaluation"] = last.get("evaluation", {})
    recorder.finish("completed", final=final)
