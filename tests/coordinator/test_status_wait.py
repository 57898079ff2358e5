"""The coordinator's long poll (federation `status_wait`): every status request asks the agent
to wait for the job's end; an agent that answers at once anyway (one that predates `?wait=`)
is asked again after `poll_interval`, as before; and the setting is checked against the read
timeout it must fit in."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from coordinator.client import AgentClient
from coordinator.errors import FederationError
from coordinator.federation import Federation, parse_federation

ROUND = "r-1"


def _federation(**extra: object) -> Federation:
    doc = {"agents": [{"name": "site-x", "url": "http://127.0.0.1:9", "token": "tok"}], **extra}
    return parse_federation(doc, source=Path("federation.yaml"))


def _agent(
    statuses: list[str], *, seconds_per_wait: float
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """An agent that answers the statuses in turn; one that honours `wait` takes SECONDS_PER_WAIT."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status = statuses[min(len(seen) - 1, len(statuses) - 1)]
        if "wait" in request.url.params and status == "running":
            time.sleep(seconds_per_wait)
        body = {"round_id": ROUND, "status": status, "progress": {}, "metrics": {}, "update_sha256": "a" * 64}
        return httpx.Response(200, content=json.dumps(body), headers={"content-type": "application/json"})

    return httpx.MockTransport(handle), seen


def _client(fed: Federation, transport: httpx.MockTransport, sleeps: list[float]) -> AgentClient:
    return AgentClient.for_federation(fed, transport=transport, sleep=sleeps.append)["site-x"]


def test_each_status_request_asks_the_agent_to_wait_and_none_is_followed_by_a_pause() -> None:
    fed = _federation(poll_interval=0.2, status_wait=4)
    transport, seen = _agent(["running", "running", "completed"], seconds_per_wait=0.3)
    sleeps: list[float] = []
    with _client(fed, transport, sleeps) as client:
        status = client.wait("round", ROUND, timeout=60)
    assert status.status == "completed"
    assert [r.url.params.get("wait") for r in seen] == ["4.000"] * 3
    # Each answer took longer than poll_interval: the next request went at once.
    assert sleeps == []


def test_an_agent_that_answers_at_once_is_polled_every_poll_interval() -> None:
    fed = _federation(poll_interval=0.5, status_wait=4)
    transport, seen = _agent(["queued", "running", "running", "completed"], seconds_per_wait=0.0)
    sleeps: list[float] = []
    with _client(fed, transport, sleeps) as client:
        status = client.wait("round", ROUND, timeout=60)
    assert status.status == "completed" and len(seen) == 4
    assert len(sleeps) == 3 and all(0 < s <= 0.5 for s in sleeps), sleeps


def test_status_wait_zero_polls_plainly() -> None:
    fed = _federation(poll_interval=0.5, status_wait=0)
    transport, seen = _agent(["running", "completed"], seconds_per_wait=0.0)
    sleeps: list[float] = []
    with _client(fed, transport, sleeps) as client:
        client.wait("round", ROUND, timeout=60)
    assert all("wait" not in r.url.params for r in seen)
    assert len(sleeps) == 1


def test_the_wait_never_outlasts_the_jobs_own_timeout() -> None:
    fed = _federation(poll_interval=0.1, status_wait=20)
    transport, seen = _agent(["running", "completed"], seconds_per_wait=0.0)
    with _client(fed, transport, []) as client:
        client.wait("round", ROUND, timeout=3)
    first, second = (float(r.url.params["wait"]) for r in seen)
    assert first == 20 and 0 < second <= 3


def test_status_wait_defaults_to_five_seconds() -> None:
    assert _federation().status_wait == 5


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (
            {"status_wait": 30, "timeouts": {"read": 30}},
            "status_wait (30 s) must be shorter than timeouts.read (30 s)",
        ),
        ({"status_wait": 31, "timeouts": {"read": 120}}, "status_wait"),
        ({"status_wait": -1}, "status_wait"),
    ],
)
def test_a_status_wait_that_cannot_work_is_refused_by_name(extra: dict[str, object], needle: str) -> None:
    with pytest.raises(FederationError, match=r"status_wait") as info:
        _federation(**extra)
    assert needle in str(info.value)
