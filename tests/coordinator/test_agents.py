"""The coordinator against three real agents (`fedsite serve` subprocesses) on loopback ports.

One federation serves every test of this module; the test that kills an agent runs last.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from typer.testing import CliRunner

from coordinator.client import AgentClient
from coordinator.errors import AgentAuthError, RoundFailed, RunError
from coordinator.federation import Federation
from coordinator.options import RunOptions
from coordinator.report import QuietReporter
from coordinator.runner import Coordinator
from coordinator.weights import initial_weights
from tests.fixtures.coordinator import RealFederation, TamperingProxy, real_federation, results, tiny_plan

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def fed3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealFederation]:
    torch.set_num_threads(1)
    with real_federation(tmp_path_factory.mktemp("fed3"), subjects=[5, 3, 4]) as fed:
        yield fed


class Recorder(QuietReporter):
    def __init__(self) -> None:
        super().__init__()
        self.warnings: list[str] = []

    def warning(self, message: str) -> None:
        self.warnings.append(message)


def _run(
    fed: Federation,
    plan: dict[str, Any],
    out: Path,
    *,
    clients: dict[str, AgentClient] | None = None,
    reporter: Recorder | None = None,
    **opts: Any,
) -> Any:
    options = RunOptions(**{"strategy": "fedavg", "evaluate": False, "evaluate_final": False, **opts})
    coord = Coordinator(
        fed, plan, out, options, initial_weights=initial_weights(plan), clients=clients, reporter=reporter
    )
    return coord.run()


def _load(path: Path) -> dict[str, torch.Tensor]:
    return st_load(path.read_bytes())


def test_fedavg_equals_hand_computed_weighted_mean_and_diff_mode_agrees(
    fed3: RealFederation, tmp_path: Path
) -> None:
    plan = tiny_plan()
    res = _run(fed3.federation(min_sites=3), plan, tmp_path / "full", rounds=1, run_id="full")
    doc = results(tmp_path / "full")
    rnd = doc["rounds"][0]
    assert rnd["participants"] == fed3.names and rnd["left_out"] == []

    start = initial_weights(plan)
    # Download every site's update ourselves, straight from the agents, and average by hand.
    updates: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for site, info in rnd["training"].items():
        data, header = fed3.download_update(site, info["round_id"])
        assert hashlib.sha256(data).hexdigest() == header == info["update_sha256"]
        updates[site] = st_load(data)
        counts[site] = info["num_samples"]
    assert len(set(counts.values())) > 1, "sites must differ in size for the weighting to matter"
    total = sum(counts.values())
    aggregated = _load(tmp_path / "full" / rnd["model"])
    assert set(aggregated) == set(start)
    for name in start:
        expected = sum(updates[s][name].double() * counts[s] for s in updates) / total
        torch.testing.assert_close(aggregated[name].double(), expected, rtol=0, atol=1e-6)
    # Training changed the model, so the check above is not comparing the start with itself.
    assert any(not torch.equal(aggregated[n], start[n]) for n in start)
    assert torch.equal(res.final_weights[next(iter(start))], aggregated[next(iter(start))])

    # The same round with the sites sending differences to the global model.
    _run(fed3.federation(min_sites=3), {**plan, "send": "diff"}, tmp_path / "diff", rounds=1, run_id="diff")
    rnd_diff = results(tmp_path / "diff")["rounds"][0]
    via_diff = _load(tmp_path / "diff" / rnd_diff["model"])
    diffs = {s: st_load(fed3.download_update(s, i["round_id"])[0]) for s, i in rnd_diff["training"].items()}
    for name in start:
        by_hand = start[name].double() + sum(diffs[s][name].double() * counts[s] for s in diffs) / total
        torch.testing.assert_close(via_diff[name].double(), by_hand, rtol=0, atol=1e-6)
        torch.testing.assert_close(via_diff[name], aggregated[name], rtol=1e-5, atol=1e-5)


def test_two_runs_with_the_same_seed_give_the_same_models_and_dice_in_any_site_order(
    fed3: RealFederation, tmp_path: Path
) -> None:
    """A reproduction's promise: same seed, same machine, same numbers, whichever site answers
    first (the second run lists the sites the other way round, so its jobs start and finish
    in another order)."""
    plan = tiny_plan()
    fed = fed3.federation(min_sites=3)
    kwargs: dict[str, Any] = {"rounds": 2, "evaluate_final": True, "reseed_rounds": True}
    first = _run(fed, plan, tmp_path / "a", run_id="same-a", **kwargs)
    second = _run(fed, plan, tmp_path / "b", run_id="same-b", order=list(reversed(fed3.names)), **kwargs)
    for name, tensor in first.final_weights.items():
        assert torch.equal(tensor, second.final_weights[name]), name
    a, b = results(tmp_path / "a"), results(tmp_path / "b")
    assert [r["model_sha256"] for r in a["rounds"]] == [r["model_sha256"] for r in b["rounds"]]
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert {s: t["update_sha256"] for s, t in ra["training"].items()} == {
            s: t["update_sha256"] for s, t in rb["training"].items()
        }
    assert isinstance(a["final"]["weighted_dice"], float)
    assert a["final"]["weighted_dice"] == b["final"]["weighted_dice"]


def test_kept_optimizer_state_carries_within_a_run_and_not_into_the_next(
    fed3: RealFederation, tmp_path: Path
) -> None:
    """With `optimizer.keep_state`, round 2 of a run starts from the sites' moments of round 1,
    and a second run over the same agents starts fresh, so it trains exactly as the first."""
    plan = tiny_plan(optimizer={"name": "adam", "lr": 0.01, "keep_state": True})
    fed = fed3.federation(min_sites=3)
    kwargs: dict[str, Any] = {"rounds": 2, "reseed_rounds": True}
    first = _run(fed, plan, tmp_path / "a", run_id="keep-a", **kwargs)
    second = _run(fed, plan, tmp_path / "b", run_id="keep-b", **kwargs)
    a, b = results(tmp_path / "a"), results(tmp_path / "b")
    for doc in (a, b):
        restored = [
            {site: job["metrics"]["optimizer_state_restored"] for site, job in r["training"].items()}
            for r in doc["rounds"]
        ]
        assert restored == [dict.fromkeys(fed3.names, 0.0), dict.fromkeys(fed3.names, 1.0)]
    assert [r["model_sha256"] for r in a["rounds"]] == [r["model_sha256"] for r in b["rounds"]]
    for name, tensor in first.final_weights.items():
        assert torch.equal(tensor, second.final_weights[name]), name


def test_tampered_update_is_refused_by_hash(fed3: RealFederation, tmp_path: Path) -> None:
    proxy = TamperingProxy(fed3.agents["site-2"].url).start()
    try:
        fed = fed3.federation(urls={"site-2": proxy.url}, min_sites=2)
        reporter = Recorder()
        # The round ids, plan and weights of the first test: the agents answer with the rounds
        # they already trained (idempotent POST), so no training runs again here.
        _run(fed, tiny_plan(), tmp_path / "out", rounds=1, run_id="full", reporter=reporter)
    finally:
        proxy.stop()
    assert proxy.tampered >= 1
    rnd = results(tmp_path / "out")["rounds"][0]
    assert rnd["participants"] == ["site-1", "site-3"]
    [left] = rnd["left_out"]
    assert left["site"] == "site-2"
    assert "SHA-256" in left["reason"] and "refused" in left["reason"]
    assert any(w.startswith("round 1: site-2 left out") and "SHA-256" in w for w in reporter.warnings)


def test_tampered_update_fails_the_round_below_min_sites(fed3: RealFederation, tmp_path: Path) -> None:
    proxy = TamperingProxy(fed3.agents["site-1"].url).start()
    try:
        fed = fed3.federation(urls={"site-1": proxy.url}, min_sites=3)
        with pytest.raises(RoundFailed, match=r"fewer than min_sites=3; left out: site-1"):
            _run(fed, tiny_plan(), tmp_path / "out", rounds=1, run_id="full")
    finally:
        proxy.stop()
    doc = results(tmp_path / "out")
    assert doc["status"] == "failed"
    assert "SHA-256" in doc["rounds"][0]["left_out"][0]["reason"]


def test_wrong_token_names_the_site(fed3: RealFederation, tmp_path: Path) -> None:
    fed = fed3.federation(tokens={"site-2": "not-the-token"})
    with pytest.raises(AgentAuthError, match=r"^site-2: .*refused the coordinator's token") as info:
        _run(fed, tiny_plan(), tmp_path / "out", rounds=1, run_id="badtoken")
    assert info.value.site == "site-2"
    assert results(tmp_path / "out")["status"] == "failed"


def test_coordinate_cli_wrong_token_exits_with_the_site_named(fed3: RealFederation, tmp_path: Path) -> None:
    import json

    import yaml

    from agent.cli import app

    fed_file = tmp_path / "federation.yaml"
    agents = [
        {"name": n, "url": a.url, "token": "wrong" if n == "site-3" else fed3.tokens[n]}
        for n, a in fed3.agents.items()
    ]
    fed_file.write_text(yaml.safe_dump({"agents": agents, "retries": {"attempts": 1}}))
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(tiny_plan()))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "coordinate",
            "--federation",
            str(fed_file),
            "--plan",
            str(plan_file),
            "--rounds",
            "1",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "site-3" in result.output and "refused the coordinator's token" in result.output


def test_ciil_and_iil_pass_the_model_from_site_to_site(fed3: RealFederation, tmp_path: Path) -> None:
    plan = tiny_plan()
    fed = fed3.federation()
    ciil = Coordinator(
        fed,
        plan,
        tmp_path / "ciil",
        RunOptions(
            strategy="ciil", rounds=1, order=["site-2", "site-1"], evaluate=False, evaluate_final=False
        ),
        initial_weights=initial_weights(plan),
    ).run()
    cycle = ciil.rounds[0]
    assert cycle["label"] == "cycle 1" and cycle["participants"] == ["site-2", "site-1"]
    # Weights mode: the model after the cycle is what the last site of the cycle sent back.
    last, header = fed3.download_update("site-1", cycle["training"]["site-1"]["round_id"])
    assert header == cycle["training"]["site-1"]["update_sha256"]
    final = _load(tmp_path / "ciil" / cycle["model"])
    for name, tensor in st_load(last).items():
        assert torch.equal(final[name], tensor)

    iil = Coordinator(
        fed,
        plan,
        tmp_path / "iil",
        RunOptions(
            strategy="iil", order=["site-3"], patience=1, max_epochs=2, evaluate=False, evaluate_final=False
        ),
        initial_weights=initial_weights(plan),
    ).run()
    [visit] = iil.rounds
    assert visit["label"] == "visit 1 (site-3)"
    metrics = visit["training"]["site-3"]["metrics"]
    assert 1 <= metrics["epochs_run"] <= 2 and 1 <= metrics["best_epoch"] <= metrics["epochs_run"]
    assert results(tmp_path / "iil")["plan"].get("early_stopping") is None  # the run's base plan is unchanged


def test_killed_agent_is_left_out_and_the_round_completes(fed3: RealFederation, tmp_path: Path) -> None:
    fed = fed3.federation(min_sites=2)
    clients = AgentClient.for_federation(fed)
    victim = fed3.agents["site-3"]

    class KillAfterStart(AgentClient):
        def start_round(self, plan: dict[str, Any], weights: bytes | None) -> str:
            job = super().start_round(plan, weights)
            victim.kill()  # the agent and its training worker die mid-round
            return job

    clients["site-3"] = KillAfterStart(
        fed.agent("site-3"), timeouts=fed.timeouts, retries=fed.retries, poll_interval=fed.poll_interval
    )
    reporter = Recorder()
    try:
        res = _run(
            fed, tiny_plan(), tmp_path / "out", rounds=1, run_id="kill", clients=clients, reporter=reporter
        )
    finally:
        for c in clients.values():
            c.close()
    assert not victim.alive()
    rnd = res.rounds[0]
    assert rnd["participants"] == ["site-1", "site-2"]
    assert [x["site"] for x in rnd["left_out"]] == ["site-3"]
    assert "site-3 at http://127.0.0.1" in rnd["left_out"][0]["reason"]
    assert "is not reachable (" in rnd["left_out"][0]["reason"]
    assert any(w.startswith("round 1: site-3 left out of this round") for w in reporter.warnings)
    assert results(tmp_path / "out")["status"] == "completed"

    # With every site required, the same federation cannot run a round any more.
    with pytest.raises((RunError, RoundFailed), match="site-3"):
        _run(fed3.federation(min_sites=3), tiny_plan(), tmp_path / "again", rounds=1, run_id="kill2")
