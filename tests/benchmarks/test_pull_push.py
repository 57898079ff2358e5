"""The push/pull benchmark end to end on its smallest setting: one round per mode with real
agents in `connect.mode: both`. Its figures are not asserted (timings never are); what must hold
is that both modes aggregate the same model and that each mode's bytes were counted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# The benchmarks are scripts next to the packages, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.pull_push import main


@pytest.mark.timeout(600)
def test_one_round_per_mode_gives_the_same_model_and_counts_the_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((tmp_path / "pull_push.json").read_text())
    assert printed["same_models"] is True and result["same_models"] is True
    for mode in ("push", "pull"):
        (run,) = result[mode]["runs"]
        # The plan and weights go out, an update of the same size comes back, in either mode.
        assert run["bytes_to_sites"] > 0 and run["bytes_from_sites"] > 0, (mode, run)
    push, pull = result["push"]["runs"][0], result["pull"]["runs"][0]
    assert abs(pull["bytes_from_sites"] - push["bytes_from_sites"]) < push["bytes_from_sites"]
    assert (tmp_path / "pull_push.png").stat().st_size > 0
