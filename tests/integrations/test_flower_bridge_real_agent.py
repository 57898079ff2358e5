"""The ClientApp's code path against a real agent, in a process of its own that watches itself.

The child process imports only `fedsite_flower` (agent_api, arrays, bridge: what the ClientApp's
handlers run), trains and evaluates at a real `fedsite serve`, and records every file it opens
(`sys.addaudithook` on "open") and every module it imported. The test then checks what the issue
asks of the ClientApp: it never imports torch or the agent's or coordinator's code, it never
opens a file under the site's data folder, and the update it received is byte for byte what
the agent's egress gate recorded (`egress.sent`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from coordinator.weights import encode, initial_weights
from tests.fixtures.agents import RunningAgent, add_tokens, make_site, start_agent, tiny_plan
from tests.integrations.conftest import FLOWER_APP

CHILD = textwrap.dedent(
    """
    import json, os, sys
    opened = []

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.abspath(os.fsdecode(args[0])))

    sys.addaudithook(hook)
    sys.path.insert(0, sys.argv[1])
    from fedsite_flower import arrays, bridge
    from fedsite_flower.agent_api import AgentAPI

    url, token_file, plan_file, weights_file = sys.argv[2:6]
    plan = json.loads(open(plan_file).read())
    weights = arrays.decode(open(weights_file, "rb").read())
    with AgentAPI.from_node_config({"agent-url": url, "token-file": token_file}, poll_interval=0.2) as api:
        train_id, eval_id = bridge.job_id_for("train", 1, 1, 42), bridge.job_id_for("eval", 1, 1, 42)
        trained = bridge.train(api, plan, weights, train_id, timeout=300)
        evaluated = bridge.evaluate(api, plan, trained.arrays, eval_id, timeout=300)
    roots = {m.split(".")[0] for m in sys.modules}
    print(json.dumps({
        "round_id": trained.round_id,
        "sha256": trained.update_sha256,
        "num_examples": trained.num_examples,
        "dice": evaluated.dice,
        "eval_examples": evaluated.num_examples,
        "opened": opened,
        "forbidden_modules": sorted(roots & {"torch", "agent", "coordinator", "flwr", "monai"}),
    }))
    """
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningAgent, dict[str, str], Path]]:
    root = tmp_path_factory.mktemp("flower-bridge")
    generated = make_site(root / "fed", subjects=4, fmt="nifti")
    tokens = add_tokens(generated.config_path, coordinator="coord", admin="admin")
    agent = start_agent(generated.config_path)
    try:
        yield agent, tokens, generated.config_path
    finally:
        agent.stop()


def test_client_path_imports_no_training_code_reads_no_data_and_gets_the_audited_update(
    site: tuple[RunningAgent, dict[str, str], Path], tmp_path: Path
) -> None:
    agent, tokens, config_path = site
    raw = yaml.safe_load(config_path.read_text())
    data_dirs = [(config_path.parent / d["root"]).resolve() for d in raw["datasets"]]
    assert all(d.is_dir() and any(d.rglob("*")) for d in data_dirs), data_dirs
    plan = tiny_plan()
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    weights_file = tmp_path / "init.safetensors"
    weights_file.write_bytes(encode(initial_weights(plan)))
    token_file = tmp_path / "coord.token"
    token_file.write_text(tokens["coord"] + "\n")

    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(FLOWER_APP),
            agent.url,
            *map(str, (token_file, plan_file, weights_file)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert out["forbidden_modules"] == []
    assert out["opened"], "the audit hook saw no open at all: it did not watch"
    assert str(token_file) in out["opened"]
    under_data = [p for p in out["opened"] if any(Path(p).is_relative_to(d) for d in data_dirs)]
    assert under_data == []
    assert out["num_examples"] > 0 and out["eval_examples"] > 0 and 0.0 <= out["dice"] <= 1.0

    with agent.client(tokens["admin"]) as http:
        events = http.get("/v1/audit", params={"action": "egress.sent", "limit": 1000}).json()["events"]
    mine = [e for e in events if e["details"]["round_id"] == out["round_id"]]
    assert len(mine) == 1 and mine[0]["details"]["sha256"] == out["sha256"]


def test_a_resent_message_finds_the_same_round(site: tuple[RunningAgent, dict[str, str], Path]) -> None:
    """Flower may deliver a message again: the derived round id makes the agent answer with the
    round it already has instead of training a second time."""
    agent, tokens, _ = site
    sys.path.insert(0, str(FLOWER_APP))
    from fedsite_flower import arrays, bridge
    from fedsite_flower.agent_api import AgentAPI

    plan = tiny_plan()
    weights = arrays.decode(encode(initial_weights(plan)))
    round_id = bridge.job_id_for("train", 7, 2, 42)
    with AgentAPI(agent.url, tokens["coord"], poll_interval=0.2) as api:
        first = api.start_round({**plan, "round_id": round_id}, arrays.encode(weights))
        api.wait("round", first, timeout=300)
        again = api.start_round({**plan, "round_id": round_id}, arrays.encode(weights))
        assert again == first
        assert api.status("round", again).status == "completed"
