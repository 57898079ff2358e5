"""`connect.mode: both`: the push API and the connector drive one site service. A round taken from
the relay is visible through the push API, and a cancel from the coordinator's side (the
heartbeat's `cancel: true`) cancels the local job."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.connect.outbound import audit_events, connector_tasks, outbound_site, plan_and_weights, wait_for
from tests.fixtures.agents import add_tokens, start_agent, wait_status
from tests.fixtures.relay import relay_env, relay_in_thread


@pytest.mark.timeout(300)
def test_both_modes_share_the_service_and_a_relay_cancel_stops_the_job(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "fed", pull=["pull-1"], lease_s=10.0, heartbeat_s=0.5)
    store = env.store()
    with relay_in_thread(store) as relay:
        site = outbound_site(tmp_path / "site", relay.url, env.token_files["pull-1"], mode="both")
        tokens = add_tokens(site.config_path, coordinator="coord")
        plan, weights = plan_and_weights()
        plan["local_epochs"] = 1000  # runs until cancelled
        task = store.queue_task("pull-1", "train", "r-long", plan, weights)
        agent = start_agent(site.config_path)
        try:
            with agent.client(tokens["coord"]) as api:
                info = api.get("/v1/info")
                assert info.status_code == 200, info.text  # the control API is there
                wait_for("the relay's round exists", lambda: api.get("/v1/rounds/r-long").status_code == 200)
                wait_status(api, "/v1/rounds/r-long", ("running",))
                registered = store.site_info("pull-1")
                assert registered is not None and registered["site_id"] == info.json()["site_id"]
                assert store.cancel("pull-1", "train", "r-long")
                cancelled = wait_status(api, "/v1/rounds/r-long", ("cancelled", "failed", "completed"))
            assert cancelled["status"] == "cancelled"
            wait_for(
                "the task is let go",
                lambda: connector_tasks(site) == [(task.task_id, "lost")],
                log=agent.log_text,
            )
        finally:
            agent.stop()
    requested = audit_events(site, "round.cancel_requested")
    assert [(e["actor"], e["details"]["round_id"]) for e in requested] == [("relay", "r-long")]
    assert "the coordinator cancelled task" in agent.log_text()
