"""Driven exactly through MONAI FL's ClientAlgo interface, the engine gives the native update."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.fl.client import ClientAlgo
from monai.fl.utils.constants import ExtraItems, FlStatistics, WeightType
from monai.fl.utils.exchange_object import ExchangeObject

from agent.config import EgressConfig
from agent.errors import TrainingCancelled, WeightError
from agent.exchange.egress import EgressGate
from agent.training.client_algo import FedsiteClientAlgo
from agent.training.engine import evaluate, train_round
from tests.fixtures.training import context, initial_weights, make_items, tiny_plan


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list]:
    return make_items(tmp_path_factory.mktemp("site"), train=2, val=2)


class _Sink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def append(self, action: str, *, actor: str, details: dict[str, Any]) -> int:
        self.events.append({"action": action, "details": details})
        return len(self.events)

    def find(self, action: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["action"] == action and all(e["details"].get(k) == v for k, v in match.items())
        ]


@pytest.mark.parametrize(
    ("send", "weight_type"), [("weights", WeightType.WEIGHTS), ("diff", WeightType.WEIGHT_DIFF)]
)
def test_client_algo_gives_the_native_update(
    tmp_path: Path, items: tuple[list, list], send: str, weight_type: WeightType
) -> None:
    plan = tiny_plan(send=send)
    start = initial_weights(plan)
    native = train_round(plan, start, *items, context(tmp_path, "native"))

    algo: ClientAlgo = FedsiteClientAlgo(plan, *items, context(tmp_path, "fl"))
    algo.initialize({ExtraItems.CLIENT_NAME: "site-1"})
    # NVFlare's numpy path: global weights as arrays.
    algo.train(
        ExchangeObject(weights={n: t.numpy() for n, t in start.items()}, weight_type=WeightType.WEIGHTS)
    )
    out = algo.get_weights()
    assert isinstance(out, ExchangeObject) and out.is_valid_weights()
    assert out.weight_type == weight_type
    assert set(out.weights) == set(native.update)
    assert all(torch.equal(out.weights[n], native.update[n]) for n in native.update)
    assert out.metrics == native.metrics
    assert out.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS] == int(native.metrics["steps"])
    assert out.statistics["num_samples"] == len(items[0])

    report = algo.evaluate(ExchangeObject(weights=start, weight_type=WeightType.WEIGHTS))
    assert report.metrics == {
        **evaluate(plan, start, items[1], context(tmp_path, "eval")).metrics,
        "num_samples": len(items[1]),
    }
    algo.finalize()


def test_client_algo_refuses_bad_exchange_objects(tmp_path: Path, items: tuple[list, list]) -> None:
    plan = tiny_plan()
    start = initial_weights(plan)
    algo = FedsiteClientAlgo(plan, *items, context(tmp_path))
    algo.initialize()
    with pytest.raises(WeightError, match="must be fl_weights_full"):
        algo.train(ExchangeObject(weights=start, weight_type=WeightType.WEIGHT_DIFF))
    with pytest.raises(WeightError, match="no weights"):
        algo.train(ExchangeObject(weights={}, weight_type=WeightType.WEIGHTS))
    bad = dict(start)
    bad.pop(next(iter(bad)))
    with pytest.raises(WeightError, match="missing tensors"):
        algo.train(ExchangeObject(weights=bad, weight_type=WeightType.WEIGHTS))
    with pytest.raises(RuntimeError, match="before train"):
        algo.get_weights()


def test_abort_cancels_training(tmp_path: Path, items: tuple[list, list]) -> None:
    plan = tiny_plan()
    algo = FedsiteClientAlgo(plan, *items, context(tmp_path, progress=lambda _: algo.abort()))
    algo.initialize()
    with pytest.raises(TrainingCancelled):
        algo.train(ExchangeObject(weights=initial_weights(plan), weight_type=WeightType.WEIGHTS))


def test_with_a_gate_the_update_is_what_the_gate_released(tmp_path: Path, items: tuple[list, list]) -> None:
    plan = tiny_plan(round_id="fl-1", send="diff")
    start = initial_weights(plan)
    sink = _Sink()
    gate = EgressGate(sink, tmp_path / "outbox", EgressConfig(exclude_parameters=["model.0.*"]))
    algo = FedsiteClientAlgo(plan, *items, context(tmp_path), gate=gate)
    algo.initialize()
    algo.train(ExchangeObject(weights=start, weight_type=WeightType.WEIGHTS))
    out = algo.get_weights()
    assert [e["details"]["round_id"] for e in sink.events] == ["fl-1"]
    assert (tmp_path / "outbox" / "fl-1.safetensors").is_file()
    excluded = [n for n in out.weights if n.startswith("model.0.")]
    assert excluded and all(not out.weights[n].any() for n in excluded)


def test_a_random_start_needs_no_weights_and_the_gate_release_is_kept(
    tmp_path: Path, items: tuple[list, list]
) -> None:
    plan = tiny_plan(round_id="fl-2", init="random")
    native = train_round(plan, None, *items, context(tmp_path, "native"))
    sink = _Sink()
    gate = EgressGate(sink, tmp_path / "outbox", EgressConfig())
    epochs: list[int] = []
    ctx = context(tmp_path, "fl", on_epoch_end=lambda epoch, _model: epochs.append(epoch))
    algo = FedsiteClientAlgo(plan, *items, ctx, gate=gate)
    algo.initialize()
    algo.train(ExchangeObject())  # no weights at all: the plan starts from random ones
    out = algo.get_weights()
    assert all(torch.equal(out.weights[n], native.update[n]) for n in native.update)
    assert epochs == [1]  # the caller's context is kept whole, epoch hook included
    released = algo.released
    assert released is not None and released.path == tmp_path / "outbox" / "fl-2.safetensors"
    assert released.sha256 == hashlib.sha256(released.path.read_bytes()).hexdigest()
    assert sink.events[-1]["details"]["sha256"] == released.sha256


def test_a_plan_from_global_weights_refuses_to_train_without_them(
    tmp_path: Path, items: tuple[list, list]
) -> None:
    algo = FedsiteClientAlgo(tiny_plan(), *items, context(tmp_path))
    algo.initialize()
    with pytest.raises(WeightError, match="init 'global'"):
        algo.train(ExchangeObject())
    with pytest.raises(WeightError, match="no weights"):
        algo.evaluate(ExchangeObject())
