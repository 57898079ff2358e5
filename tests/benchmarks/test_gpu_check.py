"""The GPU check's own dry run (`--allow-cpu`): every step runs small on the CPU, so a change that
breaks the script is found here, not in the few minutes of a lent GPU. Its timings are not
asserted; what must hold is that each step ran and the cancelled round was still training when
the cancel came (a round that ended first used to fail the step on a fast device)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# The benchmarks are scripts next to the packages, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.gpu_check import main


@pytest.mark.timeout(600)
def test_the_dry_run_passes_every_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--allow-cpu", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["environment"]["device"] == "cpu" and report["small"] is True
    amp = report["amp_overhead"]
    assert amp["ok"] is True and amp["amp"] is False
    assert [c["config"] for c in amp["configs"]] == ["unet2d_128", "unet3d_64"]
    # Every engine round's epochs were checkpointed, and the wait for it measured.
    assert all(c["checkpoint_wait_ms"] > 0 for c in amp["configs"])
    round_3d = report["agent_round_3d"]
    assert round_3d["ok"] is True and round_3d["channels"] == 4
    first = round_3d["first_round"]
    assert first["training_volumes"] > 0
    for key in ("round_after_restart", "round_after_restart_more"):
        assert round_3d[key]["training_volumes"] == first["training_volumes"]
    for setting, workers in (("loader_alone", 0), ("loader_auto", "auto"), ("loader_more", 8)):
        rates = round_3d[setting]
        warm, long = rates["warm_round"], rates["long_round"]
        assert rates["loader_threads"] == workers
        assert first["epochs"] == warm["epochs"] and long["epochs"] == 3 * warm["epochs"]
        assert long["training_volumes"] == 3 * warm["training_volumes"] == 3 * first["training_volumes"]
    assert round_3d["bare"]["steps"] > 0 and round_3d["bare_volumes_per_s"] > 0
    cancel = report["fresh_worker_and_cancel"]
    assert cancel["ok"] is True and cancel["cancel_status"] == "cancelled"
    # On the CPU the worker is forked from the fork server; the GPU run expects a fresh interpreter.
    assert cancel["fresh_interpreter"] is False and cancel["fresh_interpreter_expected"] is False
    assert cancel["progress_at_cancel"]["step"] >= 1
    assert report["cuda_wheelhouse"]["ok"] is None
    assert report["all_ok"] is True
    assert (tmp_path / "gpu_check.png").stat().st_size > 0
