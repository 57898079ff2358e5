"""An agent in `connect.mode: outbound` against the real relay on 127.0.0.1: no control port, bad
tasks from the coordinator's side refused with a code and a clear reason (nothing trained), and
the loop goes on to complete good ones (a round whose committed hash is the egress record, an
evaluation with its metrics)."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from coordinator.relay.models import RelayTask
from coordinator.weights import decode, encode
from tests.connect.outbound import (
    approve,
    audit_events,
    connector_tasks,
    hash_of,
    jobs,
    outbound_site,
    plan_and_weights,
    task_ended,
    wait_for,
)
from tests.fixtures.agents import start_agent
from tests.fixtures.relay import relay_env, relay_in_thread


@pytest.mark.timeout(420)
def test_outbound_agent_refuses_bad_tasks_and_completes_good_ones(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "fed", pull=["pull-1"], lease_s=10.0, heartbeat_s=0.5)
    store = env.store()
    with relay_in_thread(store) as relay:
        site = outbound_site(tmp_path / "site", relay.url, env.token_files["pull-1"], approval="manual")
        plan, weights = plan_and_weights()
        approved = approve(site, plan)
        unapproved_plan = {**plan, "optimizer": {"name": "adam", "lr": 0.002}}
        state = decode(weights)
        first = next(iter(state))
        state[first] = state[first] + 0.5
        other_weights = encode(state)

        # Queued before the agent starts, so that the test edits them before any is leased.
        t_unapproved = store.queue_task("pull-1", "train", "r-unapproved", unapproved_plan, weights)
        t_tampered = store.queue_task("pull-1", "train", "r-tampered", plan, other_weights)
        blob = store.blob_path(hashlib.sha256(other_weights).hexdigest())
        data = bytearray(blob.read_bytes())
        data[-1] ^= 0xFF  # same size, different content
        blob.write_bytes(bytes(data))
        t_malformed = store.queue_task("pull-1", "train", "r-malformed", plan, weights)
        with store.engine.begin() as conn:
            conn.execute(
                update(RelayTask)
                .where(RelayTask.task_id == t_malformed.task_id)
                .values(plan=["not", "a", "plan"])
            )
        t_good = store.queue_task("pull-1", "train", "r-good", plan, weights)
        t_eval = store.queue_task("pull-1", "evaluate", "e-good", plan, weights)

        agent = start_agent(site.config_path)
        try:
            # No control API on this port: only the local probes.
            with httpx.Client(base_url=agent.url, timeout=10.0) as http:
                assert http.get("/v1/health").status_code == 200
                assert http.post("/v1/rounds", files={"plan": "{}"}).status_code == 404
                assert http.get("/v1/info").status_code == 404
                assert http.get("/v1/audit").status_code == 404
                assert http.get("/metrics").status_code == 401  # there, for an admin token

            good = wait_for(
                "the good round is committed", task_ended(store, t_good.task_id), log=agent.log_text
            )
            evaluation = wait_for(
                "the evaluation is committed", task_ended(store, t_eval.task_id), log=agent.log_text
            )
        finally:
            code = agent.stop()
    # uvicorn ends by re-raising the SIGTERM it handled, after its graceful shutdown.
    assert code in (0, -signal.SIGTERM), agent.log_text()[-3000:]

    unapproved = store.get_task(t_unapproved.task_id)
    assert unapproved is not None and unapproved.status == "refused"
    assert unapproved.refusal_code == "plan_not_approved"
    assert unapproved.refusal_plan_hash == hash_of(unapproved_plan) != approved
    tampered = store.get_task(t_tampered.task_id)
    assert tampered is not None and (tampered.status, tampered.refusal_code) == (
        "refused",
        "weights_mismatch",
    )
    assert "SHA-256 of the received bytes" in (tampered.error or "")
    malformed = store.get_task(t_malformed.task_id)
    assert malformed is not None and (malformed.status, malformed.refusal_code) == ("refused", "invalid_task")
    assert "malformed task: plan: Input should be a valid dictionary" in (malformed.error or "")

    # Nothing was trained for the refused tasks; the good ones ran.
    assert jobs(site) == [("train", "r-good", "completed"), ("evaluate", "e-good", "completed")]
    refusals = {e["details"]["task_id"]: e["details"] for e in audit_events(site, "connect.task_refused")}
    assert refusals[t_unapproved.task_id]["code"] == "plan_not_approved"
    assert refusals[t_unapproved.task_id]["plan_hash"] == hash_of(unapproved_plan)
    assert refusals[t_tampered.task_id]["code"] == "weights_mismatch"
    assert refusals[t_malformed.task_id]["code"] == "invalid_task"
    log = agent.log_text()
    assert (
        f"task {t_tampered.task_id} refused (weights_mismatch): weights: SHA-256 of the received bytes" in log
    )
    assert (
        f"task {t_malformed.task_id} refused (invalid_task): "
        "malformed task: plan: Input should be a valid dictionary" in log
    )
    assert f"task {t_unapproved.task_id} refused (plan_not_approved)" in log
    # Long polls and heartbeats do not log a line each (httpx's own request log is off at INFO).
    assert "HTTP Request:" not in log
    # As in push mode, the refused plan is audited with its hash for the admin to find.
    assert any(
        e["details"].get("plan_hash") == hash_of(unapproved_plan) for e in audit_events(site, "plan.refused")
    )

    # The committed update is the one the egress gate released, byte for byte.
    assert good.status == "completed" and good.update_sha256 is not None
    sent = [e["details"] for e in audit_events(site, "egress.sent") if e["details"]["round_id"] == "r-good"]
    assert sent and {s["sha256"] for s in sent} == {good.update_sha256}
    assert hashlib.sha256(store.read_update(good)).hexdigest() == good.update_sha256
    commits = {e["details"]["task_id"]: e["details"] for e in audit_events(site, "connect.commit")}
    assert commits[t_good.task_id]["sha256"] == good.update_sha256
    assert good.audit_anchor is not None and good.audit_anchor["round_id"] == "r-good"
    assert evaluation.status == "completed" and "dice" in (evaluation.metrics or {})
    assert dict(connector_tasks(site))[t_good.task_id] == "committed"
    assert "connector: stopped" in log
