"""The connector in process, against a scripted relay: a task that breaks the intake for an
unexpected reason is refused (not_runnable) without the error's text, which may name local
paths; a lease reported gone while the task was being taken leaves the task lost, not accepted;
and a secure-aggregation answer whose upload gave up is committed by a later upload pass while
its lease lasts, and given up (audited) once it has run out."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
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
        self.commits: list[dict[str, Any]] = []
        self.unreachable_commits = 0  # the next so many commits fail with 503
        self.lease_s = 12.5

    def commit(self, request: httpx.Request) -> httpx.Response:
        self.commits.append(json.loads(request.content))
        if self.unreachable_commits:
            self.unreachable_commits -= 1
            return httpx.Response(503, json={"detail": "relay restarting"})
        return httpx.Response(200, json={"status": "committed"})

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/refuse"):
            self.refusals.append(json.loads(request.content))
            return httpx.Response(200, json={})
        if path.endswith("/register"):
            limits = {"heartbeat_s": 1.0, "lease_s": self.lease_s, "chunk_bytes": 1024, "max_wait_s": 5.0}
            return httpx.Response(200, json={"site": "site-1", **limits})
        if path.endswith("/commit"):
            return self.commit(request)
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
            "connect": {
                "mode": "outbound",
                "coordinator_url": "http://relay.test",
                "token_file": str(token),
                "upload_attempts": 1,  # a failed commit gives up at once: the retry is the pass's
            }
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


def _secagg_task() -> dict[str, Any]:
    return {
        "task_id": TASK,
        "lease_id": LEASE,
        "lease_expires_at": "2026-11-30T12:00:00+00:00",
        "kind": "secagg",
        "job_id": "r-1",
        "plan": {"round_id": "r-1", "step": "advertise", "message": {"sites": ["site-1"]}},
    }


def _advertised(monkeypatch: pytest.MonkeyPatch, service: SiteService) -> list[str]:
    """The site's step, counted: it runs once, whatever happens to its answer's upload."""
    runs: list[str] = []

    def advertise(round_id: str, _message: object, _actor: str) -> dict[str, Any]:
        runs.append(round_id)
        return {"keys": "k-1"}

    monkeypatch.setattr(service, "secagg_advertise", advertise)
    return runs


def test_a_secagg_answer_whose_upload_gave_up_is_committed_by_the_next_pass(
    setup: tuple[Connector, Relay, SiteService], monkeypatch: pytest.MonkeyPatch
) -> None:
    connector, relay, service = setup
    runs = _advertised(monkeypatch, service)
    relay.unreachable_commits = 2
    connector._take_or_refuse(_secagg_task())
    assert len(relay.commits) == 1 and list(connector._secagg_pending) == [LEASE]
    connector.deliver_completed()  # the relay still answers 503
    assert len(relay.commits) == 2 and list(connector._secagg_pending) == [LEASE]
    assert connector.audit.events(action="connect.commit") == []
    assert connector.audit.events(action="connect.commit_refused") == []
    connector.deliver_completed()
    assert len(relay.commits) == 3 and connector._secagg_pending == {}
    assert runs == ["r-1"]  # answered once, committed on the third try
    assert all(c["result"] == {"metrics": {"answer": {"keys": "k-1"}}} for c in relay.commits)
    assert all(c["lease_id"] == LEASE for c in relay.commits)
    [commit] = connector.audit.events(action="connect.commit")
    assert commit["details"]["step"] == "advertise" and commit["details"]["outcome"] == "committed"
    connector.deliver_completed()
    assert len(relay.commits) == 3  # nothing left to send


def test_a_secagg_answer_is_given_up_once_its_lease_has_run_out(
    setup: tuple[Connector, Relay, SiteService], monkeypatch: pytest.MonkeyPatch
) -> None:
    connector, relay, service = setup
    _advertised(monkeypatch, service)
    relay.unreachable_commits = 5
    connector._take_or_refuse(_secagg_task())
    assert list(connector._secagg_pending) == [LEASE]
    over = dataclasses.replace(connector._secagg_pending[LEASE], deadline=time.monotonic() - 1.0)
    connector._secagg_pending[LEASE] = over
    connector.deliver_completed()
    assert len(relay.commits) == 2 and connector._secagg_pending == {}
    [refused] = connector.audit.events(action="connect.commit_refused")
    assert refused["details"]["step"] == "advertise" and refused["details"]["outcome"] == "gave_up"
    connector.deliver_completed()
    assert len(relay.commits) == 2  # not tried again


def test_a_secagg_answer_is_kept_for_the_lease_the_relay_registered(
    setup: tuple[Connector, Relay, SiteService], monkeypatch: pytest.MonkeyPatch
) -> None:
    connector, relay, service = setup
    _advertised(monkeypatch, service)
    connector._register(0)
    assert connector.lease_s == relay.lease_s
    relay.unreachable_commits = 1
    before = time.monotonic()
    connector._take_or_refuse(_secagg_task())
    deadline = connector._secagg_pending[LEASE].deadline
    assert before + relay.lease_s <= deadline <= time.monotonic() + relay.lease_s
