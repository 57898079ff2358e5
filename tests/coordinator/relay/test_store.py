"""The relay's store without HTTP: tokens, queue, leases and their expiry, chunks and commits.

Leases expire when the test moves the store's clock (`FakeClock`), never by waiting. The tests
on the `store` fixture run on SQLite and on PostgreSQL (skipped without a server, except in CI).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.errors import Conflict, InvalidRequest, NotFound
from coordinator.federation import Federation, RelayLimits
from coordinator.relay.models import RelaySite, RelayTask
from coordinator.relay.store import RelayStore
from tests.fixtures.relay import FakeClock, sha256, split_chunks

LIMITS = RelayLimits(heartbeat_s=0.5, lease_s=2.0, chunk_bytes=64 * 1024, max_wait_s=1.0, max_requeues=3)
PLAN = {"dataset": "brain", "round_id": "run-r001-a"}


def task_row(store: RelayStore, task_id: str) -> RelayTask:
    """The task's row, which the test knows exists."""
    task = store.get_task(task_id)
    assert task is not None, task_id
    return task


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock, blank_db_url: str) -> Iterator[RelayStore]:
    """A relay on SQLite and on PostgreSQL (`relay.database_url`), its tables made by the store."""
    s = RelayStore(tmp_path / "relay", database_url=blank_db_url, limits=LIMITS, clock=clock)
    s.add_site("a", token="token-a")
    s.add_site("b", token="token-b")
    yield s
    s.close()


def lease(store: RelayStore, site: str = "a") -> dict:
    task = store.next_task(site, 0)
    assert task is not None
    return task


def actions(store: RelayStore, task_id: str) -> list[str]:
    return [e.action for e in store.events(task_id=task_id)]


def test_tokens_are_stored_as_their_sha256_only(store: RelayStore, tmp_path: Path) -> None:
    with store._tx() as s:
        row = s.get(RelaySite, "a")
        assert row is not None and row.token_sha256 == hashlib.sha256(b"token-a").hexdigest()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "relay").glob("relay.db*"))
    assert b"token-a" not in raw
    assert store.site_for_token("token-a") == "a"
    assert store.site_for_token("token-b") == "b"
    assert store.site_for_token("token-c") is None
    assert store.site_for_token("") is None
    with pytest.raises(Conflict, match="already has a token"):
        store.add_site("a")
    assert store.site_for_token(store.add_site("a", replace=True)) == "a"
    assert store.site_for_token("token-a") is None


def test_queue_is_idempotent_per_site_kind_and_job(store: RelayStore) -> None:
    t1 = store.queue_task("a", "train", "j1", PLAN, b"weights")
    assert store.queue_task("a", "train", "j1", PLAN, b"weights").task_id == t1.task_id
    with pytest.raises(Conflict, match="another weights"):
        store.queue_task("a", "train", "j1", PLAN, b"other weights")
    with pytest.raises(Conflict, match="another plan"):
        store.queue_task("a", "train", "j1", {**PLAN, "seed": 2}, b"weights")
    # Another kind or another site is another task.
    assert store.queue_task("a", "evaluate", "j1", PLAN, b"weights").task_id != t1.task_id
    assert store.queue_task("b", "train", "j1", PLAN, b"weights").task_id != t1.task_id
    with pytest.raises(NotFound, match="relay add-site c"):
        store.queue_task("c", "train", "j1", PLAN, b"weights")


def test_lease_is_renewed_by_heartbeats(store: RelayStore, clock: FakeClock) -> None:
    store.queue_task("a", "train", "j1", PLAN, b"w")
    task = lease(store)
    assert store.next_task("a", 0) is None  # leased tasks are not handed out twice
    assert task_row(store, task["task_id"]).status == "leased"
    entry = {"task_id": task["task_id"], "lease_id": task["lease_id"], "status": "running", "progress": 0.5}
    for _ in range(4):  # 4 x 1.5 s: twice the lease, kept alive by the heartbeats
        clock.advance(1.5)
        store.sweep()
        answer = store.heartbeat("a", [entry])["leases"][task["task_id"]]
        assert answer["valid"] is True and answer["cancel"] is False
        assert answer["lease_expires_at"] == (clock.now + timedelta(seconds=LIMITS.lease_s)).isoformat()
    row = task_row(store, task["task_id"])
    assert row.status == "leased" and row.progress == 0.5 and row.agent_status == "running"
    assert "lease.expired" not in actions(store, task["task_id"])


