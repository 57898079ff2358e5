"""benchmarks/loader_threads.py runs its three ways of loading and reports them against the baseline."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent.data import loading
from benchmarks import loader_threads


def test_each_way_loads_as_it_says_and_the_report_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keyed by the dataset itself (kept alive here), one per loader: ids could be reused.
    placed_by: dict[loading.TrainSamples, set[threading.Thread]] = {}
    real = loading.TrainSamples._region

    def recording(self: loading.TrainSamples, index: int) -> Any:
        placed_by.setdefault(self, set()).add(threading.current_thread())
        return real(self, index)

    monkeypatch.setattr(loading.TrainSamples, "_region", recording)
    out = tmp_path / "out"
    assert loader_threads.main(["--out", str(out), "--subjects", "2", "--repeats", "1", "--epochs", "1"]) == 0
    result = json.loads((out / "loader_threads.json").read_text())
    assert set(result["cases"]) == {"2d", "3d"}
    for case in result["cases"].values():
        assert set(case["ms_per_batch"]) == set(loader_threads.WAYS)
        assert all(v > 0 for v in case["ms_per_batch"].values())
        assert case["ratio_to_no_threads"]["no_threads"] == 1.0
    assert (out / "loader_threads.png").stat().st_size > 0
    # A loader per epoch, way and case: the baseline's (and the one that fills each case's cache)
    # place in this thread, the epoch's threads are 2 at most, and stopping them after each batch
    # gives new ones for the next (16 batches of 2 an epoch).
    main = threading.current_thread()
    baseline = [t for t in placed_by.values() if t == {main}]
    per_epoch = [t for t in placed_by.values() if main not in t and len(t) <= 2]
    per_batch = [t for t in placed_by.values() if main not in t and len(t) > 2]
    assert (len(baseline), len(per_epoch), len(per_batch)) == (4, 2, 2)


def test_too_few_threads_is_refused() -> None:
    with pytest.raises(SystemExit, match="--threads is 1; it must be at least 2"):
        loader_threads.main(["--threads", "1"])
