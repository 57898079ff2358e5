"""The engine behind MONAI FL's ``ClientAlgo`` interface: the one trainer of the agent.

The agent's own worker (`agent.jobs.worker`) runs every round and evaluation through this
class, and so can NVFlare or any other MONAI-FL driver: ``train`` takes the global weights
in an ``ExchangeObject`` (``WeightType.WEIGHTS``; none at all for a plan that starts from
random weights), ``get_weights`` returns the update as full weights or as the difference
to the global weights according to the plan's ``send`` (``WeightType.WEIGHTS`` /
``WeightType.WEIGHT_DIFF``), ``evaluate`` scores given weights on the validation split,
``abort`` cancels a running ``train`` between steps. With ``resume_from_checkpoint``,
``train`` continues from the checkpoint in the context's work folder, if there is one (a
round that a crash interrupted and the agent queued again).

When an egress gate is given, ``get_weights`` returns what the gate released (filters
applied, audit event written, bytes re-read through ``read_released``) and keeps the
release record in ``released``, so that every update, served over HTTP or handed to a
MONAI-FL driver, leaves through the same single gate.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.fl.client import ClientAlgo
from monai.fl.utils.constants import ExtraItems, FlStatistics, WeightType
from monai.fl.utils.exchange_object import ExchangeObject

from agent.errors import WeightError
from agent.exchange.compression import decode_update
from agent.training.engine import EngineContext, TrainResult, evaluate, train_round
from agent.training.registry import expected_shapes

if TYPE_CHECKING:
    from agent.data.catalog import ItemRef
    from agent.exchange.egress import EgressGate, Released
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
        resume_from_checkpoint: bool = False,
    ) -> None:
        self.plan = plan
        self.train_items = list(train_items)
        self.val_items = list(val_items)
        self.gate = gate
        self.resume_from_checkpoint = resume_from_checkpoint
        self._abort = threading.Event()
        outer_stop = ctx.should_stop
        self.ctx = dataclasses.replace(ctx, should_stop=lambda: self._abort.is_set() or outer_stop())
        self.client_name = "fedsite"
        self.rounds = 0
        self.result: TrainResult | None = None
        # The weights the last `train` was given: what the coordinator holds.
        self.received: dict[str, torch.Tensor] | None = None
        # What the gate released for the last `get_weights` (hash, size, file).
        self.released: Released | None = None

    def initialize(self, extra: dict | None = None) -> None:
        extra = extra or {}
        self.client_name = str(extra.get(ExtraItems.CLIENT_NAME, self.client_name))
        self._abort.clear()
        self.result = None
        self.received = None
        self.released = None

    def _weights_in(self, data: ExchangeObject, *, optional: bool = False) -> dict[str, torch.Tensor] | None:
        """The weights of DATA as tensors; None where OPTIONAL and DATA carries none at all.

        Whether a round may start without weights is the plan's to say (``init: random``);
        the engine checks it, with a message that names the plan's setting.
        """
        if not isinstance(data, ExchangeObject):
            raise ValueError(f"expected an ExchangeObject, got {type(data).__name__}")
        if optional and data.weights is None and data.weight_type is None:
            return None
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
        self.result, self.released = None, None
        self.received = self._weights_in(data, optional=True)
        self.result = train_round(
            self.plan,
            self.received,
            self.train_items,
            self.val_items,
            self.ctx,
            resume_from_checkpoint=self.resume_from_checkpoint,
        )
        self.rounds += 1

    def get_weights(self, extra: dict | None = None) -> ExchangeObject:
        if self.result is None:
            raise RuntimeError("get_weights before train: there is no update yet")
        result = self.result
        update: Mapping[str, torch.Tensor] = result.update
        if self.gate is not None:
            round_id = self.plan.round_id or f"{self.client_name}-fl-{self.rounds}"
            # The filters act on the difference to the start of the round; a plan that
            # ignored the weights it was given (init random) is measured against them,
            # since they are what the coordinator holds.
            base = result.global_weights if result.global_weights is not None else self.received
            self.released = self.gate.release(
                round_id=round_id,
                plan=self.plan,
                update=result.update,
                global_weights=base,
                kind=self.plan.send,
            )
            # The gate's own output, checked against the hash it recorded: the size limit on
            # received weights does not apply to it. A secure round's update is held, not released;
            # a compressed one decodes to the difference it stands for.
            read = self.gate.read_held if self.released.held else self.gate.read_released
            data = read(round_id)
            update = decode_update(data, expected=expected_shapes(self.plan), max_bytes=len(data))
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
        weights = self._weights_in(data)
        assert weights is not None  # only optional weights may be missing
        result = evaluate(self.plan, weights, self.val_items, self.ctx)
        return ExchangeObject(metrics={**result.metrics, "num_samples": result.num_samples})

    def abort(self, extra: dict | None = None) -> None:
        self._abort.set()

    def finalize(self, extra: dict | None = None) -> None:
        self._abort.set()
        self.result = None
        self.received = None

    def summary(self) -> dict[str, Any]:
        return {"client": self.client_name, "rounds": self.rounds, "plan_send": self.plan.send}