def test_expired_lease_requeues_and_a_late_commit_is_refused(store: RelayStore, clock: FakeClock) -> None:
    store.queue_task("a", "train", "j1", PLAN, b"w")
    first = lease(store)
    data = b"update" * 100
    store.put_chunk("a", first["task_id"], first["lease_id"], sha256(data), data)
    clock.advance(2.5)
    assert store.sweep() == 1
    assert task_row(store, first["task_id"]).status == "queued"
    assert actions(store, first["task_id"])[-2:] == ["lease.expired", "task.requeued"]
    second = lease(store)
    assert second["task_id"] == first["task_id"] and second["lease_id"] != first["lease_id"]
    with pytest.raises(Conflict) as err:
        store.commit("a", first["task_id"], first["lease_id"], [sha256(data)], sha256(data), len(data), {})
    assert "expired at 2026-01-01T12:00:02+00:00" in str(err.value)
    assert "re-queued" in str(err.value)
    refused = store.events(task_id=first["task_id"], action="commit.refused")
    assert len(refused) == 1 and refused[0].details["lease_id"] == first["lease_id"]
    assert "expired at" in refused[0].details["reason"]
    # The heartbeat of the old lease says it is no longer good, without cancelling the job.
    answer = store.heartbeat(
        "a", [{"task_id": first["task_id"], "lease_id": first["lease_id"], "status": "running"}]
    )
    assert answer["leases"][first["task_id"]]["valid"] is False
    assert answer["leases"][first["task_id"]]["cancel"] is False
    # An upload under the old lease (an agent back from a restart) is refused and recorded too.
    for request, call in (
        ("chunk list", lambda: store.chunks_have("a", first["task_id"], first["lease_id"])),
        (
            "chunk upload",
            lambda: store.put_chunk("a", first["task_id"], first["lease_id"], sha256(data), data),
        ),
    ):
        with pytest.raises(Conflict, match="expired at"):
            call()
        (event,) = [
            e
            for e in store.events(task_id=first["task_id"], action="upload.refused")
            if e.details["request"] == request
        ]
        assert event.details["lease_id"] == first["lease_id"] and "re-queued" in event.details["reason"]
    # The chunk received under the old lease stays; the new lease commits with it.
    assert store.chunks_have("a", second["task_id"], second["lease_id"]) == [sha256(data)]
    store.commit("a", second["task_id"], second["lease_id"], [sha256(data)], sha256(data), len(data), {})
    assert task_row(store, first["task_id"]).status == "completed"


def test_requeued_at_most_max_requeues_times_then_failed(store: RelayStore, clock: FakeClock) -> None:
    t = store.queue_task("a", "train", "j1", PLAN, b"w")
    for _ in range(LIMITS.max_requeues):
        lease(store)
        clock.advance(3)
        store.sweep()
        assert task_row(store, t.task_id).status == "queued"
    lease(store)
    clock.advance(3)
    store.sweep()
    row = task_row(store, t.task_id)
    assert row.status == "failed" and row.requeues == LIMITS.max_requeues
    assert "site a stopped answering: lease expired at" in (row.error or "")
    assert actions(store, t.task_id)[-1] == "task.failed"


def test_sequential_policy_fails_the_task_on_expiry(store: RelayStore, clock: FakeClock) -> None:
    t = store.queue_task("a", "train", "j1", PLAN, b"w", on_expiry="fail")
    task = lease(store)
    clock.advance(2.1)
    store.sweep()
    row = task_row(store, t.task_id)
    assert row.status == "failed" and row.requeues == 0
    assert "its policy is to fail on expiry" in (row.error or "")
    assert store.next_task("a", 0) is None
    with pytest.raises(Conflict, match=r"expired at .* and the task was failed"):
        store.commit("a", task["task_id"], task["lease_id"], [], None, 0, {})


def test_chunk_must_hash_to_its_name_and_fit(store: RelayStore) -> None:
    store.queue_task("a", "train", "j1", PLAN, b"w")
    task = lease(store)
    with pytest.raises(InvalidRequest, match="not " + "0" * 64):
        store.put_chunk("a", task["task_id"], task["lease_id"], "0" * 64, b"data")
    big = b"x" * (LIMITS.chunk_bytes + 1)
    with pytest.raises(InvalidRequest, match="over chunk_bytes"):
        store.put_chunk("a", task["task_id"], task["lease_id"], sha256(big), big)
    with pytest.raises(Conflict, match="not a lease"):
        store.put_chunk("a", task["task_id"], "f" * 32, sha256(b"data"), b"data")
    assert store.chunks_have("a", task["task_id"], task["lease_id"]) == []


