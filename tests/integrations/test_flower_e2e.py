"""The Flower side in its own environment (.venv-flower): marked `flower`, left out of `make test`
(`make e2e-flower` builds the environment and runs the end-to-end script itself).

- The ClientApp and the ServerApp import flwr but neither torch nor the agent's or the
  coordinator's code.
- End to end (integrations/flower/e2e.py): three agents, a SuperLink, three SuperNodes, two
  FedAvg rounds with `flwr run`; audit log against what the ServerApp received, the final model
  and its Dice against `fedsite coordinate`'s, and a site with manual approval reported with the plan's hash.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integrations.conftest import FLOWER_APP, FLOWER_VENV

pytestmark = [
    pytest.mark.flower,
    pytest.mark.skipif(
        not (FLOWER_VENV / "bin" / "flwr").exists(), reason=".venv-flower is missing: run `make e2e-flower`"
    ),
]

IMPORTS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import fedsite_flower.client_app, fedsite_flower.server_app
roots = {m.split(".")[0] for m in sys.modules}
forbidden = sorted(roots & {"torch", "agent", "coordinator", "monai"})
print(json.dumps({"flwr": "flwr" in roots, "forbidden": forbidden}))
"""


def test_flower_apps_import_no_torch_nor_agent_code() -> None:
    proc = subprocess.run(
        [str(FLOWER_VENV / "bin" / "python"), "-c", IMPORTS, str(FLOWER_APP)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"flwr": True, "forbidden": []}


REFUSAL = """
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
sys.path.insert(0, sys.argv[1])
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedsite_flower import client_app

# What a ServerApp process sets before it builds messages.
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
DETAIL = "plan " + "c" * 64 + " is not approved at this site (approval policy: manual)"

class Agent(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        body = json.dumps({"detail": DETAIL}).encode()
        self.send_response(403)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Agent)
threading.Thread(target=server.serve_forever, daemon=True).start()
token = sys.argv[2]
content = RecordDict({
    "arrays": ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}),
    "config": ConfigRecord({"plan": json.dumps({"dataset": "d"}), "server-round": 1}),
})
out = {}
for case, node_config in {
    "refused": {"agent-url": f"http://127.0.0.1:{server.server_port}", "token-file": token, "site": "site-x"},
    "no_token": {"agent-url": f"http://127.0.0.1:{server.server_port}", "token-file": token + ".missing"},
}.items():
    for kind, handler in (("train", client_app.train), ("evaluate", client_app.evaluate)):
        msg = Message(content, dst_node_id=7, message_type=kind)
        ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
        reply = handler(msg, ctx)
        out[f"{case}-{kind}"] = reply.error.reason if reply.has_error() else None
server.shutdown()
print(json.dumps(out))
"""


def test_a_refusal_is_a_flower_error_reply_with_the_agents_reason(tmp_path: Path) -> None:
    """The ClientApp answers an agent's refusal (or a missing token) with a Flower error message
    naming the site and keeping the agent's reason; it raises nothing."""
    token = tmp_path / "agent.token"
    token.write_text("t\n")
    proc = subprocess.run(
        [str(FLOWER_VENV / "bin" / "python"), "-c", REFUSAL, str(FLOWER_APP), str(token)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reasons = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind in ("train", "evaluate"):
        refused = reasons[f"refused-{kind}"]
        assert refused.startswith("site site-x: start ") and "has not approved plan " + "c" * 64 in refused
        assert reasons[f"no_token-{kind}"].startswith("site node 7: cannot read the agent token file")


def test_two_fedavg_rounds_under_flower(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(FLOWER_APP / "e2e.py"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    report = json.loads((tmp_path / "out" / "e2e-flower.json").read_text())
    assert proc.returncode == 0, json.dumps(report, indent=2)[-4000:] + proc.stderr[-3000:]
    assert report["checks"] and all(report["checks"].values()), report["checks"]
    expected = {
        "flwr_run_exit_0",
        "results_completed",
        "audit_matches_serverapp",
        "reference_dice_above_0.1",
        "dice_within_0.01",
        "results_json_has_the_coordinators_keys",
        "dice_plot_written",
        "audit_anchors_kept",
        "same_final_model_as_coordinate",
        "manual_flwr_run_exit_0",
        "manual_site_reported_with_plan_hash",
        "other_sites_completed",
    }
    assert set(report["checks"]) == expected
    results = json.loads((tmp_path / "out" / "flower" / "results.json").read_text())
    assert results["status"] == "completed" and len(results["rounds"]) == 2
    assert (tmp_path / "out" / "flower" / "dice_per_round.png").stat().st_size > 0
