"""The DP option of the paper-reproduction benchmark: one noise multiplier that keeps the whole FL
run within the sites' budget at the site where it costs most."""

from __future__ import annotations

import json
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


def test_membership_inference_gives_the_same_figures_in_another_folder(tmp_path: Path) -> None:
    """The split follows the site's secret, which the benchmark derives from the data seed: two
    runs into different folders train and attack on the same subjects and give the same figures."""
    from benchmarks import membership_inference

    tiny = ["--subjects", "8", "--epochs", "1", "--seeds", "1", "--epsilons", "8", "--timing-repeats", "0"]
    docs = []
    for name in ("first", "second"):
        assert membership_inference.main([*tiny, "--out", str(tmp_path / name)]) == 0
        docs.append(json.loads((tmp_path / name / "results.json").read_text()))
    first, second = docs
    assert first["train_subjects"] + first["val_subjects"] == 8 and first["val_subjects"] > 0
    for key in ("dice", "attacks", "steps"):
        assert [r[key] for r in first["runs"]] == [r[key] for r in second["runs"]]
    secrets = {
        (tmp_path / n / "data" / "site-1" / "work" / "site.secret").read_text() for n in ("first", "second")
    }
    assert len(secrets) == 1
