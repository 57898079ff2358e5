"""An agent killed with -9 mid-round, and one stopped with SIGTERM mid-round.

With `jobs.resume: never`, after kill -9 and a restart: the round is `interrupted`, the
database is intact, the audit chain verifies, the worker died with the agent, and a new
round runs. After SIGTERM: the agent exits on its own, the running round is `interrupted`
and the chain verifies.

With `jobs.resume: auto` (the default), a round killed with -9 after some epochs resumes
when the agent starts again: the coordinator sees it running, then completed, with every
epoch of the plan run once.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from agent.audit.chain import AuditLog
from agent.config import load_config
from agent.db.engine import open_database
from tests.fixtures.agents import add_tokens, make_site, plan_text, start_agent, tiny_plan, wait_status

TERMINAL = ("completed", "failed", "cancelled", "interrupted")


def _db_path(config_path: Path) -> Path:
    return Path(load_config(config_path).db_url.removeprefix("sqlite:///"))


def _worker_pid(db: Path, round_id: str, timeout: float = 30.0) -> int:
    # The job turns `running` a moment before the scheduler records which worker took it.
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT worker_pid FROM round_jobs WHERE round_id = ?", (round_id,)).fetchone()
        if row is not None and row[0]:
            return int(row[0])
        assert time.monotonic() < deadline, f"no worker recorded for {round_id}"
        time.sleep(0.1)


def _ppid(pid: int) -> int:
    # /proc/PID/stat: "pid (comm) state ppid ...", where comm may hold spaces.
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie (exited, not yet reaped by init) counts as gone.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except (FileNotFoundError, IndexError):
            return True
        time.sleep(0.2)
    return False


def _start_long_round(client: object, round_id: str) -> None:
    import httpx

    assert isinstance(client, httpx.Client)
    plan = tiny_plan(init="random", round_id=round_id, local_epochs=5000)
    r = client.post("/v1/rounds", files={"plan": (None, plan_text(plan))})
    assert r.status_code == 202, r.text
    wait_status(client, f"/v1/rounds/{round_id}", ("running",))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    generated = make_site(
        tmp_path_factory.mktemp("restart") / "fed",
        subjects=4,
        fmt="nifti",
        overrides={"device": "cpu", "jobs": {"resume": "never"}},
    )
    tokens = add_tokens(generated.config_path, coordinator="coord", admin="admin")
    return generated.config_path, tokens


def test_kill_9_mid_round_then_restart_then_sigterm(site: tuple[Path, dict[str, str]]) -> None:
    config_path, tokens = site
    db = _db_path(config_path)
    agent = start_agent(config_path)
    try:
        with agent.client(tokens["coord"]) as c:
            _start_long_round(c, "r-killed")
        worker = _worker_pid(db, "r-killed")
        # A fork of the agent's fork server (agent.jobs.forkserver), not a fresh interpreter.
        server = _ppid(worker)
        assert server != agent.process.pid and _ppid(server) == agent.process.pid
        agent.kill()
        assert _gone(worker), "the worker outlived its agent"
    finally:
        agent.kill()

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        row = conn.execute("SELECT status FROM round_jobs WHERE round_id = 'r-killed'").fetchone()
        assert row == ("running",)

    # Restart: the round left running is interrupted, the chain verifies, a new round runs.
    agent = start_agent(config_path)
    try:
        with agent.client(tokens["coord"]) as c:
            body = c.get("/v1/rounds/r-killed").json()
            assert body["status"] == "interrupted", body
            assert "agent stopped" in body["error"]
            assert c.get("/v1/rounds/r-killed/update").status_code == 409

            plan = tiny_plan(init="random", round_id="r-after")
            r = c.post("/v1/rounds", files={"plan": (None, plan_text(plan))})
            assert r.status_code == 202, r.text
            done = wait_status(c, "/v1/rounds/r-after", TERMINAL)
            assert done["status"] == "completed", done
            assert c.get("/v1/rounds/r-after/update").status_code == 200
        with agent.client(tokens["admin"]) as a:
            verify = a.get("/v1/audit/verify").json()
            assert verify["ok"] is True, verify
            events = a.get("/v1/audit", params={"action": "round.interrupted"}).json()["events"]
            assert [e["details"]["round_id"] for e in events] == ["r-killed"]
            assert events[0]["details"]["reason"] == "agent restarted"

        # SIGTERM mid-round: the agent stops on its own and the round is interrupted. A status
        # request waiting for the round's end (a long poll) is answered as the agent stops,
        # instead of holding the shutdown up until uvicorn cancels it.
        with agent.client(tokens["coord"]) as c:
            _start_long_round(c, "r-term")
        worker = _worker_pid(db, "r-term")
        answers: list[httpx.Response | Exception] = []

        def long_poll() -> None:
            with agent.client(tokens["coord"]) as c:
                try:
                    answers.append(c.get("/v1/rounds/r-term", params={"wait": 30}, timeout=60))
                except Exception as exc:
                    answers.append(exc)

        poller = threading.Thread(target=long_poll)
        poller.start()
        time.sleep(1.0)
        assert poller.is_alive(), f"the long poll was answered before the round stopped: {answers}"
        t0 = time.monotonic()
        code = agent.stop(timeout=90)
        took = time.monotonic() - t0
        poller.join(timeout=60)
    finally:
        agent.kill()
    assert len(answers) == 1 and isinstance(answers[0], httpx.Response), answers
    assert answers[0].status_code == 200 and answers[0].json()["status"] in ("running", "interrupted")
    # uvicorn ends by re-raising the SIGTERM it handled, after its graceful shutdown.
    assert code in (0, -signal.SIGTERM), agent.log_text()[-3000:]
    assert took < 60, f"shutdown took {took:.0f} s"
    assert _gone(worker, timeout=5)
    assert "Application shutdown complete" in agent.log_text()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        row = conn.execute("SELECT status, error FROM round_jobs WHERE round_id = 'r-term'").fetchone()
    assert row[0] == "interrupted" and "shut down" in row[1]

    database = open_database(load_config(config_path).db_url)
    try:
        log = AuditLog(database)
        report = log.verify()
        assert report.ok, report
        last = log.find("round.interrupted", round_id="r-term")
        assert last and last[-1]["details"]["reason"] == "agent shutdown"
    finally:
        database.dispose()


def test_kill_9_mid_round_then_the_round_resumes_at_restart(tmp_path: Path) -> None:
    generated = make_site(tmp_path / "fed", subjects=4, fmt="nifti", overrides={"device": "cpu"})
    tokens = add_tokens(generated.config_path, coordinator="coord", admin="admin")
    epochs = 8
    # Enough samples that an epoch is seen running; few epochs, so the round ends soon.
    plan = tiny_plan(init="random", round_id="r-resumed", local_epochs=epochs)
    plan["data"]["samples_per_subject"] = 32
    agent = start_agent(generated.config_path)
    try:
        with agent.client(tokens["coord"]) as c:
            r = c.post("/v1/rounds", files={"plan": (None, plan_text(plan))})
            assert r.status_code == 202, r.text
            # Killed once the worker reports epoch 3: epochs 1 and 2 are in the checkpoint.
            deadline = time.monotonic() + 120
            while True:
                body = c.get("/v1/rounds/r-resumed").json()
                assert body["status"] == "running" or body["status"] == "queued", body
                if (body.get("progress") or {}).get("epoch", 0) >= 3:
                    break
                assert time.monotonic() < deadline, body
                time.sleep(0.05)
        agent.kill()
    finally:
        agent.kill()

    agent = start_agent(generated.config_path)
    try:
        with agent.client(tokens["coord"]) as c:
            seen = c.get("/v1/rounds/r-resumed").json()
            assert seen["status"] in ("queued", "running", "completed"), seen
            done = wait_status(c, "/v1/rounds/r-resumed", TERMINAL)
            assert done["status"] == "completed", done
            assert done["metrics"]["epochs_run"] == epochs
            assert c.get("/v1/rounds/r-resumed/update").status_code == 200
        with agent.client(tokens["admin"]) as a:
            # The scheduler applies the retention policy once it recorded the job's end,
            # a moment after the worker recorded the completion.
            deadline = time.monotonic() + 60
            while True:
                events = a.get("/v1/audit", params={"limit": 1000}).json()["events"]
                if any(e["action"] == "retention.removed" for e in events):
                    break
                assert time.monotonic() < deadline, "no retention.removed event"
                time.sleep(0.2)
            assert a.get("/v1/audit/verify").json()["ok"] is True
    finally:
        agent.kill()
    moves = [
        e for e in events if e["action"].startswith("round.") and e["details"].get("round_id") == "r-resumed"
    ]
    assert [e["action"] for e in moves] == [
        "round.queued",
        "round.running",
        "round.interrupted",
        "round.queued",
        "round.running",
        "round.completed",
    ]
    resumed = moves[3]["details"]
    assert resumed["reason"] == "resumed at agent start" and resumed["resumes"] == 1
    # It continued after a completed epoch, not from the start, and not past the plan.
    assert 2 <= resumed["from_epoch"] < epochs
    # Once it ended, the scheduler's retention pass deleted its checkpoint (audited, no path).
    removed = [
        e["details"]
        for e in events
        if e["action"] == "retention.removed" and e["details"]["round_id"] == "r-resumed"
    ]
    assert [d["file"] for d in removed] == ["checkpoint"] and removed[0]["bytes"] > 0
