"""Leases: an agent killed during an upload loses its lease, the relay re-queues the task, and
the agent after its restart is refused (409) under the old lease and finishes under the new one,
sending only the missing chunks; a commit that arrives after its lease expired is refused with
409 and audited by both the agent and the relay, and the re-queued task then completes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.relay.app import create_relay_app
from coordinator.relay.store import RelayStore
from tests.connect.outbound import (
    audit_events,
    connector_tasks,
    jobs,
    outbound_site,
    plan_and_weights,
    start_dying_relay,
    task_ended,
    wait_for,
)
from tests.fixtures.agents import free_port, start_agent
from tests.fixtures.relay import FakeClock, relay_env
from tests.fixtures.servers import ThreadedServer

CHUNKS_BEFORE_DEATH = 4


def _events(store: RelayStore, task_id: str, action: str) -> list[Any]:
    return [e for e in store.events(task_id=task_id) if e.action == action]


@pytest.mark.timeout(420)
def test_agent_killed_mid_upload_is_refused_under_its_old_lease_and_resumes_under_the_new(
    tmp_path: Path,
) -> None:
    env = relay_env(tmp_path / "fed", pull=["pull-1"], lease_s=2.0, heartbeat_s=0.5)
    port = free_port()
    site = outbound_site(tmp_path / "site", f"http://127.0.0.1:{port}", env.token_files["pull-1"])
    plan, weights = plan_and_weights(channels=[16, 32])  # about 21 KB: 11 chunks of 2 KiB
    queue = env.store()
    task = queue.queue_task("pull-1", "train", "r-kill", plan, weights, on_expiry="requeue")
    pid_file = tmp_path / "agent.pid"
    relay = start_dying_relay(
        env, port, tmp_path / "relay.log", CHUNKS_BEFORE_DEATH, "--kill-pid-file", str(pid_file)
    )
    agent = None
    try:
        wait_for("the relay answers", lambda: _answers(port), timeout=60)
        agent = start_agent(site.config_path)
        pid_file.write_text(str(agent.process.pid))
        assert agent.process.wait(timeout=300) == -9, agent.log_text()[-3000:]
        received = _events(queue, task.task_id, "chunk.received")
        before = len(received)
        assert before >= CHUNKS_BEFORE_DEATH
        # The lease the agent held when it died: the one its chunks came under.
        kill_lease = received[-1].details["lease_id"]

        def expired() -> bool:
            queue.sweep()  # the relay's own sweep runs on requests, and none come now
            return any(
                e.details["lease_id"] == kill_lease for e in _events(queue, task.task_id, "lease.expired")
            )

        wait_for("the lease expires and the task is re-queued", expired, timeout=60)
        assert _events(queue, task.task_id, "task.requeued")
        agent = start_agent(site.config_path)
        done = wait_for(
            "the round is committed under a new lease", task_ended(queue, task.task_id), log=agent.log_text
        )
    finally:
        if agent is not None:
            agent.stop()
        relay.terminate()
        relay.wait(30)
    assert done.status == "completed", done.error

    leases = [e.details["lease_id"] for e in _events(queue, task.task_id, "task.leased")]
    assert leases[-2] == kill_lease
    attempts = [e["details"] for e in audit_events(site, "connect.upload_attempt")]
    # After the restart the agent first tried its old lease: refused (409), given up at once.
    stale = [a for a in attempts if a["lease_id"] == kill_lease]
    assert [a["outcome"] for a in stale] == ["lease_lost"] and stale[0]["chunks_sent"] == 0
    lost = {
        e["details"]["lease_id"]: e["details"]["reason"] for e in audit_events(site, "connect.lease_lost")
    }
    assert "HTTP 409" in lost[kill_lease] and "expired" in lost[kill_lease]
    # ... and the relay recorded the refusal on its side.
    refused = _events(queue, task.task_id, "upload.refused")
    assert [e.details["lease_id"] for e in refused] == [kill_lease], [e.details for e in refused]
    # Under the new lease only the chunks the relay did not have were sent.
    fresh = [a for a in attempts if a["lease_id"] == leases[-1]]
    assert fresh[-1]["outcome"] == "committed"
    assert fresh[-1]["chunks_present"] == before
    assert fresh[-1]["chunks_sent"] == fresh[-1]["chunks_total"] - before
    # One training only: the re-queued task found the finished round (the idempotent start).
    assert jobs(site) == [("train", "r-kill", "completed")]
    shas = {e["details"]["sha256"] for e in audit_events(site, "egress.sent")}
    assert shas == {done.update_sha256}
    assert connector_tasks(site) == [(task.task_id, "committed")]


def _answers(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False


class ExpireBeforeFirstCommit:
    """Test hook around the real relay app: when the first commit arrives, the relay's clock
    first moves past every lease and the relay sweeps, so that this commit is late."""

    def __init__(self, app: Any, store: RelayStore, clock: FakeClock) -> None:
        self.app = app
        self.store = store
        self.clock = clock
        self.fired = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/commit") and not self.fired:
            self.fired = True
            self.clock.advance(3600)
            self.store.sweep()
        await self.app(scope, receive, send)


@pytest.mark.timeout(300)
def test_a_commit_after_the_lease_expired_is_refused_409_and_audited_on_both_sides(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "fed", pull=["pull-1"], lease_s=30.0, heartbeat_s=0.5)
    clock = FakeClock()
    store = env.store(clock=clock)
    plan, weights = plan_and_weights()
    task = store.queue_task("pull-1", "evaluate", "e-late", plan, weights, on_expiry="requeue")
    with ThreadedServer(ExpireBeforeFirstCommit(create_relay_app(store), store, clock)) as relay:
        url = f"http://127.0.0.1:{relay.port}"
        site = outbound_site(tmp_path / "site", url, env.token_files["pull-1"])
        agent = start_agent(site.config_path)
        try:
            done = wait_for(
                "the re-queued evaluation is committed", task_ended(store, task.task_id), log=agent.log_text
            )
        finally:
            agent.stop()
    assert done.status == "completed" and "dice" in (done.metrics or {})
    leases = [e.details["lease_id"] for e in _events(store, task.task_id, "task.leased")]
    assert len(leases) == 2
    assert len(_events(store, task.task_id, "task.requeued")) == 1
    # The relay's side: the late commit refused, with the reason; the next one accepted.
    refused = _events(store, task.task_id, "commit.refused")
    assert [e.details["lease_id"] for e in refused] == [leases[0]]
    assert "expired" in refused[0].details["reason"] and "re-queued" in refused[0].details["reason"]
    assert [e.details["lease_id"] for e in _events(store, task.task_id, "commit.accepted")] == [leases[1]]
    # The agent's side: the same refusal, its status and reason, then the commit under the new lease.
    agent_refused = [e["details"] for e in audit_events(site, "connect.commit_refused")]
    assert len(agent_refused) == 1
    assert (agent_refused[0]["lease_id"], agent_refused[0]["status"]) == (leases[0], 409)
    assert "expired" in agent_refused[0]["reason"]
    assert [e["details"]["lease_id"] for e in audit_events(site, "connect.commit")] == [leases[1]]
    assert "the relay refused the commit of task" in agent.log_text()
    # The evaluation ran once; the re-queued task found it done.
    assert jobs(site) == [("evaluate", "e-late", "completed")]
    assert connector_tasks(site) == [(task.task_id, "committed")]
