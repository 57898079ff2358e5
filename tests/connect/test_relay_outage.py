"""The coordinator's relay goes away: killed (SIGKILL) in the middle of an update upload, or not
there at all when the agent starts. The agent backs off within its bounds, keeps no half-written
state, and finishes the work when the relay is back: the second upload sends exactly the chunks
the relay is missing, and the committed hash is the one the egress gate recorded."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from coordinator.relay.server import RelayServer
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
from tests.fixtures.relay import RelayProcess, relay_env

CHUNKS_BEFORE_DEATH = 3


@pytest.mark.timeout(420)
def test_relay_killed_mid_upload_resumes_with_only_the_missing_chunks(tmp_path: Path) -> None:
    # A long lease: the outage must not re-queue the task (that case is the lease tests').
    env = relay_env(tmp_path / "fed", pull=["pull-1"], lease_s=60.0, heartbeat_s=0.5)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    site = outbound_site(tmp_path / "site", url, env.token_files["pull-1"], chunk_bytes=2048)
    plan, weights = plan_and_weights(channels=[16, 32])  # an update of about 21 KB: 11 chunks
    queue = env.store()
    task = queue.queue_task("pull-1", "train", "r-resume", plan, weights)
    log_path = tmp_path / "relay.log"
    dying = start_dying_relay(env, port, log_path, CHUNKS_BEFORE_DEATH)
    agent = None
    relay = RelayProcess(env, port=port, log_path=log_path)
    try:
        agent = start_agent(site.config_path)
        assert dying.wait(timeout=300) == -signal.SIGKILL, log_path.read_text()
        # Exactly CHUNKS_BEFORE_DEATH chunks reached the relay's disk before it died.
        received = [e for e in queue.events(task_id=task.task_id) if e.action == "chunk.received"]
        assert len(received) == CHUNKS_BEFORE_DEATH
        relay.start()
        done = wait_for(
            "the round is committed after the restart", task_ended(queue, task.task_id), log=agent.log_text
        )
    finally:
        if agent is not None:
            agent.stop()
        relay.stop()
        if dying.poll() is None:
            dying.kill()
    assert done.status == "completed", done.error

    attempts = [
        e["details"]
        for e in audit_events(site, "connect.upload_attempt")
        if e["details"]["task_id"] == task.task_id
    ]
    total = attempts[0]["chunks_total"]
    assert total > CHUNKS_BEFORE_DEATH + 2
    first, last = attempts[0], attempts[-1]
    assert (first["chunks_present"], first["chunks_sent"]) == (0, CHUNKS_BEFORE_DEATH)
    assert first["outcome"].startswith("error: ")
    # Between them only failed attempts that sent nothing (the relay was still down).
    assert all(a["chunks_sent"] == 0 and a["outcome"].startswith("error: ") for a in attempts[1:-1])
    missing = total - CHUNKS_BEFORE_DEATH
    assert (last["outcome"], last["chunks_present"], last["chunks_sent"]) == (
        "committed",
        CHUNKS_BEFORE_DEATH,
        missing,
    )
    # The relay saw every chunk exactly once, across both of its lives.
    received = [e for e in queue.events(task_id=task.task_id) if e.action == "chunk.received"]
    assert len(received) == total == len({e.details["sha256"] for e in received})

    sent = [e["details"] for e in audit_events(site, "egress.sent") if e["details"]["round_id"] == "r-resume"]
    assert len(sent) == 1 and sent[0]["sha256"] == done.update_sha256
    commit = [
        e["details"] for e in audit_events(site, "connect.commit") if e["details"]["task_id"] == task.task_id
    ]
    assert commit == [
        {
            "task_id": task.task_id,
            "lease_id": last["lease_id"],
            "sha256": done.update_sha256,
            "bytes": sent[0]["bytes"],
            "chunks": total,
        }
    ]
    assert connector_tasks(site) == [(task.task_id, "committed")]


@pytest.mark.timeout(420)
def test_unreachable_relay_is_retried_with_bounded_backoff_and_picked_up_when_it_returns(
    tmp_path: Path,
) -> None:
    env = relay_env(tmp_path / "fed", pull=["pull-1"], lease_s=10.0, heartbeat_s=0.5)
    store = env.store()
    # The relay's socket is bound now (so no other process takes the port) but listens only
    # once the server starts: until then every connection is refused.
    server = RelayServer(store, "127.0.0.1", 0)
    port = server.port
    cap = 1.0
    site = outbound_site(
        tmp_path / "site", f"http://127.0.0.1:{port}", env.token_files["pull-1"], max_backoff_s=cap
    )
    agent = start_agent(site.config_path)
    try:
        pattern = re.compile(
            r"unreachable \(attempt (\d+)\): .*; next try in ([0-9.]+) s \(cap ([0-9.]+) s\)"
        )
        tries = wait_for(
            "five failed connection attempts",
            lambda: (found := pattern.findall(agent.log_text())) and len(found) >= 5 and found,
            log=agent.log_text,
        )
        # Consecutive attempts, each delay under its exponential ceiling and the cap.
        assert [int(n) for n, _, _ in tries] == list(range(1, len(tries) + 1))
        for n, delay, shown_cap in tries:
            assert float(shown_cap) == cap
            assert 0.0 <= float(delay) <= min(cap, 0.5 * 2 ** (int(n) - 1)) + 0.005
        # Nothing half-done while the relay is away: no task, no job, one audit event for the outage.
        assert connector_tasks(site) == [] and jobs(site) == []
        assert len(audit_events(site, "connect.disconnected")) == 1
        assert audit_events(site, "connect.registered") == []

        plan, weights = plan_and_weights()
        task = store.queue_task("pull-1", "train", "r-late", plan, weights)
        with server:
            done = wait_for(
                "the round is committed once the relay is up",
                task_ended(store, task.task_id),
                log=agent.log_text,
            )
    finally:
        agent.stop()
        server.stop()  # also closes the bound socket when the server never started
    assert done.status == "completed", done.error
    registered = audit_events(site, "connect.registered")
    assert len(registered) == 1 and registered[0]["details"]["failed_attempts"] >= 5
    assert jobs(site) == [("train", "r-late", "completed")]
    assert connector_tasks(site) == [(task.task_id, "committed")]
