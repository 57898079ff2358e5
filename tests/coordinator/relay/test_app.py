"""The relay's HTTP protocol on 127.0.0.1, spoken by `ProtocolAgent` (plain httpx calls)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coordinator.relay.models import RelayTask
from coordinator.relay.server import RelayServer
from coordinator.relay.store import RelayStore
from tests.fixtures.relay import (
    CHUNK_BYTES,
    FakeClock,
    ProtocolAgent,
    RelayEnv,
    relay_env,
    relay_in_thread,
    sha256,
    split_chunks,
)

PLAN = {"dataset": "brain", "round_id": "run-r001"}


def task_row(store: RelayStore, task_id: str) -> RelayTask:
    """The task's row, which the test knows exists."""
    task = store.get_task(task_id)
    assert task is not None, task_id
    return task


@pytest.fixture
def env(tmp_path: Path) -> RelayEnv:
    return relay_env(tmp_path, ["site-a", "site-b"], max_wait_s=10.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(env: RelayEnv, clock: FakeClock) -> Iterator[RelayStore]:
    s = env.store(clock=clock)
    yield s
    s.close()


@pytest.fixture
def server(store: RelayStore) -> Iterator[RelayServer]:
    with relay_in_thread(store) as srv:
        yield srv


@pytest.fixture
def a(env: RelayEnv, server: RelayServer) -> Iterator[ProtocolAgent]:
    agent = ProtocolAgent(server.url, env.tokens["site-a"])
    yield agent
    agent.close()


@pytest.fixture
def b(env: RelayEnv, server: RelayServer) -> Iterator[ProtocolAgent]:
    agent = ProtocolAgent(server.url, env.tokens["site-b"])
    yield agent
    agent.close()


def leased(agent: ProtocolAgent) -> dict:
    resp = agent.next_task(0)
    assert resp.status_code == 200, resp.text
    task: dict = resp.json()["task"]
    return task


def test_register_answers_the_limits_and_keeps_the_info(a: ProtocolAgent, store: RelayStore) -> None:
    info = {"site_id": "site-a", "version": "1.2", "datasets": [{"name": "brain", "num_train": 4}]}
    resp = a.register(info, running=["t1"])
    assert resp.status_code == 200
    assert resp.json() == {
        "site": "site-a",
        "heartbeat_s": 0.5,
        "lease_s": 2.0,
        "chunk_bytes": CHUNK_BYTES,
        "max_wait_s": 10.0,
    }
    assert store.site_info("site-a") == info
    assert store.site_info("site-b") is None
    [event] = store.events(action="site.registered")
    assert event.site == "site-a" and event.details["running"] == ["t1"]


def test_unknown_or_missing_token_is_401(server: RelayServer) -> None:
    for headers in ({"Authorization": "Bearer nope"}, {}, {"Authorization": "Basic abc"}):
        resp = httpx.post(f"{server.url}/v1/relay/register", json={"info": {}}, headers=headers)
        assert resp.status_code == 401
        assert "token" in resp.json()["detail"]
    assert httpx.get(f"{server.url}/v1/relay/tasks/next", params={"wait": 0}).status_code == 401


def test_long_poll_answers_when_a_task_is_queued_and_other_requests_go_on(
    a: ProtocolAgent, b: ProtocolAgent, store: RelayStore
) -> None:
    answer: dict[str, httpx.Response] = {}
    poller = threading.Thread(target=lambda: answer.setdefault("poll", a.next_task(wait=10)))
    poller.start()
    # While site-a's poll waits in the thread pool, other requests are answered.
    for _ in range(3):
        assert b.register().status_code == 200
        assert b.next_task(0).status_code == 204
    store.queue_task("site-a", "train", "j1", PLAN, b"weights")
    poller.join(15)
    resp = answer["poll"]
    assert resp.status_code == 200
    task = resp.json()["task"]
    assert task["kind"] == "train" and task["job_id"] == "j1" and task["plan"] == PLAN
    assert task["weights"] == {"sha256": sha256(b"weights"), "bytes": 7}
    assert task["lease_expires_at"].endswith("+00:00")


def test_an_empty_poll_is_204(a: ProtocolAgent) -> None:
    resp = a.next_task(0)
    assert resp.status_code == 204 and resp.content == b""


def test_blobs_and_tasks_are_per_site(a: ProtocolAgent, b: ProtocolAgent, store: RelayStore) -> None:
    store.queue_task("site-a", "train", "j1", PLAN, b"weights of a")
    assert b.next_task(0).status_code == 204
    assert b.blob(sha256(b"weights of a")).status_code == 404
    task = leased(a)
    resp = a.blob(task["weights"]["sha256"])
    assert resp.status_code == 200 and resp.content == b"weights of a"
    assert resp.headers["X-Content-SHA256"] == sha256(b"weights of a")
    assert b.have(task["task_id"], task["lease_id"]).status_code == 404
    assert b.put_chunk(task["task_id"], task["lease_id"], b"x").status_code == 404
    assert a.blob("not-a-hash").status_code == 400


def test_heartbeat_renews_and_reports(a: ProtocolAgent, store: RelayStore, clock: FakeClock) -> None:
    store.queue_task("site-a", "train", "j1", PLAN, b"w")
    task = leased(a)
    clock.advance(1.5)
    resp = a.heartbeat({"task_id": task["task_id"], "lease_id": task["lease_id"], "progress": {"epoch": 1}})
    assert resp.status_code == 200
    lease = resp.json()["leases"][task["task_id"]]
    assert lease["valid"] is True and lease["cancel"] is False
    assert resp.json()["heartbeat_s"] == 0.5
    clock.advance(1.5)  # past the first expiry, not past the renewed one
    assert a.have(task["task_id"], task["lease_id"]).status_code == 200
    assert task_row(store, task["task_id"]).progress == {"epoch": 1}
    bad = a.heartbeat({"task_id": task["task_id"], "lease_id": task["lease_id"], "status": "exploded"})
    assert bad.status_code == 400 and "exploded" in bad.json()["detail"]


def test_late_commit_after_expiry_is_409_and_audited(
    a: ProtocolAgent, store: RelayStore, clock: FakeClock
) -> None:
    store.queue_task("site-a", "train", "j1", PLAN, b"w")
    task = leased(a)
    data = os.urandom(3000)
    assert a.put_chunk(task["task_id"], task["lease_id"], data).status_code == 201
    clock.advance(2.5)  # the agent was gone for longer than its lease
    resp = a.commit(task["task_id"], task["lease_id"], [sha256(data)], sha256(data), len(data))
    assert resp.status_code == 409
    detail = resp.json()["detail"]
    assert f"lease {task['lease_id']}" in detail and "expired at 2026-01-01T12:00:02+00:00" in detail
    assert "re-queued" in detail
    assert [e.details["reason"] for e in store.events(action="commit.refused")] == [detail]
    assert a.have(task["task_id"], task["lease_id"]).status_code == 409
    # The re-queued task comes back with a new lease, the same job and the chunk already there.
    again = leased(a)
    assert (again["task_id"], again["job_id"]) == (task["task_id"], "j1")
    assert a.have(again["task_id"], again["lease_id"]).json() == {"have": [sha256(data)]}
    ok = a.commit(again["task_id"], again["lease_id"], [sha256(data)], sha256(data), len(data))
    assert ok.status_code == 200 and ok.json() == {"task_id": task["task_id"], "sha256": sha256(data)}


def test_chunk_checks(a: ProtocolAgent, store: RelayStore) -> None:
    store.queue_task("site-a", "train", "j1", PLAN, b"w")
    task = leased(a)
    tid, lid = task["task_id"], task["lease_id"]
    resp = a.put_chunk(tid, lid, b"some bytes", name="0" * 64)
    assert resp.status_code == 400 and sha256(b"some bytes") in resp.json()["detail"]
    big = b"x" * (CHUNK_BYTES + 1)
    assert a.put_chunk(tid, lid, big).status_code == 413
    assert a.put_chunk(tid, "0" * 32, b"ok").status_code == 409
    ok = a.put_chunk(tid, lid, b"ok")
    assert ok.status_code == 201 and ok.json() == {"sha256": sha256(b"ok"), "bytes": 2}
    assert a.have(tid, lid).json() == {"have": [sha256(b"ok")]}


def test_commit_checks_over_http(a: ProtocolAgent, store: RelayStore) -> None:
    store.queue_task("site-a", "train", "j1", PLAN, b"w")
    task = leased(a)
    tid, lid = task["task_id"], task["lease_id"]
    data = os.urandom(2 * CHUNK_BYTES + 10)
    parts = split_chunks(data)
    manifest = [sha256(p) for p in parts]
    a.put_chunk(tid, lid, parts[0]).raise_for_status()
    missing = a.commit(tid, lid, manifest, sha256(data), len(data))
    assert missing.status_code == 400 and manifest[1] in missing.json()["detail"]
    for part in parts[1:]:
        a.put_chunk(tid, lid, part).raise_for_status()
    wrong = a.commit(tid, lid, manifest, "2" * 64, len(data))
    assert wrong.status_code == 400 and sha256(data) in wrong.json()["detail"]
    assert a.commit(tid, lid, manifest, sha256(data), len(data)).status_code == 200
    assert a.commit(tid, lid, manifest, sha256(data), len(data)).status_code == 200  # idempotent
    assert store.read_update(task_row(store, tid)) == data


def test_refuse_and_evaluation_commit(a: ProtocolAgent, store: RelayStore) -> None:
    store.queue_task("site-a", "train", "j1", PLAN, b"w")
    store.queue_task("site-a", "evaluate", "e1", PLAN, b"w")
    train, evaluation = leased(a), leased(a)
    resp = a.refuse(train["task_id"], train["lease_id"], "plan_not_approved", "not approved here", "d" * 64)
    assert resp.status_code == 200
    assert task_row(store, train["task_id"]).status == "refused"
    bad = a.commit(evaluation["task_id"], evaluation["lease_id"], ["1" * 64], "1" * 64, 5)
    assert bad.status_code == 400 and "evaluation" in bad.json()["detail"]
    ok = a.commit(evaluation["task_id"], evaluation["lease_id"], [], None, 0, metrics={"dice": 0.7})
    assert ok.status_code == 200
    assert task_row(store, evaluation["task_id"]).metrics == {"dice": 0.7}


def test_bytes_are_counted_per_site(a: ProtocolAgent, b: ProtocolAgent, store: RelayStore) -> None:
    store.queue_task("site-a", "train", "j1", PLAN, b"w" * 5000)
    task = leased(a)
    sent_before, received_before = store.traffic("site-a").snapshot()
    a.blob(task["weights"]["sha256"]).raise_for_status()
    a.put_chunk(task["task_id"], task["lease_id"], b"u" * 7000).raise_for_status()
    sent, received = store.traffic("site-a").snapshot()
    assert sent - sent_before >= 5000 and received - received_before == 7000
    assert store.traffic("site-b").snapshot() == (0, 0)


def test_many_waiting_polls_do_not_starve_other_requests(
    a: ProtocolAgent, b: ProtocolAgent, store: RelayStore
) -> None:
    # More polls than the default thread pool of the other routes (40) wait at once.
    answers: list[int] = []
    pollers = [
        threading.Thread(target=lambda: answers.append(a.next_task(wait=10).status_code)) for _ in range(45)
    ]
    for t in pollers:
        t.start()
    try:
        assert b.register().status_code == 200
        assert b.heartbeat().status_code == 200
        # Answered while every poll still waits: none was queued behind them.
        assert all(t.is_alive() for t in pollers)
    finally:
        store.wake_all()
        for t in pollers:
            t.join(15)
        store.resume_polls()
    assert answers == [204] * 45
