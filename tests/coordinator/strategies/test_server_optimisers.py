"""The server optimisers (FedAvgM, FedAdam, FedYogi) and FedNova, against hand-computed steps.

One-element tensors make each rule checkable by hand; runs through the coordinator with agents
answered in this process (`FakeAgent`) show that results.json records the optimiser and that
the order in which sites answer changes no bit of any strategy's model.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator.aggregate import SiteUpdate, weighted_mean
from coordinator.errors import AggregationError, RunError
from coordinator.options import RunOptions
from coordinator.runner import Coordinator
from coordinator.strategies import STRATEGIES
from coordinator.strategies.base import SiteResult
from coordinator.strategies.fedadam import FedAdam
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.fedavgm import FedAvgM
from coordinator.strategies.fednova import FedNova
from coordinator.strategies.fedyogi import FedYogi
from tests.fixtures.coordinator import fake_federation, results, toy_weights

SITES = ["site-1", "site-2"]


def _result(site: str, value: float, num_samples: int, steps: float | None = 1.0) -> SiteResult:
    metrics: dict[str, Any] = {} if steps is None else {"steps": steps}
    tensors = {"w": torch.tensor([value]), "n": torch.tensor([3])}
    return SiteResult(site, f"r-{site}", tensors, num_samples, metrics, "0" * 64, 0, 0, 0.0)


def _global(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([value]), "n": torch.tensor([1])}


def _w(model: dict[str, torch.Tensor]) -> float:
    return float(model["w"][0])


def test_registry_holds_the_server_optimisers() -> None:
    assert STRATEGIES["fedavgm"] is FedAvgM
    assert STRATEGIES["fedadam"] is FedAdam
    assert STRATEGIES["fedyogi"] is FedYogi
    assert STRATEGIES["fednova"] is FedNova


def test_fedavgm_without_momentum_and_unit_rate_is_fedavg() -> None:
    opts = RunOptions(server_lr=1.0, server_momentum=0.0)
    g = _global(1.0)
    res = [_result("site-1", 2.0, 3), _result("site-2", 5.0, 1)]
    ours = FedAvgM(opts, SITES).aggregate_train(g, res, "weights")
    plain = FedAvg(opts, SITES).aggregate_train(g, res, "weights")
    assert _w(ours) == pytest.approx(_w(plain), abs=1e-6)
    assert _w(plain) == pytest.approx(2.75)
    # The counter takes the plain weighted mean, not a momentum step.
    assert int(ours["n"][0]) == 3


def test_fedavgm_momentum_carries_the_previous_round() -> None:
    strat = FedAvgM(RunOptions(server_lr=0.5, server_momentum=0.9), SITES)
    g = _global(0.0)
    # Round 1: delta 1, m = 1, step 0.5.
    g = strat.aggregate_train(g, [_result("site-1", 1.0, 1), _result("site-2", 1.0, 1)], "weights")
    assert _w(g) == pytest.approx(0.5)
    # Round 2: delta 0 (the sites returned the global model), m = 0.9, step 0.45.
    g = strat.aggregate_train(g, [_result("site-1", 0.5, 1), _result("site-2", 0.5, 1)], "weights")
    assert _w(g) == pytest.approx(0.95)


def _adam_by_hand(deltas: Sequence[float], lr: float, b1: float, b2: float, tau: float, yogi: bool) -> float:
    x, m, v = 0.0, 0.0, tau**2
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if yogi else b2 * v + (1 - b2) * d * d
        x += lr * m / (math.sqrt(v) + tau)
    return x


@pytest.mark.parametrize(("cls", "yogi"), [(FedAdam, False), (FedYogi, True)])
def test_adaptive_steps_follow_the_paper(cls: type[FedAdam], yogi: bool) -> None:
    opts = RunOptions(server_lr=0.1, server_beta1=0.9, server_beta2=0.99, server_tau=1e-3)
    strat = cls(opts, SITES)
    g = _global(0.0)
    deltas = [0.2, -0.05, 0.4]
    for d in deltas:
        x = _w(g)
        g = strat.aggregate_train(g, [_result("site-1", x + d, 2), _result("site-2", x + d, 1)], "weights")
    assert _w(g) == pytest.approx(_adam_by_hand(deltas, 0.1, 0.9, 0.99, 1e-3, yogi), rel=1e-5)


def test_yogi_and_adam_differ_once_the_changes_grow() -> None:
    # A short memory (beta2 0.5) makes the two second moments far apart after a jump.
    opts = RunOptions(server_lr=0.1, server_beta2=0.5)
    adam, yogi = FedAdam(opts, SITES), FedYogi(opts, SITES)
    ga, gy = _global(0.0), _global(0.0)
    for d in (0.01, 1.0, 0.01):
        ga = adam.aggregate_train(ga, [_result("site-1", _w(ga) + d, 1)], "weights")
        gy = yogi.aggregate_train(gy, [_result("site-1", _w(gy) + d, 1)], "weights")
    assert _w(ga) == pytest.approx(_adam_by_hand([0.01, 1.0, 0.01], 0.1, 0.9, 0.5, 1e-3, False), rel=1e-5)
    assert _w(gy) == pytest.approx(_adam_by_hand([0.01, 1.0, 0.01], 0.1, 0.9, 0.5, 1e-3, True), rel=1e-5)
    assert abs(_w(ga) - _w(gy)) > 0.1 * abs(_w(ga))


def test_diff_updates_give_the_same_step_as_weights() -> None:
    opts = RunOptions(server_lr=0.1)
    g = _global(1.0)
    as_weights = FedAdam(opts, SITES).aggregate_train(g, [_result("site-1", 1.5, 2)], "weights")
    as_diff = FedAdam(opts, SITES).aggregate_train(g, [_result("site-1", 0.5, 2)], "diff")
    assert _w(as_weights) == pytest.approx(_w(as_diff), abs=1e-7)


def test_fednova_with_equal_steps_is_fedavg() -> None:
    opts = RunOptions()
    g = _global(1.0)
    res = [_result("site-1", 2.0, 3, steps=4), _result("site-2", 5.0, 1, steps=4)]
    model = FedNova(opts, SITES).aggregate_train(g, res, "weights")
    assert _w(model) == pytest.approx(2.75, abs=1e-6)
    # The integer counter takes FedAvg's weighted mean.
    assert int(model["n"][0]) == 3


def test_fednova_normalises_by_local_steps() -> None:
    g = _global(0.0)
    # site-1: 3 samples, 30 steps, moved 3; site-2: 1 sample, 10 steps, moved 2.
    res = [_result("site-1", 3.0, 3, steps=30), _result("site-2", 2.0, 1, steps=10)]
    got = _w(FedNova(RunOptions(), SITES).aggregate_train(g, res, "weights"))
    tau_eff = 0.75 * 30 + 0.25 * 10
    assert got == pytest.approx(tau_eff * (0.75 * 3 / 30 + 0.25 * 2 / 10))
    # 25 effective steps along 0.125 per step; FedAvg's mean of the moves would be 2.75.
    assert got == pytest.approx(3.125)


@pytest.mark.parametrize("steps", [None, 0, -3.0, True, "12"])
def test_fednova_refuses_a_site_without_its_steps(steps: Any) -> None:
    res = [_result("site-1", 1.0, 1, steps=4), _result("site-2", 1.0, 1, steps=steps)]
    with pytest.raises(AggregationError, match=r"site-2: .*'steps'"):
        FedNova(RunOptions(), SITES).aggregate_train(_global(0.0), res, "weights")


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (RunOptions(strategy="fedadam", server_lr=0.0), "server_lr must be positive"),
        (RunOptions(strategy="fedavgm", server_momentum=1.0), "server_momentum must be in"),
        (RunOptions(strategy="fedyogi", server_beta2=1.5), "server_beta2 must be in"),
        (RunOptions(strategy="fedadam", server_tau=0.0), "server_tau must be positive"),
    ],
)
def test_bad_settings_are_refused_before_any_round(tmp_path: Path, opts: RunOptions, message: str) -> None:
    fake = fake_federation({"site-1": 2})
    fed = fake.federation()
    with pytest.raises(RunError, match=message):
        Coordinator(
            fed,
            {"dataset": "brain"},
            tmp_path,
            opts,
            initial_weights=toy_weights(),
            clients=fake.clients(fed),
        )


def _run(out: Path, strategy: str, samples: dict[str, int]) -> dict[str, torch.Tensor]:
    fake = fake_federation(samples)
    fed = fake.federation()
    opts = RunOptions(strategy=strategy, rounds=2, run_id="run", evaluate=False, evaluate_final=False)
    return (
        Coordinator(
            fed,
            {"dataset": "brain", "seed": 3, "local_epochs": 1},
            out,
            opts,
            initial_weights=toy_weights(),
            clients=fake.clients(fed),
        )
        .run()
        .final_weights
    )


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fednova"])
def test_the_order_sites_answer_in_changes_no_bit(tmp_path: Path, strategy: str) -> None:
    sizes = {"site-1": 5, "site-2": 3, "site-3": 4, "site-4": 7}
    names = list(sizes)
    random.Random(7).shuffle(names)
    a = _run(tmp_path / "a", strategy, sizes)
    b = _run(tmp_path / "b", strategy, {n: sizes[n] for n in names})
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_results_record_the_optimiser_and_its_settings(tmp_path: Path) -> None:
    _run(tmp_path, "fedadam", {"site-1": 2, "site-2": 3})
    doc = results(tmp_path)
    assert doc["strategy"] == "fedadam"
    assert doc["strategy_settings"] == {
        "server_lr": 1e-2,
        "server_beta1": 0.9,
        "server_beta2": 0.99,
        "server_tau": 1e-3,
    }


def test_weighted_mean_sums_in_site_order_whatever_the_arrival_order() -> None:
    # Float addition is not associative: 1e16 + 1 - 1e16 is 0 or 1 depending on the order.
    values = {"site-a": 1e16, "site-b": 1.0, "site-c": -1e16}
    means = set()
    for order in itertools.permutations(values):
        ups = [SiteUpdate(s, {"w": torch.tensor([values[s]], dtype=torch.float64)}, 1) for s in order]
        means.add(float(weighted_mean(ups)["w"][0]))
    assert len(means) == 1
