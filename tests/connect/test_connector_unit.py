"""The connector's intake in process, against a scripted relay: a task that breaks the intake for
an unexpected reason is refused (not_runnable) without the error's text, which may name local
paths; and a lease reported gone while the task was being taken leaves the task lost, not accepted."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import load_config
from agent.connect.connector import Connector
from agent.connect.models import TaskState
from agent.connect.relay_client import RelayClient
from agent.service import SiteService
from coordinator.weights import encode, initial_weights
from tests.fixtures.agents import make_site, tiny_plan

TASK, LEASE = "ab" * 16, "cd" * 16


class Relay:
    def __init__(self) -> None:
        self.refusals: list[dict[str, Any]] = []
        self.blobs: dict[str, bytes] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/refuse"):
            self.refusals.append(json.loads(request.content))
            return httpx.Response(200, json={})
        if "/blobs/" in path:
            return httpx.Response(200, content=self.blobs[path.rsplit("/", 1)[1]])
        return httpx.Response(404, json={"detail": "not scripted"})


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Connector, Relay, SiteService]]:
    token = tmp_path / "relay.token"
    token.write_text("t\n")
    site = make_site(
        tmp_path / "fed",
        subjects=2,
        fmt="nifti",
        size=32,
        overrides={
            "connect": {"mode": "outbound", "coordinator_url": "http://relay.test", "token_file": str(token)}
        },
    )
    cfg = load_config(site.config_path)
    service = SiteService.open(cfg)
    relay = Relay()
    assert cfg.connect.token_file is not None
    connector = Connector(service, client=RelayClient(cfg.connect, transport=httpx.MockTransport(relay)))
    try:
        yield connector, relay, service
    finally:
        connector.client.close()
        service.db.dispose()


def _task(plan: dict[str, Any], weights: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(weights).hexdigest()
    return {
        "task_id": TASK,
        "lease_id": LEASE,
        "lease_expires_at": "2026-11-30T12:00:00+00:00",
        "kind": "train",
        "job_id": "r-1",
        "plan": plan,
        "weights": {"sha256": digest, "bytes": len(weights)},
    }


def test_an_unexpected_intake_error_is_refused_without_its_text(
    setup: tuple[Connector, Relay, SiteService], monkeypatch: pytest.MonkeyPatch
) -> None:
    connector, relay, service = setup
    plan = tiny_plan()
    weights = encode(initial_weights(plan))
    relay.blobs[_task(plan, weights)["weights"]["sha256"]] = weights

    def broken(*_: Any) -> None:
        raise RuntimeError("disk full at /srv/hospital/patients/secret")

    monkeypatch.setattr(service, "start_round", broken)
    connector._take_or_refuse(_task(plan, weights))
    assert len(relay.refusals) == 1
    refusal = relay.refusals[0]
    assert (refusal["lease_id"], refusal["code"]) == (LEASE, "not_runnable")
    assert "RuntimeError" in refusal["reason"] and "/srv" not in refusal["reason"]
    assert connector.tasks.get(TASK) is None  # nothing recorded as accepted


def test_a_lease_lost_while_taking_leaves_the_task_lost(setup: tuple[Connector, Relay, SiteService]) -> None:
    connector, relay, service = setup
    plan = tiny_plan()
    weights = encode(initial_weights(plan))
    relay.blobs[_task(plan, weights)["weights"]["sha256"]] = weights
    connector._lost_leases.add(LEASE)  # what a heartbeat during the download does
    connector._take_or_refuse(_task(plan, weights))
    row = connector.tasks.get(TASK)
    assert row is not None and row.state == TaskState.LOST
    assert service.get_round("r-1").status == "queued"  # the job stays for the task's return
    assert relay.refusals == []
