"""The secure-aggregation benchmark runs end to end on a tiny model; its numbers are in the README."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The benchmarks are scripts next to the packages, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.secure_aggregation import main


def test_quick_run_reports_both_modes_and_a_mean_within_the_bound(tmp_path: Path) -> None:
    assert main(["--quick", "--repeats", "1", "--sites", "3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "secure_aggregation.json").read_text())
    assert (tmp_path / "secure_aggregation.png").stat().st_size > 0
    assert result["threshold"] == 2
    for mode in ("plain", "secure", "secure_with_dropouts"):
        assert result[mode]["site_bytes"] > 0 and result[mode]["site_cpu_s"] >= 0
    for mode in ("secure", "secure_with_dropouts"):
        assert result[mode]["max_abs_error"] <= result[mode]["error_bound"]
        assert set(result[mode]["site_steps_cpu_s"]) == {
            "advertise",
            "share",
            "quantize",
            "mask",
            "encode",
            "unmask",
        }
    assert result["ratios"]["bytes"] > 1.0  # a tiny model: the protocol's messages dominate
