"""The retention-history benchmark on its smallest setting. Its timings are not asserted; what
must hold is that both passes ran over the history it built without deleting anything (the
rows are rounds whose files are kept), and that it wrote its JSON and its picture."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# The benchmarks are scripts next to the packages, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.retention_history import main


def test_both_passes_run_over_each_history_length(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--history", "5,20", "--repeats", "1", "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((tmp_path / "retention_history.json").read_text())
    assert printed == result
    assert [row["history"] for row in result["by_history"]] == [5, 20]
    for row in result["by_history"]:
        assert row["full_pass_s"] > 0 and row["narrowed_pass_s"] > 0, row
    assert (tmp_path / "retention_history.png").stat().st_size > 0


def test_a_history_that_does_not_grow_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--history", "20,5", "--out", str(tmp_path)])
