"""Real agents in a mixed federation: one reached by its API (push), one in outbound mode that
opens no control port and reaches the coordinator's relay (pull).

The same two agents, the same data and the same seed first run FedAvg push-only, then with
site-2 switched to outbound mode: every round's global model must be the same bytes, and so
must every Dice. That is the claim of outbound mode: the transport changes, nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from agent.audit.chain import AuditLog
from agent.config import load_config
from agent.db.engine import open_database
from coordinator.demo_federation import generate_federation
from coordinator.federation import parse_federation
from coordinator.options import RunOptions
from coordinator.runner import RunResult, run_strategy
from coordinator.weights import initial_weights
from tests.fixtures.agents import RunningAgent, start_agent, tiny_plan
from tests.fixtures.coordinator import add_static_token
from tests.fixtures.relay import relay_env, relay_in_thread

TOKEN = "pull-federation-token-"
TIMEOUTS = {"connect": 5, "read": 60, "round": 300, "evaluation": 300}


def _connect(config: Path, settings: dict[str, Any] | None) -> None:
    """Set (or, with None, remove) the `connect` section of an agent's config."""
    doc = yaml.safe_load(config.read_text())
    doc.pop("connect", None)
    if settings is not None:
        doc["connect"] = settings
    doc["device"] = "cpu"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


def _audit(config: Path, action: str) -> list[dict[str, Any]]:
    cfg = load_config(config)
    db = open_database(cfg.db_url)
    try:
        return AuditLog(db).events(action=action, limit=10_000)
    finally:
        db.dispose()


def _run(fed_doc: dict[str, Any], out: Path, run_id: str, **kwargs: Any) -> RunResult:
    plan = tiny_plan()
    options = RunOptions(strategy="fedavg", rounds=2, run_id=run_id)
    fed = parse_federation(fed_doc, source=out.parent / "federation.yaml")
    return run_strategy(fed, plan, out, options, initial_weights=initial_weights(plan), **kwargs)


@pytest.mark.timeout(600)
def test_an_outbound_agent_next_to_a_push_agent_gives_the_push_only_models(tmp_path: Path) -> None:
    layout = generate_federation(tmp_path / "data", sites=2, subjects_per_site=[4, 4], size=32, seed=0)
    configs = {s.site_id: s.config_path for s in layout.sites}
    for name, path in configs.items():
        add_static_token(path, TOKEN + name)
        _connect(path, None)
    agents: dict[str, RunningAgent] = {}
    try:
        agents = {name: start_agent(path) for name, path in configs.items()}

        def push_entry(name: str) -> dict[str, str]:
            return {"name": name, "url": agents[name].url, "token": TOKEN + name}

        push_only = _run(
            {
                "agents": [push_entry("site-1"), push_entry("site-2")],
                "timeouts": TIMEOUTS,
                "poll_interval": 0.2,
            },
            tmp_path / "push" / "out",
            "push",
        )

        # site-2 again, same data and work directory, now in outbound mode.
        agents.pop("site-2").stop()
        env = relay_env(
            tmp_path / "mixed",
            pull=["site-2"],
            push=[push_entry("site-1")],
            heartbeat_s=0.5,
            lease_s=30.0,
            extra={"timeouts": TIMEOUTS},
        )
        store = env.store()
        try:
            with relay_in_thread(store) as relay:
                _connect(
                    configs["site-2"],
                    {
                        "mode": "outbound",
                        "coordinator_url": relay.url,
                        "token_file": str(env.token_files["site-2"]),
                        "poll_wait_s": 1.0,
                        "heartbeat_s": 0.5,
                        "chunk_bytes": 16 * 1024,
                    },
                )
                agents["site-2"] = outbound = start_agent(configs["site-2"])
                # No control API on its port: only the local health probe answers.
                refused = httpx.post(f"{outbound.url}/v1/rounds", headers={"Authorization": "Bearer x"})
                assert refused.status_code == 404, refused.text
                mixed = _run(
                    env_doc(env.federation_path), tmp_path / "mixed" / "out", "mixed", relay_store=store
                )
        finally:
            store.close()
    finally:
        for agent in agents.values():
            agent.stop()

    assert len(push_only.rounds) == len(mixed.rounds) == 2
    for ref, got in zip(push_only.rounds, mixed.rounds, strict=True):
        assert got["participants"] == ref["participants"] == ["site-1", "site-2"]
        assert got["model_sha256"] == ref["model_sha256"], (ref["index"], ref, got)
        assert got["weighted_dice"] == ref["weighted_dice"]
        for site in ("site-1", "site-2"):
            assert got["training"][site]["update_sha256"] == ref["training"][site]["update_sha256"]
            assert got["evaluation"][site]["dice"] == ref["evaluation"][site]["dice"]
    assert mixed.doc["site_info"]["site-2"]["datasets"], mixed.doc["site_info"]

    # What left site-2 in the mixed run: every committed update is the one its egress gate
    # recorded, and nothing was committed that the gate did not release.
    commits = {
        e["details"]["sha256"]
        for e in _audit(configs["site-2"], "connect.commit")
        if e["details"].get("sha256")
    }
    released = {e["details"]["sha256"] for e in _audit(configs["site-2"], "egress.sent")}
    mixed_updates = {r["training"]["site-2"]["update_sha256"] for r in mixed.rounds}
    assert mixed_updates <= commits <= released


def env_doc(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc
