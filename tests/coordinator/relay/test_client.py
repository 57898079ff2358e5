"""`RelaySiteClient`: the runner's side of a pull site, with a thread playing the site over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coordinator.errors import AgentError, AgentPlanRefused, AgentUnreachable, JobFailed, JobTimeout
from coordinator.relay.client import RelaySiteClient
from coordinator.relay.server import RelayServer
from coordinator.relay.store import RelayStore
from coordinator.weights import decode, encode
from tests.fixtures.coordinator import FakeAgent, toy_weights
from tests.fixtures.relay import ProtocolAgent, PullSiteThread, RelayEnv, relay_env, relay_in_thread

PLAN = {"dataset": "brain", "round_id": "run-r001-site-p"}


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The toy model as the runner sends it (every tensor float32: the codec carries floats only)."""
    return {k: v.to(torch.float32) for k, v in toy_weights(seed).items()}


@pytest.fixture
def env(tmp_path: Path) -> RelayEnv:
    return relay_env(tmp_path, ["site-p"])


@pytest.fixture
def store(env: RelayEnv) -> Iterator[RelayStore]:
    s = env.store()
    yield s
    s.close()


@pytest.fixture
def server(store: RelayStore) -> Iterator[RelayServer]:
    with relay_in_thread(store) as srv:
        yield srv


@pytest.fixture
def client(store: RelayStore) -> RelaySiteClient:
    return RelaySiteClient("site-p", store, poll_interval=0.1, register_wait_s=5)


def test_info_before_the_site_connects_names_it(client: RelaySiteClient) -> None:
    with pytest.raises(AgentUnreachable, match="site-p has not connected to the relay"):
        client.info()
    assert client.wait_registered(timeout=0) is False


def test_a_round_and_an_evaluation_through_the_relay(
    env: RelayEnv, server: RelayServer, client: RelaySiteClient
) -> None:
    fake = FakeAgent("site-p", 17)
    blob = encode(weights())
    with PullSiteThread(server.url, env.tokens["site-p"], fake, chunk_bytes=1024) as site:
        assert client.wait_registered()
        assert client.info()["datasets"] == [{"name": "brain"}]
        seen: list[str] = []
        job = client.start_round(PLAN, blob)
        assert job == PLAN["round_id"]
        assert client.start_round(PLAN, blob) == job  # the same job again: the same task
        status = client.wait("round", job, timeout=20, on_status=lambda s: seen.append(s.status))
        assert status.status == "completed" and status.num_samples == 17
        assert seen[-1] == "completed"
        update = client.download_update(job, status.update_sha256)
        expected = fake.train(PLAN, weights())
        got = decode(update)
        assert sorted(got) == sorted(expected)
        assert all(bool((got[k] == expected[k]).all()) for k in expected)
        sent, received = client.transfer.snapshot()
        assert received >= len(update) and sent >= len(blob)
        ev = client.start_evaluation({**PLAN, "round_id": "run-eval-site-p"}, blob)
        result = client.wait("evaluation", ev, timeout=20)
        assert result.metrics["dice"] == pytest.approx(fake.dice(weights()))
        assert site.errors == []
    with pytest.raises(AgentError, match="already queued") as err:
        client.start_round(PLAN, encode(weights(1)))
    assert err.value.status_code == 409


def test_a_plan_the_site_has_not_approved(
    env: RelayEnv, server: RelayServer, client: RelaySiteClient
) -> None:
    with PullSiteThread(server.url, env.tokens["site-p"], FakeAgent("site-p", 3), refuse_plans=True):
        job = client.start_round(PLAN, encode(weights()))
        with pytest.raises(AgentPlanRefused, match="has not approved plan") as err:
            client.wait("round", job, timeout=20)
    assert err.value.plan_hash == "ab" * 32
    assert "fedsite plans approve" in str(err.value)


def test_a_failed_job_and_a_refused_task_raise_job_failed(
    env: RelayEnv, server: RelayServer, client: RelaySiteClient
) -> None:
    agent = ProtocolAgent(server.url, env.tokens["site-p"])
    try:
        job = client.start_round(PLAN, encode(weights()))
        task = agent.next_task(5).json()["task"]
        agent.heartbeat(
            {
                "task_id": task["task_id"],
                "lease_id": task["lease_id"],
                "status": "failed",
                "error": "disk full",
            }
        ).raise_for_status()
        with pytest.raises(JobFailed, match=r"ended as failed.*disk full"):
            client.wait("round", job, timeout=20)
        job2 = client.start_round({**PLAN, "round_id": "r2"}, encode(weights()))
        task = agent.next_task(5).json()["task"]
        agent.refuse(task["task_id"], task["lease_id"], "weights_mismatch", "hash differs").raise_for_status()
        with pytest.raises(JobFailed, match=r"refused by site site-p \(weights_mismatch\): hash differs"):
            client.wait("round", job2, timeout=20)
    finally:
        agent.close()


def test_timeout_and_cancel(env: RelayEnv, server: RelayServer, client: RelaySiteClient) -> None:
    job = client.start_round(PLAN, encode(weights()))
    with pytest.raises(JobTimeout, match="did not finish within"):
        client.wait("round", job, timeout=0.3)
    agent = ProtocolAgent(server.url, env.tokens["site-p"])
    try:
        task = agent.next_task(5).json()["task"]
        client.cancel_round(job)
        answer = agent.heartbeat({"task_id": task["task_id"], "lease_id": task["lease_id"]}).json()
        assert answer["leases"][task["task_id"]]["cancel"] is True
        with pytest.raises(JobFailed, match="ended as cancelled"):
            client.wait("round", job, timeout=5)
    finally:
        agent.close()


def test_wait_stops_when_the_coordinator_abandons_the_run(client: RelaySiteClient) -> None:
    stop = threading.Event()
    stop.set()
    job = client.start_round(PLAN, encode(weights()))
    with pytest.raises(JobFailed, match="abandoned"):
        client.wait("round", job, timeout=30, should_stop=stop.is_set)
