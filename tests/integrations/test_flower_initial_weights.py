"""`fedsite flower initial-weights`: the model a Flower run starts from, built in the agent's
environment exactly as `fedsite coordinate` builds it (the ServerApp has no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner, Result

from agent.cli import app
from coordinator.weights import encode, initial_weights
from tests.fixtures.agents import tiny_plan


def _invoke(plan_file: Path, out: Path) -> Result:
    return CliRunner().invoke(app, ["flower", "initial-weights", "--plan", str(plan_file), "--out", str(out)])


def test_writes_the_coordinators_initial_model(tmp_path: Path) -> None:
    plan = tiny_plan(seed=5)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    out = tmp_path / "sub" / "init.safetensors"
    result = _invoke(plan_file, out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == encode(initial_weights(plan))


def test_a_bad_plan_is_refused_naming_the_file(tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({**tiny_plan(), "local_epochs": 0}))
    out = tmp_path / "init.safetensors"
    result = _invoke(plan_file, out)
    assert result.exit_code == 2
    assert str(plan_file) in result.output and "local_epochs" in result.output
    assert not out.exists()
