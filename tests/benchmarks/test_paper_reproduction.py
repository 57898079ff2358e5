"""The paper-reproduction benchmark's bookkeeping; the run is `python -m benchmarks.paper_reproduction`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator.options import RunOptions
from coordinator.strategies import STRATEGIES
from coordinator.weights import initial_weights

# The benchmarks are scripts next to the packages, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.paper_reproduction import (
    MethodRunner,
    _outside_sites_evaluate_everything,
    budget_lines,
    fl_label,
    fl_run_label,
    make_plan,
    parse_args,
    parse_fl_strategy,
    require_every_site,
    scaled_split,
    settings_from,
    shuffled,
    table_rows,
)
from benchmarks.pooled import fix_site_secret


def test_scaled_split_keeps_every_site_trainable() -> None:
    assert scaled_split(1.0) == [70, 27, 17, 12, 11, 9, 6, 6, 4, 3]
    assert scaled_split(0.2) == [14, 5, 3, 3, 3, 3, 3, 3, 3, 3]


def test_quick_settings_share_one_epoch_budget() -> None:
    s = settings_from(parse_args(["--quick", "--out", "x"]))
    assert s.quick and not s.eval_every_round
    budget = s.rounds * s.local_epochs
    assert s.epochs_per_site == budget == s.max_epochs
    assert s.ciil_cycles * s.ciil_epochs == budget
    lines = budget_lines(s)
    assert f"= {budget} epochs at every site" in lines[0] and f"= {budget} epochs at every site" in lines[1]
    assert f"CDS:  {budget} epochs" in lines[2]
    full = settings_from(parse_args([]))
    assert full.patience == 8 and len(full.seeds) == 3 and full.scale == 1.0 and not full.eval_every_round
    assert full.ciil_cycles * full.ciil_epochs == full.epochs_per_site


def test_budget_options_keep_methods_on_one_budget() -> None:
    s = settings_from(parse_args(["--rounds", "4", "--local-epochs", "3", "--ciil-epochs", "6"]))
    assert (s.epochs_per_site, s.ciil_cycles, s.max_epochs) == (12, 2, 12)
    assert settings_from(parse_args(["--quick", "--eval-every-round"])).eval_every_round
    with pytest.raises(SystemExit, match="--ciil-epochs 5 must divide"):
        settings_from(parse_args(["--rounds", "4", "--local-epochs", "3", "--ciil-epochs", "5"]))


@pytest.mark.parametrize(
    ("option", "value"), [("--seeds", "0"), ("--rounds", "-1"), ("--scale", "0"), ("--lr", "0")]
)
def test_a_count_or_size_of_zero_is_refused_not_taken_for_the_default(option: str, value: str) -> None:
    with pytest.raises(SystemExit, match=f"{option} must be positive, got {value}"):
        settings_from(parse_args([option, value]))


def test_first_seed_extends_a_table_without_its_seeds() -> None:
    assert settings_from(parse_args(["--seeds", "2", "--first-seed", "3"])).seeds == [3, 4]
    assert settings_from(parse_args([])).seeds == [0, 1, 2]
    with pytest.raises(SystemExit, match="--first-seed must be 0 or more, got -1"):
        settings_from(parse_args(["--first-seed", "-1"]))
    with pytest.raises(SystemExit, match="--data-seed must be 0 or more, got -2"):
        settings_from(parse_args(["--data-seed", "-2"]))


@pytest.mark.parametrize(
    ("args", "lowest", "highest"),
    [
        (["--sampling-seed-offset", "-1"], -1, 1),
        (["--first-seed", "2", "--seeds", "2", "--sampling-seed-offset", "-3"], -1, 0),
        (["--seeds", "3", "--sampling-seed-offset", str(2**31 - 2)], 2**31 - 2, 2**31),
    ],
)
def test_sampling_seeds_outside_a_plans_range_are_refused_before_anything_starts(
    args: list[str], lowest: int, highest: int
) -> None:
    with pytest.raises(
        SystemExit, match=f"seeds would run from {lowest} to {highest}; a plan's seed is 0 to {2**31 - 1}"
    ):
        settings_from(parse_args(args))


def test_sampling_seeds_at_the_ends_of_a_plans_range_are_taken() -> None:
    top = settings_from(parse_args(["--seeds", "2", "--sampling-seed-offset", str(2**31 - 2)]))
    assert top.sampling_seed_offset == 2**31 - 2 and top.seeds == [0, 1]
    bottom = settings_from(parse_args(["--first-seed", "3", "--seeds", "2", "--sampling-seed-offset", "-3"]))
    assert bottom.sampling_seed_offset == -3 and bottom.seeds == [3, 4]


def test_orders_differ_by_seed_but_are_reproducible() -> None:
    names = [f"site-{i}" for i in range(1, 11)]
    assert shuffled(names, 0) == shuffled(names, 0)
    assert shuffled(names, 0) != shuffled(names, 1)
    assert sorted(shuffled(names, 2)) == sorted(names)


def test_table_is_relative_to_cds_with_spread_over_seeds() -> None:
    methods = {
        "CDS": [{"inside": 0.80, "outside": 0.70}],
        "FL": [{"inside": 0.796, "outside": 0.70}],
        "CIIL": [{"inside": 0.70, "outside": 0.6}, {"inside": 0.74, "outside": 0.62}],
        "IIL": [{"inside": 0.60, "outside": None}],
    }
    rows = {r["method"]: r for r in table_rows(methods)}
    assert rows["CDS"]["inside_pct_of_cds"] == pytest.approx(100.0)
    assert rows["FL"]["inside_pct_of_cds"] == pytest.approx(99.5)
    assert rows["CIIL"]["inside"]["mean"] == pytest.approx(0.72)
    assert rows["CIIL"]["inside"]["sd"] == pytest.approx(0.0282842712)
    assert rows["CIIL"]["inside"]["n"] == 2
    assert rows["IIL"]["outside"]["mean"] is None and rows["IIL"]["outside_pct_of_cds"] is None
    assert rows["FL"]["study_pct_of_cds"] == 98.8


def test_fl_variants_get_their_own_rows_beside_fedavg() -> None:
    methods = {
        "FL": [{"inside": 0.78, "outside": 0.70}],
        "FL (fednova)": [{"inside": 0.80, "outside": 0.71}],
        "CDS": [{"inside": 0.80, "outside": 0.70}],
    }
    rows = table_rows(methods)
    assert [r["method"] for r in rows] == ["CDS", "FL", "FL (fednova)"]
    assert rows[2]["inside_pct_of_cds"] == pytest.approx(100.0)
    # Every FL variant compares with the study's FL (FedAvg) figure.
    assert rows[2]["study_dice"] == rows[1]["study_dice"] == 0.852


def test_fl_strategies_and_methods_are_checked() -> None:
    s = settings_from(parse_args(["--fl-strategy", "fedavg,fednova", "--methods", "cds,fl"]))
    assert s.fl_strategies == ["fedavg", "fednova"]
    assert s.methods == ["fl", "cds"]
    assert settings_from(parse_args([])).methods == ["fl", "cds", "ciil", "iil"]
    with pytest.raises(SystemExit, match="--fl-strategy: 'iil': 'iil' is not one of fedavg, "):
        settings_from(parse_args(["--fl-strategy", "iil"]))
    with pytest.raises(SystemExit, match="--fl-strategy 'fedavg,fedavg': give distinct entries"):
        settings_from(parse_args(["--fl-strategy", "fedavg,fedavg"]))
    for bad, why in (
        ("fedavgm:momentum=0.5", "'momentum=0.5' is not setting=value with one of server_lr, "),
        ("fedavgm:server_lr", "'server_lr' is not setting=value"),
        ("fedadam:server_lr=fast", "server_lr='fast' is not a number"),
        ("fedavg:keep_state=2", "keep_state is 0 or 1"),
    ):
        with pytest.raises(SystemExit, match=why):
            settings_from(parse_args(["--fl-strategy", bad]))
    with pytest.raises(SystemExit, match="--methods 'pooled'"):
        settings_from(parse_args(["--methods", "pooled"]))


def test_an_fl_strategy_entry_sets_its_server_optimiser_and_names_its_own_run() -> None:
    entry = "fedavgm:server_lr=0.7:server_momentum=0.3"
    s = settings_from(parse_args(["--fl-strategy", f"fedavg,{entry},fedavgm"]))
    assert s.fl_strategies == ["fedavg", entry, "fedavgm"]
    assert parse_fl_strategy(entry) == ("fedavgm", {"server_lr": 0.7, "server_momentum": 0.3})
    assert parse_fl_strategy("fedavg") == ("fedavg", {})
    # Each entry its own row and run folder; FedAvg keeps the historical names.
    assert [fl_label(x) for x in s.fl_strategies] == ["FL", f"FL ({entry})", "FL (fedavgm)"]
    assert [fl_run_label(x) for x in s.fl_strategies] == [
        "fl",
        "fl-fedavgm-server_lr0.7-server_momentum0.3",
        "fl-fedavgm",
    ]
    assert parse_fl_strategy("fedavg:keep_state=1") == ("fedavg", {"keep_state": 1.0})
    assert fl_run_label("fedavg:keep_state=1") == "fl-fedavg-keep_state1"
    # The settings reach the strategy: its recorded settings are the entry's.
    name, settings = parse_fl_strategy(entry)
    strategy = STRATEGIES[name](RunOptions(strategy=name, **settings), ["a", "b"])  # type: ignore[arg-type]
    assert strategy.settings() == {"server_lr": 0.7, "server_momentum": 0.3}


def test_outside_sites_validate_on_nearly_everything(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("datasets:\n  - name: brain\n    val_fraction: 0.25\n")
    _outside_sites_evaluate_everything(cfg)
    assert "val_fraction: 0.95" in cfg.read_text()
    with pytest.raises(RuntimeError, match=r"expected 'val_fraction: 0\.25'"):
        _outside_sites_evaluate_everything(cfg)


def test_generated_sites_get_a_secret_from_the_data_seed(tmp_path: Path) -> None:
    from agent.config import load_config
    from coordinator.demo_federation import generate_federation

    layout = generate_federation(tmp_path / "data", sites=2, subjects_per_site=[3, 3], size=32, seed=0)
    first, second = (x.config_path for x in layout.sites)
    fix_site_secret(first, 0)
    fix_site_secret(second, 0)
    secret = load_config(first).site_secret()
    assert secret != load_config(second).site_secret()
    fix_site_secret(first, 0)
    assert load_config(first).site_secret() == secret
    fix_site_secret(first, 1)
    assert load_config(first).site_secret() != secret


def test_a_site_whose_final_evaluation_failed_stops_the_reproduction_naming_it() -> None:
    inside: dict[str, dict[str, Any]] = {
        "site-1": {"dice": 0.8},
        "site-2": {"error": "HTTP 401: invalid or revoked token"},
    }
    outside: dict[str, dict[str, Any]] = {"site-11": {"dice": 0.7}}
    with pytest.raises(
        SystemExit, match=r"^cds-seed0: the final model's evaluation failed at 1 site\(s\): site-2: HTTP 401"
    ):
        require_every_site("cds-seed0", inside, outside)
    require_every_site("cds-seed0", {"site-1": {"dice": 0.8}}, outside)  # all answered: goes on


def _runner(offset: int) -> MethodRunner:
    """A runner's seeding alone: no agents, no data."""
    s = settings_from(parse_args(["--quick", "--sampling-seed-offset", str(offset)]))
    runner = object.__new__(MethodRunner)
    runner.s, runner.plan = s, make_plan(s)
    return runner


def test_a_sampling_seed_offset_draws_other_data_from_the_same_initial_weights() -> None:
    assert settings_from(parse_args([])).sampling_seed_offset == 0
    plain, other = _runner(0), _runner(1000)
    assert plain.seeded(2)["seed"] == 2 and other.seeded(2)["seed"] == 1002
    start = plain.start(2)
    # The same initial weights either way, those of seed 2 (not of the sampling seed).
    for weights in (other.start(2), initial_weights(plain.seeded(2))):
        assert weights.keys() == start.keys() and all(torch.equal(weights[k], start[k]) for k in start)
    assert any(not torch.equal(initial_weights(other.seeded(2))[k], start[k]) for k in start)
