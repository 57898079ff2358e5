"""The strategies (coordinator/strategies/) on their own and through the coordinator.

The runs here go to agents answered in this process (`FakeAgent`): the HTTP client, the hash
checks and the recording are the real ones, the training is a seeded stand-in, so every run
takes well under a second. The real agents are in test_coordinator_agents.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator.aggregate import UpdateKind, apply_update
from coordinator.errors import RoundFailed, RunError
from coordinator.options import RunOptions
from coordinator.report import QuietReporter
from coordinator.runner import Coordinator, RunResult
from coordinator.strategies import STRATEGIES
from coordinator.strategies.base import Job, SiteResult, Strategy
from coordinator.strategies.ciil import CIIL
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.iil import IIL
from tests.fixtures.coordinator import FakeFederation, fake_federation, results, toy_weights

PLAN: dict[str, Any] = {"dataset": "brain", "seed": 7, "local_epochs": 2}
SITES = {"site-1": 5, "site-2": 3, "site-3": 4}


class Recorder(QuietReporter):
    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.warnings: list[str] = []

    def start(self, title: str, sites: Sequence[str]) -> None:
        self.title = title

    def warning(self, message: str) -> None:
        self.warnings.append(message)


def _run(
    fake: FakeFederation,
    out: Path,
    plan: dict[str, Any] | None = None,
    reporter: Recorder | None = None,
    **opts: Any,
) -> RunResult:
    fed = fake.federation()
    options = RunOptions(run_id="run", **{"evaluate": False, "evaluate_final": False, **opts})
    return Coordinator(
        fed,
        plan or PLAN,
        out,
        options,
        initial_weights=toy_weights(),
        clients=fake.clients(fed),
        reporter=reporter,
    ).run()


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name].double(), b[name].double(), rtol=0, atol=1e-6)


def _start() -> dict[str, torch.Tensor]:
    """The model a run starts from, as the coordinator holds it (float32)."""
    return {k: v.to(torch.float32) for k, v in toy_weights().items()}


# -- the registry and what each strategy asks of which sites --------------------------------


def test_registry_holds_the_cli_values_with_their_round_labels() -> None:
    assert list(STRATEGIES) == [
        "fedavg",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fednova",
        "iil",
        "ciil",
        "secure_fedavg",
    ]
    assert {n: (c.title, c.round_label) for n, c in STRATEGIES.items()} == {
        "fedavg": ("FedAvg", "round"),
        "fedavgm": ("FedAvgM", "round"),
        "fedadam": ("FedAdam", "round"),
        "fedyogi": ("FedYogi", "round"),
        "fednova": ("FedNova", "round"),
        "iil": ("IIL", "visit"),
        "ciil": ("CIIL", "cycle"),
        "secure_fedavg": ("Secure FedAvg", "round"),
    }
    assert all(issubclass(c, Strategy) for c in STRATEGIES.values())


def test_unknown_strategy_names_the_registered_ones(tmp_path: Path) -> None:
    fake = fake_federation({"site-1": 2})
    with pytest.raises(
        RunError,
        match=r"unknown strategy 'fedsgd'; choose one of fedavg, fedavgm, fedadam, fedyogi, fednova, "
        r"iil, ciil, secure_fedavg$",
    ):
        _run(fake, tmp_path, strategy="fedsgd")


def test_each_strategy_configures_its_jobs_and_labels() -> None:
    sites = ["a", "b", "c"]
    fedavg = FedAvg(RunOptions(rounds=4), sites)
    assert fedavg.num_rounds() == 4 and fedavg.label(2) == "round 2"
    assert fedavg.configure_train(2, "run") == [Job(s, f"run-r002-{s}", "round 2") for s in sites]

    iil = IIL(RunOptions(rounds=4), sites)
    assert iil.num_rounds() == 3, "IIL makes one pass whatever the rounds"
    assert iil.label(2) == "visit 2 (b)"
    assert iil.configure_train(2, "run") == [Job("b", "run-v002-b", "visit 2 (b)")]

    ciil = CIIL(RunOptions(rounds=2), sites)
    assert ciil.num_rounds() == 2 and ciil.label(2) == "cycle 2"
    assert ciil.configure_train(2, "run") == [
        Job("a", "run-c002v001-a", "cycle 2 visit 1 (a)"),
        Job("b", "run-c002v002-b", "cycle 2 visit 2 (b)"),
        Job("c", "run-c002v003-c", "cycle 2 visit 3 (c)"),
    ]


def test_each_strategy_derives_its_round_plan() -> None:
    plan = {**PLAN, "early_stopping": {"patience": 1, "max_epochs": 2}}
    keep = RunOptions()
    reseed = RunOptions(reseed_rounds=True, patience=3, max_epochs=9)
    # FedAvg sends the plan as it is, with the round's seed when reseeding.
    assert FedAvg(keep, ["a"]).round_plan(plan, 3) == plan
    assert FedAvg(reseed, ["a"]).round_plan(plan, 3) == {**plan, "seed": 9}
    # CIIL trains a fixed number of epochs per visit: no early stopping; its cycles reseed.
    no_stop = {k: v for k, v in plan.items() if k != "early_stopping"}
    assert CIIL(keep, ["a"]).round_plan(plan, 3) == no_stop
    assert CIIL(reseed, ["a"]).round_plan(plan, 3) == {**no_stop, "seed": 9}
    # IIL stops early at every site and keeps the seed (one pass); the base plan is not touched.
    iil_plan = IIL(reseed, ["a"]).round_plan(plan, 3)
    assert iil_plan == {**plan, "early_stopping": {"patience": 3, "max_epochs": 9}}
    assert plan["early_stopping"] == {"patience": 1, "max_epochs": 2}


# -- FedAvg ---------------------------------------------------------------------------------


def test_fedavg_is_the_sample_weighted_mean_of_the_updates(tmp_path: Path) -> None:
    fake = fake_federation(SITES)
    res = _run(fake, tmp_path, strategy="fedavg", rounds=2, reseed_rounds=True)
    assert [r["label"] for r in res.rounds] == ["round 1", "round 2"]
    # Every site trained every round, under the round's id and with the round's seed.
    for name, agent in fake.agents.items():
        assert [(p["round_id"], p["seed"]) for p in agent.trained] == [
            (f"run-r001-{name}", 7),
            (f"run-r002-{name}", 8),
        ]
    start = _start()
    total = sum(SITES.values())
    expected = start
    for rnd in range(2):
        sent = {n: a.train(a.trained[rnd], expected) for n, a in fake.agents.items()}
        weighted = {k: torch.stack([sent[n][k].double() * SITES[n] for n in sent]) for k in start}
        expected = {k: (w.sum(0) / total).to(torch.float32) for k, w in weighted.items()}
    _close(res.final_weights, expected)
    assert results(tmp_path)["strategy"] == "fedavg" and results(tmp_path)["round_label"] == "round"


def test_fedavg_leaves_a_failing_site_out_and_fails_below_min_sites(tmp_path: Path) -> None:
    fake = fake_federation(SITES, min_sites=2)
    fake.agents["site-2"].fail_rounds = True
    reporter = Recorder()
    res = _run(fake, tmp_path / "two", strategy="fedavg", reporter=reporter)
    [rnd] = res.rounds
    assert rnd["participants"] == ["site-1", "site-3"]
    assert rnd["left_out"] == [
        {"site": "site-2", "reason": "site-2: round run-r001-site-2 ended as failed: out of memory"}
    ]
    assert reporter.warnings == [
        "round 1: site-2 left out of this round: site-2: round run-r001-site-2 ended as failed: out of memory"
    ]
    assert reporter.title == "run: FedAvg over site-1, site-2, site-3"

    fake.min_sites = 3
    with pytest.raises(RoundFailed, match=r"^round 1 failed: 2 update\(s\) arrived, fewer than min_sites=3"):
        _run(fake, tmp_path / "three", strategy="fedavg")
    doc = results(tmp_path / "three")
    assert doc["status"] == "failed"
    assert doc["rounds"][0]["failed"] is True and doc["rounds"][0]["participants"] == ["site-1", "site-3"]


# -- IIL and CIIL: the model travels --------------------------------------------------------


def test_iil_visits_each_site_once_and_a_failed_site_passes_the_model_on(tmp_path: Path) -> None:
    fake = fake_federation(SITES)
    fake.agents["site-1"].fail_rounds = True
    reporter = Recorder()
    order = ["site-3", "site-1", "site-2"]
    res = _run(
        fake, tmp_path, strategy="iil", order=order, rounds=5, patience=2, max_epochs=4, reporter=reporter
    )
    assert [r["label"] for r in res.rounds] == ["visit 1 (site-3)", "visit 2 (site-1)", "visit 3 (site-2)"]
    assert [r["participants"] for r in res.rounds] == [["site-3"], [], ["site-2"]]
    assert reporter.warnings[0].startswith("visit 2 (site-1): site-1 skipped, the model goes on unchanged")
    assert fake.agents["site-3"].trained[0]["early_stopping"] == {"patience": 2, "max_epochs": 4}
    # Weights mode: the model after each visit is what the site sent back; the skipped visit
    # leaves the model of the visit before.
    models = [_start()]
    for site in order:
        agent = fake.agents[site]
        models.append(agent.train(agent.trained[0], models[-1]) if site != "site-1" else models[-1])
    _close(res.final_weights, models[-1])
    doc = results(tmp_path)
    assert doc["round_label"] == "visit" and doc["plan"] == PLAN


def test_ciil_cycles_through_the_sites_and_evaluates_after_every_visit(tmp_path: Path) -> None:
    fake = fake_federation(SITES)
    order = ["site-2", "site-3", "site-1"]
    res = _run(
        fake,
        tmp_path,
        {**PLAN, "send": "diff", "early_stopping": {"patience": 1, "max_epochs": 2}},
        strategy="ciil",
        rounds=2,
        order=order,
        reseed_rounds=True,
        evaluate=True,
        evaluate_every_visit=True,
    )
    assert [r["label"] for r in res.rounds] == ["cycle 1", "cycle 2"]
    assert all(r["participants"] == order for r in res.rounds)
    sent = fake.agents["site-3"].trained
    assert [(p["round_id"], p["seed"]) for p in sent] == [
        ("run-c001v002-site-3", 7),
        ("run-c002v002-site-3", 8),
    ]
    assert all("early_stopping" not in p for p in sent)
    # Diff mode: each site's difference is added to the model it started from, in order.
    model = _start()
    kind: UpdateKind = "diff"
    for cycle in range(2):
        for site in order:
            agent = fake.agents[site]
            model = apply_update(model, agent.train(agent.trained[cycle], model), kind)
    _close(res.final_weights, model)
    # After every visit but a cycle's last (whose model is the cycle's own, evaluated with it).
    visits = results(tmp_path)["visits"]
    assert [(v["cycle"], v["visit"], v["site"]) for v in visits] == [
        (1, 1, "site-2"),
        (1, 2, "site-3"),
        (2, 1, "site-2"),
        (2, 2, "site-3"),
    ]
    assert all(set(v["evaluation"]) == set(SITES) for v in visits)
    assert (tmp_path / "models" / "cycle-002-visit-002.safetensors").is_file()


# -- a new strategy is one class -------------------------------------------------------------


class FedMedian(FedAvg):
    """FedAvg with the coordinate-wise median of the updates in place of the weighted mean."""

    title = "FedMedian"

    def aggregate_train(
        self, global_weights: dict[str, torch.Tensor], results: Sequence[SiteResult], kind: UpdateKind
    ) -> dict[str, torch.Tensor]:
        return {
            name: torch.stack([r.tensors[name] for r in results]).median(dim=0).values
            for name in global_weights
        }


def test_a_strategy_added_to_the_registry_runs_like_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(STRATEGIES, "fedmedian", FedMedian)
    fake = fake_federation(SITES)
    reporter = Recorder()
    res = _run(fake, tmp_path, strategy="fedmedian", evaluate=True, reporter=reporter)
    start = _start()
    sent = [a.train(a.trained[0], start) for a in fake.agents.values()]
    _close(res.final_weights, {k: torch.stack([s[k] for s in sent]).median(dim=0).values for k in start})
    doc = results(tmp_path)
    assert (doc["strategy"], doc["round_label"], doc["status"]) == ("fedmedian", "round", "completed")
    assert doc["rounds"][0]["label"] == "round 1" and isinstance(doc["rounds"][0]["weighted_dice"], float)
    assert reporter.title.startswith("run: FedMedian over")