def test_a_chunk_write_that_dies_leaves_no_half_chunk(
    store: RelayStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.queue_task("a", "train", "j1", PLAN, b"w")
    task = lease(store)
    data = os.urandom(5000)

    def crash(*_args: object) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        store.put_chunk("a", task["task_id"], task["lease_id"], sha256(data), data)
    monkeypatch.undo()
    folder = store.chunk_dir(task["task_id"])
    assert list(folder.iterdir()) == []
    assert store.chunks_have("a", task["task_id"], task["lease_id"]) == []


def test_commit_checks_missing_chunks_size_and_hash(store: RelayStore) -> None:
    store.queue_task("a", "train", "j1", PLAN, b"w")
    task = lease(store)
    tid, lid = task["task_id"], task["lease_id"]
    data = os.urandom(150_000)
    parts = split_chunks(data, LIMITS.chunk_bytes)
    manifest = [sha256(p) for p in parts]
    store.put_chunk("a", tid, lid, manifest[0], parts[0])
    with pytest.raises(InvalidRequest, match=f"missing 2 chunk.*{manifest[1]}.*{manifest[2]}"):
        store.commit("a", tid, lid, manifest, sha256(data), len(data), {})
    for name, part in zip(manifest[1:], parts[1:], strict=True):
        store.put_chunk("a", tid, lid, name, part)
    with pytest.raises(InvalidRequest, match=f"SHA-256 {sha256(data)}, the commit says {'1' * 64}"):
        store.commit("a", tid, lid, manifest, "1" * 64, len(data), {})
    with pytest.raises(InvalidRequest, match=f"{len(data)} bytes, the commit says 7"):
        store.commit("a", tid, lid, manifest, sha256(data), 7, {})
    with pytest.raises(InvalidRequest, match="non-empty manifest"):
        store.commit("a", tid, lid, [], sha256(data), len(data), {})
    assert task_row(store, tid).status == "leased"
    result = {"num_samples": 12, "metrics": {"loss": 0.5}, "audit_anchor": {"head": "x"}}
    assert store.commit("a", tid, lid, manifest, sha256(data), len(data), result)["sha256"] == sha256(data)
    # The same commit again is answered the same (the agent may not have seen the first answer).
    assert store.commit("a", tid, lid, manifest, sha256(data), len(data), result)["sha256"] == sha256(data)
    row = task_row(store, tid)
    assert row.status == "completed" and row.num_samples == 12 and row.audit_anchor == {"head": "x"}
    assert store.read_update(row) == data
    assert len(store.events(task_id=tid, action="commit.accepted")) == 1


def test_chunks_survive_a_relay_restart(tmp_path: Path, clock: FakeClock) -> None:
    first = RelayStore(tmp_path / "relay", limits=LIMITS, clock=clock)
    first.add_site("a", token="token-a")
    first.queue_task("a", "train", "j1", PLAN, b"w")
    task = lease(first)
    data = os.urandom(100_000)
    parts = split_chunks(data, LIMITS.chunk_bytes)
    first.put_chunk("a", task["task_id"], task["lease_id"], sha256(parts[0]), parts[0])
    first.close()
    second = RelayStore(tmp_path / "relay", limits=LIMITS, clock=clock)  # the restarted relay
    try:
        assert second.site_for_token("token-a") == "a"
        have = second.chunks_have("a", task["task_id"], task["lease_id"])
        assert have == [sha256(parts[0])]
        second.put_chunk("a", task["task_id"], task["lease_id"], sha256(parts[1]), parts[1])
        manifest = [sha256(p) for p in parts]
        second.commit("a", task["task_id"], task["lease_id"], manifest, sha256(data), len(data), {})
        assert second.read_update(task_row(second, task["task_id"])) == data
    finally:
        second.close()


def test_sites_are_isolated(store: RelayStore) -> None:
    t = store.queue_task("a", "train", "j1", PLAN, b"weights of a")
    assert store.next_task("b", 0) is None
    with pytest.raises(NotFound, match="no blob"):
        store.blob_for("b", sha256(b"weights of a"))
    assert store.blob_for("a", sha256(b"weights of a")).read_bytes() == b"weights of a"
    task = lease(store)
    with pytest.raises(NotFound, match="for site b"):
        store.chunks_have("b", t.task_id, task["lease_id"])
    with pytest.raises(NotFound, match="for site b"):
        store.commit("b", t.task_id, task["lease_id"], [], None, 0, {})
    answer = store.heartbeat("b", [{"task_id": t.task_id, "lease_id": task["lease_id"], "status": "failed"}])
    assert answer["leases"][t.task_id]["valid"] is False
    assert task_row(store, t.task_id).status == "leased"  # b's heartbeat changed nothing of a's


def test_cancel_is_answered_in_the_next_heartbeat(store: RelayStore) -> None:
    t = store.queue_task("a", "train", "j1", PLAN, b"w")
    task = lease(store)
    assert store.cancel("a", "train", "j1") is True
    assert store.cancel("a", "train", "j1") is False  # already ended
    answer = store.heartbeat("a", [{"task_id": t.task_id, "lease_id": task["lease_id"], "status": "running"}])
    assert answer["leases"][t.task_id]["cancel"] is True
    assert answer["leases"][t.task_id]["valid"] is False
    with pytest.raises(Conflict, match="cancelled by the coordinator"):
        store.commit("a", t.task_id, task["lease_id"], [], None, 0, {})
    # A queued task that is cancelled is never handed out.
    store.queue_task("a", "train", "j2", PLAN, b"w")
    store.cancel("a", "train", "j2")
    assert store.next_task("a", 0) is None


def test_a_failed_job_ends_the_task_and_a_refusal_is_kept(store: RelayStore) -> None:
    t1 = store.queue_task("a", "train", "j1", PLAN, b"w")
    task = lease(store)
    entry = {
        "task_id": t1.task_id,
        "lease_id": task["lease_id"],
        "status": "failed",
        "error": "out of memory",
    }
    assert store.heartbeat("a", [entry])["leases"][t1.task_id]["valid"] is False
    row = task_row(store, t1.task_id)
    assert row.status == "failed" and "out of memory" in (row.error or "")
    t2 = store.queue_task("a", "train", "j2", PLAN, b"w")
    task = lease(store)
    store.refuse("a", t2.task_id, task["lease_id"], "plan_not_approved", "not approved", "c" * 64)
    row = task_row(store, t2.task_id)
    assert (row.status, row.refusal_code, row.refusal_plan_hash) == ("refused", "plan_not_approved", "c" * 64)
    assert actions(store, t2.task_id)[-1] == "task.refused"
    with pytest.raises(InvalidRequest, match="code must be one of"):
        store.refuse("a", t2.task_id, task["lease_id"], "nope", "x", None)


def test_sequential_task_fails_when_its_site_is_gone(store: RelayStore, clock: FakeClock) -> None:
    store.site_for_token("token-a", touch=True)
    t = store.queue_task("a", "train", "j1", PLAN, b"w", on_expiry="fail")
    r = store.queue_task("a", "train", "j2", PLAN, b"w", on_expiry="requeue")
    clock.advance(1.5)
    store.sweep()
    assert task_row(store, t.task_id).status == "queued"  # not gone for a whole lease yet
    clock.advance(1.0)
    store.sweep()
    failed = task_row(store, t.task_id)
    assert failed.status == "failed"
    assert "not seen by the relay since 2026-01-01T12:00:00+00:00" in (failed.error or "")
    assert task_row(store, r.task_id).status == "queued"  # FedAvg's task waits for the site
    # A site that polls keeps its sequential task.
    u = store.queue_task("a", "train", "j3", PLAN, b"w", on_expiry="fail")
    clock.advance(3)
    store.site_for_token("token-a", touch=True)
    store.sweep()
    assert task_row(store, u.task_id).status == "queued"


def test_chunks_of_a_task_that_ended_are_dropped(store: RelayStore, clock: FakeClock) -> None:
    t = store.queue_task("a", "train", "j1", PLAN, b"w", on_expiry="requeue")
    task = lease(store)
    store.put_chunk("a", t.task_id, task["lease_id"], sha256(b"part"), b"part")
    clock.advance(3)
    store.sweep()  # re-queued: the chunk stays for the next lease
    assert store.chunk_dir(t.task_id).is_dir()
    store.cancel("a", "train", "j1")
    store.sweep()
    assert not store.chunk_dir(t.task_id).exists()


def _commit(store: RelayStore, site: str, data: bytes) -> str:
    """Lease SITE's next task and commit DATA as its update; the task's id."""
    task = lease(store, site)
    tid, lid = task["task_id"], task["lease_id"]
    store.put_chunk(site, tid, lid, sha256(data), data)
    store.commit(site, tid, lid, [sha256(data)], sha256(data), len(data), {"num_samples": 1})
    return str(tid)


def test_files_of_ended_tasks_are_deleted_after_keep_files_s_and_rows_stay(
    tmp_path: Path, clock: FakeClock
) -> None:
    store = RelayStore(
        tmp_path / "relay", limits=LIMITS.model_copy(update={"keep_files_s": 100}), clock=clock
    )
    try:
        store.add_site("a", token="token-a")
        store.add_site("b", token="token-b")
        weights = b"global weights of round 1"
        blob = store.blob_path(sha256(weights))
        store.queue_task("a", "train", "j1", PLAN, weights)
        waiting = store.queue_task("b", "train", "j1", PLAN, weights)
        done = _commit(store, "a", b"update of a")
        update = store.update_path(done)
        clock.advance(50)
        assert store.drop_old_files() == (0, 0)
        assert update.is_file() and blob.is_file()

        # Past keep_files_s: a's update goes; the weights stay while b's task still needs them.
        clock.advance(60)
        assert store.drop_old_files() == (1, 0)
        assert not update.exists() and blob.is_file()
        row = task_row(store, done)
        assert row.status == "completed" and row.update_sha256 == sha256(b"update of a")
        with pytest.raises(NotFound, match=r"no longer stored.*keep_files_s=100 s after it ended"):
            store.read_update(row)
        assert store.blob_for("b", sha256(weights)) == blob
        [event] = store.events(action="files.dropped")
        assert event.details == {"updates": 1, "blobs": 0, "keep_files_s": 100}

        # b's task ends: its weights are kept for keep_files_s after that, then deleted.
        store.cancel("b", "train", "j1")
        assert task_row(store, waiting.task_id).status == "cancelled"
        clock.advance(99)
        assert store.drop_old_files() == (0, 0)
        clock.advance(2)
        assert store.drop_old_files() == (0, 1)
        assert not blob.exists()
        with pytest.raises(NotFound, match="no blob"):
            store.blob_for("b", sha256(weights))

        # The same weights queued again are stored again.
        store.queue_task("a", "train", "j2", PLAN, weights)
        assert store.blob_for("a", sha256(weights)).read_bytes() == weights
    finally:
        store.close()


def test_the_sweep_deletes_old_files_at_most_once_a_minute(tmp_path: Path, clock: FakeClock) -> None:
    store = RelayStore(tmp_path / "relay", limits=LIMITS.model_copy(update={"keep_files_s": 10}), clock=clock)
    try:
        store.add_site("a", token="token-a")
        store.queue_task("a", "train", "j1", PLAN, b"w1")
        first = store.update_path(_commit(store, "a", b"u1"))
        store.sweep()  # the store's first sweep looks at once: nothing is old yet
        clock.advance(30)
        store.sweep()  # 30 s after the last look: not yet
        assert first.is_file() and store.blob_path(sha256(b"w1")).is_file()
        clock.advance(31)
        store.sweep()
        assert not first.exists() and not store.blob_path(sha256(b"w1")).exists()
    finally:
        store.close()


def test_keep_files_s_must_be_positive(tmp_path: Path) -> None:
    positive = r"keep_files_s\n\s+Input should be greater than 0 .*input_value=0,"
    with pytest.raises(ValidationError, match=positive):
        RelayLimits(**{**LIMITS.model_dump(), "keep_files_s": 0})
    doc = {
        "agents": [{"name": "a", "pull": True}],
        "relay": {"dir": str(tmp_path / "relay"), "keep_files_s": -1},
    }
    with pytest.raises(ValidationError, match="keep_files_s"):
        Federation.model_validate(doc)
    relay = Federation.model_validate({**doc, "relay": {"keep_files_s": 3600}}).relay
    assert relay is not None and relay.keep_files_s == 3600


def test_two_relay_processes_on_one_database_never_lease_a_task_twice(
    tmp_path: Path, clock: FakeClock, blank_db_url: str
) -> None:
    """Two stores on one database (two relay processes behind a load balancer, or a restart that
    overlaps): their polls race for the same site's queue, and each task is leased exactly once."""
    first = RelayStore(tmp_path / "relay-1", database_url=blank_db_url, limits=LIMITS, clock=clock)
    second = RelayStore(tmp_path / "relay-2", database_url=blank_db_url, limits=LIMITS, clock=clock)
    try:
        first.add_site("a", token="token-a")
        queued = {first.queue_task("a", "train", f"j{i}", PLAN, b"weights").task_id for i in range(12)}
        leased: list[str] = []
        lock = threading.Lock()

        def poll(store: RelayStore) -> None:
            while (task := store.next_task("a", 0)) is not None:
                with lock:
                    leased.append(task["task_id"])

        threads = [threading.Thread(target=poll, args=(s,)) for s in (first, second, first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert sorted(leased) == sorted(queued)  # every task once, none twice
        assert {task_row(second, t).status for t in queued} == {"leased"}
    finally:
        first.close()
        second.close()
