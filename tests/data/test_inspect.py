"""`fedsite data inspect` and `fedsite data convert` on a bare folder of mixed files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from agent.cli.data import data_app
from tests.fixtures.dicom import (
    FAKE_BIRTH_DATE,
    FAKE_INSTITUTION,
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    SeriesTruth,
    corrupt_copy,
    write_projection,
    write_series,
    write_text_sr,
)

IDENTITY = (
    FAKE_PATIENT_NAME,
    FAKE_PATIENT_ID,
    FAKE_BIRTH_DATE,
    FAKE_INSTITUTION,
    "20240117",
    "fixture series",
)


@pytest.fixture
def mixed_folder(tmp_path: Path) -> tuple[Path, SeriesTruth, np.ndarray]:
    root = tmp_path / "site"
    truth = write_series(root / "study" / "series1", n_slices=16, seed=21, slope=2.0, intercept=-5.0)
    corrupt_copy(truth.files[0], root / "study" / "broken.dcm", keep_fraction=0.3)
    write_text_sr(root / "study" / "report.dcm")
    (root / "notes.txt").write_text("hello\n")
    nifti = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    nib.save(nib.Nifti1Image(nifti, np.diag([1.5, 1.5, 2.0, 1.0])), root / "flair.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4)), root / "dwi.nii.gz")
    return root, truth, nifti


def test_inspect_json_lists_volumes_skips_and_non_images(
    mixed_folder: tuple[Path, SeriesTruth, np.ndarray],
) -> None:
    root, _, _ = mixed_folder
    result = CliRunner().invoke(data_app, ["inspect", str(root), "--json", "--workers", "1"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) >= {"volumes", "skipped", "non_image"}
    by_source = {v["source"]: v for v in out["volumes"]}
    assert len(out["volumes"]) == 2
    dicom = by_source["dicom"]
    assert dicom["shape"] == [32, 32, 16] and dicom["num_slices"] == 16
    assert dicom["spacing"] == pytest.approx([0.8, 0.9, 2.5])
    assert dicom["modality"] == "MR" and dicom["files"] == 16 and dicom["warnings"] == []
    assert dicom["orientation"] == "LPS"
    nifti = by_source["nifti"]
    assert nifti["shape"] == [6, 7, 8] and nifti["spacing"] == pytest.approx([1.5, 1.5, 2.0])
    assert nifti["files"] == 1 and nifti["orientation"] == "RAS"
    skipped = {Path(s["path"]).name: s["reason"] for s in out["skipped"]}
    assert set(skipped) == {"broken.dcm", "notes.txt", "dwi.nii.gz"}
    assert "truncated" in skipped["broken.dcm"]
    assert "is 4D: 3 volumes" in skipped["dwi.nii.gz"]
    assert out["non_image"] == {"Basic Text SR Storage": 1}
    for secret in IDENTITY:
        assert secret not in result.output


def test_inspect_table_and_missing_path(
    mixed_folder: tuple[Path, SeriesTruth, np.ndarray], tmp_path: Path
) -> None:
    root, _, _ = mixed_folder
    result = CliRunner().invoke(data_app, ["inspect", str(root), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "dicom" in result.output and "nifti" in result.output
    assert "Basic Text SR Storage: 1" in result.output
    for secret in IDENTITY:
        assert secret not in result.output

    missing = CliRunner().invoke(data_app, ["inspect", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2
    assert "no such file or folder" in missing.output


def test_convert_writes_the_agents_view_as_nifti(
    mixed_folder: tuple[Path, SeriesTruth, np.ndarray], tmp_path: Path
) -> None:
    root, truth, nifti = mixed_folder
    outdir = tmp_path / "converted"
    result = CliRunner().invoke(data_app, ["convert", str(root), str(outdir), "--workers", "1"])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in outdir.iterdir())
    assert written == ["000_nifti.nii.gz", "001_MR.nii.gz"]
    # Each source folder is named with its file count and the file it became.
    assert f"{truth.folder} (16 file(s), dicom) -> {outdir / '001_MR.nii.gz'}" in result.output
    assert f"{root / 'flair.nii.gz'} (1 file(s), nifti) -> {outdir / '000_nifti.nii.gz'}" in result.output
    assert "dwi.nii.gz" in result.output  # reported as skipped
    for secret in IDENTITY:
        assert secret not in result.output
        assert all(secret not in name for name in written)

    series = nib.load(outdir / "001_MR.nii.gz")
    np.testing.assert_array_equal(series.get_fdata(), truth.array)
    assert series.get_data_dtype() == np.int16  # integral values are stored exactly in half the space
    np.testing.assert_allclose(series.affine, truth.affine, atol=1e-4)
    header_text = series.header["descrip"].tobytes() + series.header["db_name"].tobytes()
    assert FAKE_PATIENT_ID.encode() not in header_text
    np.testing.assert_array_equal(nib.load(outdir / "000_nifti.nii.gz").get_fdata(), nifti)

    as_json = CliRunner().invoke(data_app, ["convert", str(root), str(tmp_path / "again"), "--json"])
    assert as_json.exit_code == 0, as_json.output
    mapping = json.loads(as_json.stdout)
    assert [w["files"] for w in mapping["written"]] == [1, 16]


def test_convert_with_nothing_to_convert_or_a_bad_outdir(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    result = CliRunner().invoke(data_app, ["convert", str(tmp_path / "empty"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "no volume found" in result.output
    assert not (tmp_path / "out").exists()

    truth = write_series(tmp_path / "s", n_slices=16, seed=22)
    (tmp_path / "afile").write_text("x")
    bad = CliRunner().invoke(data_app, ["convert", str(truth.folder), str(tmp_path / "afile")])
    assert bad.exit_code == 2
    assert "not a folder" in bad.output


def test_data_commands_are_merged_into_the_fedsite_cli(tmp_path: Path) -> None:
    from agent.cli import app

    truth = write_series(tmp_path / "s", n_slices=16, seed=23)
    shutil.copy(truth.files[0], tmp_path / "s" / "duplicate")
    result = CliRunner().invoke(app, ["data", "inspect", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.output
    volume = json.loads(result.stdout)["volumes"][0]
    assert volume["num_slices"] == 16
    assert any("duplicate" in w for w in volume["warnings"])


def test_a_radiograph_with_zero_spacing_does_not_stop_inspect_or_convert(tmp_path: Path) -> None:
    root = tmp_path / "site"
    write_projection(root / "xr", n_images=1, pixel_spacing=(0.0, 0.0))
    truth = write_series(root / "mr", n_slices=16, seed=26)
    result = CliRunner().invoke(data_app, ["inspect", str(root), "--json", "--workers", "1"])
    assert result.exit_code == 0, result.output
    volumes = {v["modality"]: v for v in json.loads(result.stdout)["volumes"]}
    assert set(volumes) == {"CR", "MR"}
    assert volumes["CR"]["spacing"][:2] == [1.0, 1.0]
    assert any("PixelSpacing is zero" in w for w in volumes["CR"]["warnings"])
    table = CliRunner().invoke(data_app, ["inspect", str(root), "--workers", "1"])
    assert table.exit_code == 0, table.output

    outdir = tmp_path / "out"
    converted = CliRunner().invoke(data_app, ["convert", str(root), str(outdir), "--workers", "1"])
    assert converted.exit_code == 0, converted.output
    assert sorted(p.name for p in outdir.iterdir()) == ["000_MR.nii.gz", "001_CR.nii.gz"]
    np.testing.assert_array_equal(nib.load(outdir / "000_MR.nii.gz").get_fdata(), truth.array)
    assert "PixelSpacing is zero" in converted.output


def test_one_volume_that_cannot_be_written_does_not_stop_convert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nibabel.spatialimages import HeaderDataError

    from agent.data import inspect as inspect_module

    root = tmp_path / "site"
    write_series(root / "a", n_slices=16, seed=27)
    write_series(root / "b", n_slices=16, seed=28)
    real_write = inspect_module.write_nifti

    def write_or_fail(volume: object, path: Path) -> Path:
        if path.name.startswith("000_"):
            raise HeaderDataError("Could not decompose affine")  # what nibabel raises, not a VolumeError
        return real_write(volume, path)  # type: ignore[arg-type]

    monkeypatch.setattr(inspect_module, "write_nifti", write_or_fail)
    outdir = tmp_path / "out"
    result = CliRunner().invoke(data_app, ["convert", str(root), str(outdir), "--json", "--workers", "1"])
    assert result.exit_code == 2
    out = json.loads(result.stdout)
    assert [w["output"] for w in out["written"]] == [str(outdir / "001_MR.nii.gz")]
    (failure,) = out["failed"]
    assert failure["index"] == 0 and "Could not decompose affine" in failure["error"]
    assert sorted(p.name for p in outdir.iterdir()) == ["001_MR.nii.gz"]


def test_convert_json_explains_why_nothing_was_converted(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    truth = write_series(tmp_path / "s", n_slices=16, seed=29)
    corrupt_copy(truth.files[0], tmp_path / "empty" / "broken.dcm", keep_fraction=0.3)
    result = CliRunner().invoke(
        data_app, ["convert", str(tmp_path / "empty"), str(tmp_path / "out"), "--json"]
    )
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert "no volume found" in out["error"]
    assert out["written"] == [] and out["files_seen"] == 2
    reasons = {Path(s["path"]).name: s["reason"] for s in out["skipped"]}
    assert set(reasons) == {"readme.txt", "broken.dcm"} and "truncated" in reasons["broken.dcm"]
    assert not (tmp_path / "out").exists()

    (tmp_path / "afile").write_text("x")
    bad = CliRunner().invoke(data_app, ["convert", str(truth.folder), str(tmp_path / "afile"), "--json"])
    assert bad.exit_code == 2 and "not a folder" in json.loads(bad.stdout)["error"]
    missing = CliRunner().invoke(
        data_app, ["convert", str(tmp_path / "nowhere"), str(tmp_path / "o"), "--json"]
    )
    assert missing.exit_code == 2 and "no such file or folder" in json.loads(missing.stdout)["error"]
    inspect_missing = CliRunner().invoke(data_app, ["inspect", str(tmp_path / "nowhere"), "--json"])
    assert inspect_missing.exit_code == 2
    assert "no such file or folder" in json.loads(inspect_missing.stdout)["error"]


def test_inspect_shows_names_that_look_like_markup_as_they_are(tmp_path: Path) -> None:
    """Folder and file names are values: "[anon]" is shown, and "[/anon]" (a closing tag to rich,
    which stopped the command) is shown too."""
    root = tmp_path / "export [/anon]"
    write_series(root / "series [t1]", n_slices=4, seed=3)
    (root / "notes [v2].txt").write_text("hello\n")
    result = CliRunner().invoke(data_app, ["inspect", str(root), "--workers", "1"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert f"Volumes in {root}" in result.output
    assert f"{root / 'notes [v2].txt'}" in result.output
