"""The standalone relay process and the coordinator's store on the same directory.

The coordinator (this test process) queues a task and reads its outcome through its own
`RelayStore`; the site talks to the relay in a child process, which is SIGKILLed mid-upload
and started again: the chunks it had stay, and the upload ends with the missing ones only.
"""

from __future__ import annotations

import os
from pathlib import Path

from coordinator.relay.client import RelaySiteClient
from tests.fixtures.relay import ProtocolAgent, RelayProcess, relay_env, sha256, split_chunks


def test_a_killed_relay_keeps_its_chunks_and_the_coordinator_sees_the_commit(tmp_path: Path) -> None:
    env = relay_env(tmp_path, ["site-p"], lease_s=30, heartbeat_s=5)
    store = env.store()
    relay = RelayProcess(env).start()
    agent = ProtocolAgent(relay.url, env.tokens["site-p"])
    try:
        assert agent.register({"site_id": "site-p", "datasets": []}).status_code == 200
        client = RelaySiteClient("site-p", store, poll_interval=0.1)
        assert client.info() == {"site_id": "site-p", "datasets": []}  # written by the other process
        job = client.start_round({"round_id": "r1", "dataset": "brain"}, b"global weights")
        task = agent.next_task(wait=5).json()["task"]
        assert task["job_id"] == job
        assert agent.blob(task["weights"]["sha256"]).content == b"global weights"
        data = os.urandom(5 * 64 * 1024 + 123)
        parts = split_chunks(data)
        for part in parts[:3]:
            assert agent.put_chunk(task["task_id"], task["lease_id"], part).status_code == 201
        relay.kill()
        relay.start()
        have = agent.have(task["task_id"], task["lease_id"]).json()["have"]
        assert sorted(have) == sorted({sha256(p) for p in parts[:3]})
        leftover = [
            p.name for p in (env.relay_dir / "chunks" / task["task_id"]).iterdir() if p.name not in have
        ]
        assert leftover == []  # no temporary or half chunk under any name
        for part in parts[3:]:
            assert agent.put_chunk(task["task_id"], task["lease_id"], part).status_code == 201
        commit = agent.commit(
            task["task_id"], task["lease_id"], [sha256(p) for p in parts], sha256(data), len(data)
        )
        assert commit.status_code == 200, commit.text
        status = client.wait("round", job, timeout=10)
        assert status.update_sha256 == sha256(data)
        assert client.download_update(job, status.update_sha256) == data
    finally:
        agent.close()
        relay.stop()
        store.close()
