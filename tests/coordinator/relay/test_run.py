"""The coordinator over a mixed federation: a push site (its API) and a pull site (the relay).

The pull site is a `FakeAgent` played by a thread that speaks the relay protocol over HTTP; the
same fake agents in a push-only federation give the reference. FedAvg averages in float64
whatever the order the updates arrive in, so the two runs must agree exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from coordinator.client import AgentClient
from coordinator.errors import RunError
from coordinator.options import RunOptions
from coordinator.relay.client import RelaySiteClient, site_clients
from coordinator.runner import Coordinator, RunResult
from tests.fixtures.coordinator import FakeAgent, FakeFederation, fake_federation, results, toy_weights
from tests.fixtures.relay import PullSiteThread, relay_env, relay_in_thread

PLAN: dict[str, Any] = {"dataset": "brain", "model": {"name": "toy"}, "seed": 3}
SAMPLES = {"site-1": 10, "site-2": 30}


def _start() -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float32) for k, v in toy_weights().items()}


def _options(strategy: str) -> RunOptions:
    return RunOptions(strategy=strategy, run_id="run", rounds=2, reseed_rounds=True, patience=2, max_epochs=3)


def push_only(out: Path, strategy: str) -> tuple[RunResult, FakeFederation]:
    fake = fake_federation(SAMPLES)
    fed = fake.federation()
    run = Coordinator(
        fed, PLAN, out, _options(strategy), initial_weights=_start(), clients=fake.clients(fed)
    ).run()
    return run, fake


@pytest.mark.parametrize("strategy", ["fedavg", "iil", "ciil"])
def test_a_push_site_and_a_pull_site_match_push_only(tmp_path: Path, strategy: str) -> None:
    reference, ref_fake = push_only(tmp_path / "push", strategy)
    push = {"name": "site-1", "url": "http://site-1.test", "token": "tok-site-1"}
    env = relay_env(tmp_path / "mixed", ["site-2"], push=[push])
    fed = env.federation()
    assert fed.pull_names == ["site-2"]
    site1, site2 = FakeAgent("site-1", SAMPLES["site-1"]), FakeAgent("site-2", SAMPLES["site-2"])
    store = env.store()
    try:
        clients = site_clients(
            fed, store=store, transport=httpx.MockTransport(site1.handle), sleep=lambda _s: None
        )
        assert isinstance(clients["site-1"], AgentClient)
        assert isinstance(clients["site-2"], RelaySiteClient)
        with (
            relay_in_thread(store) as server,
            PullSiteThread(server.url, env.tokens["site-2"], site2, chunk_bytes=1024) as pulled,
        ):
            out = tmp_path / "mixed" / "out"
            mixed = Coordinator(
                fed, PLAN, out, _options(strategy), initial_weights=_start(), clients=clients
            ).run()
        assert pulled.errors == []
    finally:
        store.close()
    # The pull site ran what the push-only site-2 ran: the same plans, as tasks from the relay.
    trained = [t["plan"] for t in pulled.tasks if t["kind"] == "train"]
    assert trained == ref_fake.agents["site-2"].trained
    evaluated = [t["job_id"] for t in pulled.tasks if t["kind"] == "evaluate"]
    assert evaluated == ref_fake.agents["site-2"].evaluated
    assert site1.trained == ref_fake.agents["site-1"].trained
    for name, tensor in reference.final_weights.items():
        assert torch.equal(tensor, mixed.final_weights[name]), name
    ref_rounds, mixed_rounds = results(tmp_path / "push")["rounds"], results(out)["rounds"]
    assert [r["weighted_dice"] for r in mixed_rounds] == [r["weighted_dice"] for r in ref_rounds]
    for ref, got in zip(ref_rounds, mixed_rounds, strict=True):
        if "site-2" in ref["training"]:
            assert got["training"]["site-2"]["update_sha256"] == ref["training"]["site-2"]["update_sha256"]
            assert got["training"]["site-2"]["bytes_received"] > 0
    assert results(out)["site_info"]["site-2"]["site_id"] == "site-2"
    assert results(out)["pull_sites"] == ["site-2"]


def test_the_strategy_sets_what_an_expired_lease_does(tmp_path: Path) -> None:
    env = relay_env(
        tmp_path, ["site-2"], push=[{"name": "site-1", "url": "http://site-1.test", "token": "t"}]
    )
    fed = env.federation()
    store = env.store()
    try:
        for strategy, policy in (("fedavg", "requeue"), ("iil", "fail"), ("ciil", "fail")):
            clients = site_clients(fed, store=store)
            Coordinator(
                fed,
                PLAN,
                tmp_path / strategy,
                RunOptions(strategy=strategy),
                initial_weights=_start(),
                clients=clients,
            )
            relay_client = clients["site-2"]
            assert isinstance(relay_client, RelaySiteClient)
            assert relay_client.on_expiry == policy, strategy
            for c in clients.values():
                c.close()
    finally:
        store.close()


def test_a_pull_site_that_never_connects_is_unreachable_after_the_wait(tmp_path: Path) -> None:
    env = relay_env(
        tmp_path,
        ["site-2"],
        push=[{"name": "site-1", "url": "http://site-1.test", "token": "t"}],
        register_wait_s=0.3,
        extra={"min_sites": 2},
    )
    fed = env.federation()
    site1 = FakeAgent("site-1", 5)
    store = env.store()
    try:
        clients = site_clients(fed, store=store, transport=httpx.MockTransport(site1.handle))
        coord = Coordinator(
            fed, PLAN, tmp_path / "out", _options("fedavg"), initial_weights=_start(), clients=clients
        )
        with pytest.raises(RunError, match=r"only 1 site.*unreachable: site-2"):
            coord.run()
    finally:
        store.close()


def test_pull_sites_need_the_relay_store(tmp_path: Path) -> None:
    env = relay_env(tmp_path, ["site-2"])
    with pytest.raises(RunError, match="site-2 is a pull site"):
        site_clients(env.federation(), store=None)
