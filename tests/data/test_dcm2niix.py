"""Our assembled volumes equal dcm2niix's conversion of the same files, once both are brought to RAS.

dcm2niix may flip rows and reverse slices; nibabel's ``as_closest_canonical`` undoes such axis flips and
permutations exactly, so after it both must agree voxel for voxel, with affines within 1e-3 mm.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom.data
import pytest

from agent.cli.data import data_app
from agent.data.dicom import scan_dicom_folder
from agent.data.volume import Volume
from tests.fixtures.dicom import oblique_orientation, write_enhanced_mr, write_series

pytestmark = [
    pytest.mark.dcm2niix,
    pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not installed"),
]


def _dcm2niix(folder: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    # -x n: no cropping or reorienting; -z n: plain .nii; -f %s_%j: named by series number and series UID.
    proc = subprocess.run(
        ["dcm2niix", "-z", "n", "-x", "n", "-f", "%s_%j", "-o", str(out), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted(out.glob("*.nii"))


def _assert_same_in_ras(ours: Volume, reference: Path) -> None:
    theirs = nib.as_closest_canonical(nib.load(reference))
    mine = nib.as_closest_canonical(nib.Nifti1Image(ours.array, ours.affine))
    assert mine.shape == theirs.shape
    np.testing.assert_allclose(mine.affine, theirs.affine, atol=1e-3)
    np.testing.assert_allclose(mine.get_fdata(), theirs.get_fdata(), rtol=1e-5, atol=1e-3)


def _single(folder: Path, tmp_path: Path) -> tuple[Volume, Path]:
    scan = scan_dicom_folder(folder, workers=1)
    assert len(scan.volumes) == 1
    outputs = _dcm2niix(folder, tmp_path / "dcm2niix")
    assert len(outputs) == 1, outputs
    return scan.volumes[0], outputs[0]


@pytest.mark.parametrize(
    ("name", "orientation"),
    [
        ("axial", "axial"),
        ("sagittal", "sagittal"),
        ("coronal", "coronal"),
        ("oblique", oblique_orientation()),
        ("double-oblique", oblique_orientation(-28.0, 35.0)),
    ],
)
def test_generated_series_match_dcm2niix(
    tmp_path: Path, name: str, orientation: str | tuple[float, ...]
) -> None:
    folder = tmp_path / name
    write_series(folder, orientation=orientation, n_slices=20, seed=31, slope=0.5, intercept=12.0)
    ours, reference = _single(folder, tmp_path)
    _assert_same_in_ras(ours, reference)


def test_enhanced_multiframe_matches_dcm2niix(tmp_path: Path) -> None:
    write_enhanced_mr(tmp_path / "mf" / "enhanced.dcm", orientation=oblique_orientation(12.0, -21.0))
    ours, reference = _single(tmp_path / "mf", tmp_path)
    _assert_same_in_ras(ours, reference)


def test_real_ct_series_from_pydicom_matches_dcm2niix(tmp_path: Path) -> None:
    source = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    shutil.copytree(source, tmp_path / "ct")
    ours, reference = _single(tmp_path / "ct", tmp_path)
    assert ours.shape == (16, 16, 5)
    _assert_same_in_ras(ours, reference)


def test_convert_output_matches_dcm2niix(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    folder = tmp_path / "series"
    write_series(folder, orientation=oblique_orientation(5.0, 40.0), n_slices=16, seed=32)
    result = CliRunner().invoke(data_app, ["convert", str(folder), str(tmp_path / "ours"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    converted = nib.load(tmp_path / "ours" / "000_MR.nii.gz")
    reference = _dcm2niix(folder, tmp_path / "dcm2niix")[0]
    theirs = nib.as_closest_canonical(nib.load(reference))
    mine = nib.as_closest_canonical(converted)
    assert mine.shape == theirs.shape
    np.testing.assert_allclose(mine.affine, theirs.affine, atol=1e-3)
    np.testing.assert_allclose(mine.get_fdata(), theirs.get_fdata(), atol=1e-3)
    assert converted.header.get_sform(coded=True)[1] == 1
