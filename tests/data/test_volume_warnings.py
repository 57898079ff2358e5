"""Volume warnings reach the catalog: kept per subject with their category, shown by `data scan` and
`data list`, and a subject whose warnings fall in the dataset's `exclude_warnings` (default: geometry
that cannot be trusted) is never handed to training or evaluation."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from typer.testing import CliRunner

from agent.cli import app
from agent.config import WarningCategory, parse_config
from agent.data.catalog import dataset_items, dataset_summaries, item_details, scan_datasets
from agent.data.dicom import read_dicom_series
from agent.data.volume import VolumeWarning, read_nifti_volume, warning_category
from agent.db.engine import Database
from agent.errors import ConfigError
from tests.fixtures.catalog import SECRET, make_config, make_nifti_dataset, nifti_dataset_config
from tests.fixtures.dicom import write_series

SUBJECTS = ["case-a", "case-b", "case-c"]
MISPLACED = "case-b"


def _misplace_one_slice(folder: Path, by_mm: float = 200.0) -> None:
    """Move the middle slice of a series 200 mm along the normal, as a broken export would."""
    files = sorted(
        folder.iterdir(), key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)
    )
    middle = files[len(files) // 2]
    ds = pydicom.dcmread(middle)
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [f"{x:.6f}", f"{y:.6f}", f"{z + by_mm:.6f}"]
    ds.save_as(middle)


def _dicom_dataset(root: Path) -> None:
    for n, subject in enumerate(SUBJECTS):
        truth = write_series(root / subject / "t1", n_slices=8, rows=16, cols=16, seed=n)
        for f in truth.files:  # one patient per subject (the fixture gives all series the same one)
            ds = pydicom.dcmread(f)
            ds.PatientID = f"PAT-{subject}"
            ds.save_as(f)
    _misplace_one_slice(root / MISPLACED / "t1")


def _dicom_ds(root: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "scans",
        "format": "dicom",
        "root": str(root),
        "modalities": ["t1"],
        "images": "{subject}/{modality}",
        "label": None,
        "val_fraction": 0.34,
    } | overrides


def test_a_misplaced_slice_is_a_geometry_warning_made_with_its_category(tmp_path: Path) -> None:
    _dicom_dataset(tmp_path)
    volume = read_dicom_series(tmp_path / MISPLACED / "t1")
    [warning] = [w for w in volume.warnings if "non-uniform slice spacing" in w]
    assert warning_category(warning) is WarningCategory.GEOMETRY
    # Volumes read in worker processes are pickled: the category travels with the text.
    assert pickle.loads(pickle.dumps(warning)).category is WarningCategory.GEOMETRY
    assert warning_category("plain text") is WarningCategory.OTHER
    assert VolumeWarning("x", WarningCategory.TILT) == "x"


def test_scan_keeps_warnings_and_excludes_untrusted_geometry_by_default(tmp_path: Path, db: Database) -> None:
    _dicom_dataset(tmp_path / "data")
    cfg = make_config(tmp_path, [_dicom_ds(tmp_path / "data")])
    assert cfg.datasets[0].exclude_warnings == [WarningCategory.GEOMETRY]

    report = scan_datasets(cfg, db)
    [warned] = report.warned
    assert (warned.dataset, warned.subject, warned.excluded) == ("scans", MISPLACED, True)
    assert [(w["source"], w["category"]) for w in warned.warnings] == [("t1", "geometry")]
    assert report.datasets[0].num_excluded == 1
    assert report.audit_details()["datasets"][0]["excluded"] == 1

    details = item_details(db, "scans")
    excluded = [d for d in details if d["split"] == "excluded"]
    assert len(excluded) == 1 and "non-uniform slice spacing" in excluded[0]["warnings"][0]["message"]
    assert all(d["warnings"] == [] for d in details if d["split"] != "excluded")
    # Training and evaluation read dataset_items: the excluded subject is in neither split.
    items = dataset_items(db, "scans")
    assert len(items) == 2 and excluded[0]["subject_key"] not in {i.subject_key for i in items}
    assert {i.split for i in items} == {"train", "val"}
    for split in ("train", "val"):
        assert excluded[0]["subject_key"] not in {i.subject_key for i in dataset_items(db, "scans", split)}
    [summary] = dataset_summaries(db)
    assert (summary.num_train + summary.num_val, summary.num_excluded) == (2, 1)
    assert summary.public()["num_excluded"] == 1

    # A re-scan reuses the stored volume facts, warnings included: the subject stays excluded.
    again = scan_datasets(cfg, db)
    assert again.datasets[0].volumes_read == 0 and again.datasets[0].volumes_reused == 3
    assert [w.subject for w in again.warned if w.excluded] == [MISPLACED]
    assert dataset_summaries(db)[0].num_excluded == 1


def test_exclude_warnings_decides_which_categories_exclude(tmp_path: Path, db: Database) -> None:
    _dicom_dataset(tmp_path / "data")
    cfg = make_config(tmp_path, [_dicom_ds(tmp_path / "data", exclude_warnings=[])])
    report = scan_datasets(cfg, db)
    # Still listed with its warning, but trained on: the admin chose so.
    assert [(w.subject, w.excluded) for w in report.warned] == [(MISPLACED, False)]
    assert len(dataset_items(db, "scans")) == 3 and dataset_summaries(db)[0].num_excluded == 0

    cfg = make_config(tmp_path, [_dicom_ds(tmp_path / "data", exclude_warnings=["tilt", "slices"])])
    assert len(dataset_items(db, "scans")) == 3
    scan_datasets(cfg, db)
    assert dataset_summaries(db)[0].num_excluded == 0

    with pytest.raises(ConfigError, match="exclude_warnings"):
        make_config(tmp_path, [_dicom_ds(tmp_path / "data", exclude_warnings=["geomtry"])])


def test_nifti_without_orientation_is_excluded(tmp_path: Path, db: Database) -> None:
    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS)
    path = root / MISPLACED / "flair.nii.gz"
    img = nib.load(str(path))
    bare = nib.Nifti1Image(np.asarray(img.dataobj), None)  # no sform, no qform: orientation unknown
    bare.header.set_zooms((1.0, 1.0, 2.0))
    nib.save(bare, str(path))
    label = nib.load(str(root / MISPLACED / "seg.nii.gz"))
    relabel = nib.Nifti1Image(np.asarray(label.dataobj), None)
    relabel.header.set_zooms((1.0, 1.0, 2.0))
    nib.save(relabel, str(root / MISPLACED / "seg.nii.gz"))
    assert warning_category(read_nifti_volume(path).warnings[0]) is WarningCategory.GEOMETRY

    cfg = make_config(tmp_path, [nifti_dataset_config(root)])
    report = scan_datasets(cfg, db)
    [warned] = report.warned
    assert warned.subject == MISPLACED and warned.excluded
    assert {w["source"] for w in warned.warnings} == {"flair", "label"}
    assert len(dataset_items(db, "brain")) == 2


def _write_config(tmp_path: Path, ds: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    raw = {
        "site": {"id": "site-test", "secret": SECRET},
        "work_dir": str(tmp_path / "work"),
        "datasets": [ds],
    }
    path.write_text(yaml.safe_dump(raw))
    parse_config(raw, source=None, environ={}, check_paths=False)
    return path


def test_a_scan_line_stays_one_line_however_long(tmp_path: Path) -> None:
    """A script (or grep) reads the scan's report by line: a long subject name is not wrapped."""
    _dicom_dataset(tmp_path / "data")
    long_name = f"{MISPLACED}-exported-from-the-pacs-with-its-accession-number-and-a-long-series-description"
    (tmp_path / "data" / MISPLACED).rename(tmp_path / "data" / long_name)
    config = _write_config(tmp_path, _dicom_ds(tmp_path / "data"))
    scan = CliRunner().invoke(app, ["data", "scan", "--config", str(config), "--no-progress"])
    assert scan.exit_code == 0, scan.output
    [line] = [ln for ln in scan.output.splitlines() if long_name in ln]
    assert line.startswith("excluded") and "[geometry] t1: non-uniform slice spacing" in line


def test_data_scan_and_list_show_warnings_and_exclusions(tmp_path: Path) -> None:
    _dicom_dataset(tmp_path / "data")
    config = _write_config(tmp_path, _dicom_ds(tmp_path / "data"))
    runner = CliRunner()
    scan = runner.invoke(app, ["data", "scan", "--config", str(config), "--no-progress"])
    assert scan.exit_code == 0, scan.output
    lines = [line for line in scan.output.splitlines() if f"scans/{MISPLACED}" in line]
    assert len(lines) == 1
    assert lines[0].startswith("excluded") and "[geometry] t1: non-uniform slice spacing" in lines[0]

    listing = runner.invoke(app, ["data", "list", "--config", str(config), "--json"])
    assert listing.exit_code == 0, listing.output
    [ds] = json.loads(listing.output)["datasets"]
    assert ds["num_excluded"] == 1
    [item] = [i for i in ds["items"] if i["split"] == "excluded"]
    assert item["warnings"][0]["category"] == "geometry"

    table = runner.invoke(app, ["data", "list", "--config", str(config)], env={"COLUMNS": "300"})
    assert table.exit_code == 0, table.output
    assert "1 excluded" in table.output and "[geometry] t1: non-uniform" in table.output
