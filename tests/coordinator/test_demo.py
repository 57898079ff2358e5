"""`fedsite demo` (what `make demo` runs), end to end in a smaller setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from coordinator import demo as demo_module
from coordinator.demo import prepare_out, run_demo, subject_counts
from coordinator.errors import DemoError

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--subjects-per-site", "4,3"]


def _env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("FEDSITE_") or k.startswith("FEDSITE_TEST_")
    }
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "160"})
    return env


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/v1/health", timeout=2)
    except httpx.TransportError:
        return True
    return False


def test_demo_runs_to_the_end(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--out", str(out), "--sites", "2", "--rounds", "1", *SMALL],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=str(REPO),
        timeout=840,
        check=False,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    doc = json.loads((out / "results" / "results.json").read_text())
    assert doc["status"] == "completed" and doc["strategy"] == "fedavg"
    assert [r["index"] for r in doc["rounds"]] == [1]
    for rnd in doc["rounds"]:
        assert rnd["participants"] == ["site-1", "site-2"]
        assert isinstance(rnd["weighted_dice"], float)
        assert set(rnd["evaluation"]) == {"site-1", "site-2"}
        assert rnd["bytes_sent"] > 0 and rnd["bytes_received"] > 0
        assert (out / "results" / rnd["model"]).is_file()
    assert (out / "results" / "dice_per_round.png").stat().st_size > 0
    assert "Dice per round" in text
    assert str(out / "results" / "results.json") in text.replace("\n", "")
    for site in ("site-1", "site-2"):
        assert (out / site / "work" / "fedsite.db").is_file()
        assert f"audit database of {site}" in text
        assert (out / site / "coordinator.token").stat().st_mode & 0o077 == 0
    assert "Verifying each site's audit chain" in text
    # Every agent the demo started is gone.
    fed = yaml.safe_load((out / "results" / "federation.yaml").read_text())
    for agent in fed["agents"]:
        assert _refused(agent["url"]), f"{agent['name']} still answers at {agent['url']}"

    # A second demo into the same folder replaces the first one's results.
    assert (out / ".fedsite-demo").is_file()
    prepare_out(out)
    assert not (out / "results").exists()


def test_demo_stops_its_agents_on_ctrl_c(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def interrupted(fed: Any, *args: Any, **kwargs: Any) -> Any:
        seen["urls"] = [a.url for a in fed.agents]
        assert all(not _refused(u) for u in seen["urls"]), "agents should be up while the coordinator runs"
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_module, "run_strategy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path / "demo", sites=1, rounds=1, subjects="3")
    assert seen["urls"]
    for url in seen["urls"]:
        assert _refused(url)


def test_demo_refuses_a_foreign_output_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DemoError, match="not empty and was not written by `fedsite demo`"):
        prepare_out(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_subject_counts() -> None:
    assert subject_counts(3, None) == [8, 6, 4]
    assert subject_counts(4, None) == [8, 6, 4, 4]
    assert subject_counts(2, "5") == [5, 5]
    with pytest.raises(DemoError, match="lists 3 numbers for 2 site"):
        subject_counts(2, "3,4,5")
    with pytest.raises(DemoError, match="at least 2 subjects"):
        subject_counts(1, "1")
