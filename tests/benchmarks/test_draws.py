"""benchmarks/draws.py: several draws of the data per seed, read together."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.draws import DrawsError, compare, main

FL = "FL (fedavgm:server_lr=0.7:server_momentum=0.3)"


def _doc(offset: int, cds: dict[int, float], fl: dict[int, float], **settings: Any) -> dict[str, Any]:
    return {
        "benchmark": "paper_reproduction",
        "settings": {"out": f"runs/off{offset}", "sampling_seed_offset": offset, "seeds": [0, 1], "lr": 0.003}
        | settings,
        "methods": {
            FL: [{"seed": s, "inside": v} for s, v in fl.items()],
            "CDS": [{"seed": s, "inside": v} for s, v in cds.items()],
        },
    }


DOCS = [
    _doc(1000, {0: 0.80, 1: 0.50}, {0: 0.76, 1: 0.50}),
    _doc(0, {0: 0.80, 1: 0.50}, {0: 0.80, 1: 0.496}),
    _doc(2000, {0: 0.75, 1: 0.50}, {0: 0.75, 1: 0.499}),
]


def test_per_seed_percentages_pair_each_draw_with_its_own_cds() -> None:
    report = compare(DOCS)
    assert report["sampling_seed_offsets"] == [0, 1000, 2000]
    assert report["runs"] == ["runs/off0", "runs/off1000", "runs/off2000"]  # in the order of the draws
    seed0 = report["per_seed"]["0"]
    assert seed0["CDS"]["dice"] == [0.80, 0.80, 0.75]
    assert seed0["CDS"]["range_pct_of_mean"] == pytest.approx(100 * 0.05 / (2.35 / 3))
    assert seed0[FL]["pct_of_cds"] == pytest.approx([100.0, 95.0, 100.0])
    assert seed0[FL]["pct_of_cds_mean"] == pytest.approx(100 * (2.31 / 3) / (2.35 / 3))
    # stdev of (100, 95, 100) over sqrt(3)
    assert seed0[FL]["pct_standard_error"] == pytest.approx(2.886751 / 3**0.5, rel=1e-6)
    seed1 = report["per_seed"]["1"]
    assert seed1[FL]["pct_of_cds"] == pytest.approx([99.2, 100.0, 99.8])
    summary = report["summary"][FL]
    assert summary["seeds_within_0.5pct"] == 1  # seed 1 (99.67% of the means); seed 0 at 98.3%
    assert summary["draws_within_0.5pct"] == 4  # 100, 100 on seed 0; 100, 99.8 on seed 1


def test_runs_that_differ_in_more_than_the_draw_are_refused_by_setting() -> None:
    other = _doc(3000, {0: 0.8, 1: 0.5}, {0: 0.8, 1: 0.5}, lr=0.01)
    with pytest.raises(DrawsError, match=r"runs/off3000: setting lr is 0\.01, runs/off1000 has 0\.003"):
        compare([*DOCS, other])
    with pytest.raises(DrawsError, match=r"two runs share a draw: sampling seed offsets \[1000, 0, 0\]"):
        compare([*DOCS[:2], DOCS[1]])
    with pytest.raises(DrawsError, match="give at least two runs"):
        compare(DOCS[:1])


def test_main_writes_json_and_png_and_names_an_unreadable_run(tmp_path: Path) -> None:
    folders = []
    for doc in DOCS:
        folder = tmp_path / doc["settings"]["out"]
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(doc))
        folders.append(str(folder))
    out = tmp_path / "draws"
    assert main([*folders, "--out", str(out)]) == 0
    written = json.loads((out / "draws.json").read_text())
    assert written["summary"][FL]["seeds_within_0.5pct"] == 1
    assert (out / "draws.png").stat().st_size > 0

    no_cds = tmp_path / "no-cds"
    no_cds.mkdir()
    doc = {**DOCS[0], "methods": {FL: DOCS[0]["methods"][FL]}}
    (no_cds / "results.json").write_text(json.dumps(doc))
    with pytest.raises(SystemExit, match=r"no-cds/results\.json: has no CDS runs"):
        main([folders[0], str(no_cds), "--out", str(out)])
    with pytest.raises(SystemExit, match=r"missing/results\.json: cannot read"):
        main([folders[0], str(tmp_path / "missing"), "--out", str(out)])
