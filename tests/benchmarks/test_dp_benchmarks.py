"""The DP option of the paper-reproduction benchmark: one noise multiplier that keeps the whole FL
run within the sites' budget at the site where it costs most."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.training.dp import epsilon
from benchmarks.paper_reproduction import DP_DELTA, dp_noise, parse_args, settings_from


@pytest.mark.parametrize("budget", [8.0, 1.0])
def test_dp_noise_keeps_every_site_within_the_run_budget(budget: float) -> None:
    s = settings_from(parse_args(["--quick", "--dp-epsilon", str(budget)]))
    assert s.dp_epsilon == budget and s.dp_subject_slices == 4
    sigma, by_size = dp_noise(s, [2, 3, 11])
    # The smallest site samples every subject at every step (2 subjects per step): it costs most.
    assert budget * 0.99 < by_size["2"] <= budget
    assert by_size["11"] < by_size["3"] < by_size["2"]
    steps = s.rounds * s.local_epochs  # rate 1: one step per epoch
    assert epsilon([(sigma, 1.0, steps)], DP_DELTA, "rdp") == pytest.approx(by_size["2"], abs=1e-9)
