"""The Flower side in its own environment (.venv-flower): marked `flower`, left out of `make test`
(`make e2e-flower` builds the environment and runs the end-to-end script itself).

- The ClientApp and the ServerApp import flwr but neither torch nor the agent's or the
  coordinator's code.
- End to end (integrations/flower/e2e.py): three agents, a SuperLink, three SuperNodes, two
  FedAvg rounds with `flwr run`; audit log against what the ServerApp received, Dice against
  `fedsite coordinate`, and a site with manual approval reported with the plan's hash.
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
        "manual_flwr_run_exit_0",
        "manual_site_reported_with_plan_hash",
        "other_sites_completed",
    }
    assert set(report["checks"]) == expected
    results = json.loads((tmp_path / "out" / "flower" / "results.json").read_text())
    assert results["status"] == "completed" and len(results["rounds"]) == 2
    assert (tmp_path / "out" / "flower" / "dice_per_round.png").stat().st_size > 0
