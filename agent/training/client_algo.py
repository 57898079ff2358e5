"""The engine behind MONAI FL's ``ClientAlgo`` interface.

With this, NVFlare or any other MONAI-FL driver can run our trainer: ``train`` takes the
global weights in an ``ExchangeObject`` (``WeightType.WEIGHTS``), ``get_weights`` returns
the update as full weights or as the difference to the global weights according to the
plan's ``send`` (``WeightType.WEIGHTS`` / ``WeightType.WEIGHT_DIFF``), ``evaluate`` scores
given weights on the validation split, ``abort`` cancels a running ``train`` between steps.

When an egress gate is given, ``get_weights`` returns what the gate released (filters
applied, audit event written, bytes re-read through ``read_released``), so that updates
leaving through a MONAI-FL driver pass the same single gate as those served over HTTP.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.fl.client import ClientAlgo
from monai.fl.utils.constants import ExtraItems, FlStatistics, WeightType
from monai.fl.utils.exchange_object import ExchangeObject

from agent.exchange.codec import WeightError, decode_weights
from agent.training.engine import EngineContext, TrainResult, evaluate, train_round
from agent.training.registry import expected_shapes

if TYPE_CHECKING:
    from agent.data.catalog import ItemRef
    from agent.exchange.egress import EgressGate
    from agent.training.plan import Plan


class FedsiteClientAlgo(ClientAlgo):
    def __init__(
        self,
        plan: Plan,
        train_items: Sequence[ItemRef],
        val_items: Sequence[ItemRef],
        ctx: EngineContext,
        *,
        gate: EgressGate | None = None,
        max_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self.plan = plan
        self.train_items = list(train_items)
        self.val_items = list(val_items)
        self.gate = gate
        self.max_bytes = max_bytes
        self._abort = threading.Event()
        outer_stop = ctx.should_stop
        self.ctx = EngineContext(
            device=ctx.device,
            work_dir=ctx.work_dir,
            cache_dir=ctx.cache_dir,
            progress=ctx.progress,
            should_stop=lambda: self._abort.is_set() or outer_stop(),
        )
        self.client_name = "fedsite"
        self.rounds = 0
        self.result: TrainResult | None = None

    def initialize(self, extra: dict | None = None) -> None:
        extra = extra or {}
        self.client_name = str(extra.get(ExtraItems.CLIENT_NAME, self.client_name))
        self._abort.clear()
        self.result = None

    def _weights_in(self, data: ExchangeObject) -> dict[str, torch.Tensor]:
        if not isinstance(data, ExchangeObject):
            raise ValueError(f"expected an ExchangeObject, got {type(data).__name__}")
        if not data.is_valid_weights():
            raise WeightError("the ExchangeObject carries no weights or no weight_type")
        if data.weight_type != WeightType.WEIGHTS:
            raise WeightError(f"global weights must be {WeightType.WEIGHTS}, got {data.weight_type}")
        out: dict[str, torch.Tensor] = {}
        weights: dict[str, Any] = data.weights or {}
        for name, value in weights.items():
            # NVFlare's numpy path hands arrays; keep tensors as they are.
            out[name] = torch.from_numpy(np.asarray(value)) if isinstance(value, np.ndarray) else value
        return out

    def train(self, data: ExchangeObject, extra: dict | None = None) -> None:
        self._abort.clear()
        self.result = train_round(
            self.plan, self._weights_in(data), self.train_items, self.val_items, self.ctx
        )
        self.rounds += 1

    def get_weights(self, extra: dict | None = None) -> ExchangeObject:
        if self.result is None:
            raise RuntimeError("get_weights before train: there is no update yet")
        result = self.result
        update: Mapping[str, torch.Tensor] = result.update
        if self.gate is not None:
            round_id = self.plan.round_id or f"{self.client_name}-fl-{self.rounds}"
            self.gate.release(
                round_id=round_id,
                plan=self.plan,
                update=result.update,
                global_weights=result.global_weights,
                kind=self.plan.send,
            )
            update = decode_weights(
                self.gate.read_released(round_id),
                expected=expected_shapes(self.plan),
                max_bytes=self.max_bytes,
            )
        kind = WeightType.WEIGHT_DIFF if self.plan.send == "diff" else WeightType.WEIGHTS
        return ExchangeObject(
            weights=dict(update),
            weight_type=kind,
            metrics=dict(result.metrics),
            statistics={
                FlStatistics.NUM_EXECUTED_ITERATIONS: int(result.metrics.get("steps", 0)),
                "num_samples": result.num_samples,
            },
        )

    def evaluate(self, data: ExchangeObject, extra: dict | None = None) -> ExchangeObject:
        result = evaluate(self.plan, self._weights_in(data), self.val_items, self.ctx)
        return ExchangeObject(metrics={**result.metrics, "num_samples": result.num_samples})

    def abort(self, extra: dict | None = None) -> None:
        self._abort.set()

    def finalize(self, extra: dict | None = None) -> None:
        self._abort.set()
        self.result = None

    def summary(self) -> dict[str, Any]:
        return {"client": self.client_name, "rounds": self.rounds, "plan_send": self.plan.send}
