"""DICOM volumes keep their stored integers: the same values as the float assembly, written as stored.

A series of 8- or 16-bit integer pixels with one rescale keeps the stored values
(`Volume.stored`); `Volume.array` computes float32 from them on first use with the float
assembly's arithmetic, and `write_nifti` writes the integers themselves (the whole-number
intercept in ``scl_inter``), as dcm2niix does. Anything else (a rescale that differs between
slices, MONOCHROME1, wider types) takes the float assembly, as before.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread

from agent.data.dicom import read_dicom_series
from agent.data.volume import StoredVoxels, Volume, read_nifti_volume, write_nifti
from tests.fixtures.dicom import write_series


def _float_assembly(truth_stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """The frame-by-frame float assembly's arithmetic on stored values (slope in float64, + in float32)."""
    out = np.empty(truth_stored.shape, dtype=np.float32)
    np.multiply(truth_stored, slope, out=out, casting="unsafe")
    out += np.float32(intercept)
    return out


@pytest.mark.parametrize(("slope", "intercept"), [(1.0, 0.0), (1.0, -1024.0), (0.37, 12.5), (2.0, -3.0)])
def test_a_rescaled_series_keeps_its_stored_values_and_gives_the_float_assembly_bits(
    tmp_path: Path, slope: float, intercept: float
) -> None:
    truth = write_series(
        tmp_path / "s", n_slices=6, rows=20, cols=24, slope=slope, intercept=intercept, seed=3
    )
    volume = read_dicom_series(tmp_path / "s")
    assert volume.stored is not None and volume.stored.values.dtype == np.int16
    assert (volume.stored.slope, volume.stored.intercept) == (slope, intercept)
    assert volume.shape == truth.array.shape
    stored = volume.stored.values.copy()
    expected = _float_assembly(stored, slope, intercept)
    got = volume.array
    assert got.dtype == np.float32 and got.shape == truth.array.shape
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    np.testing.assert_allclose(got, truth.array, rtol=1e-6, atol=1e-3)
    assert volume.array is got  # computed once


def test_a_whole_number_intercept_is_written_as_stored_integers_with_scl_inter(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n_slices=5, rows=16, cols=18, intercept=-1024.0, modality="CT", seed=4)
    volume = read_dicom_series(tmp_path / "s")
    assert volume.stored is not None
    path = write_nifti(volume, tmp_path / "ct.nii")
    img = nib.load(path)
    assert img.get_data_dtype() == np.int16
    # nibabel moves the file's scl_slope / scl_inter into the data proxy when it loads.
    assert (img.dataobj.slope, img.dataobj.inter) == (1.0, -1024.0)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj.get_unscaled()), volume.stored.values)
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), volume.array)
    np.testing.assert_allclose(img.affine, volume.affine, atol=1e-5)  # the header holds float32
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    again = read_nifti_volume(path)
    np.testing.assert_array_equal(again.array, volume.array)
    # The .nii.gz writer takes the same path.
    gz = nib.load(write_nifti(volume, tmp_path / "ct.nii.gz"))
    np.testing.assert_array_equal(gz.get_fdata(dtype=np.float32), volume.array)
    assert not list(tmp_path.glob(".*partial*"))


def test_a_fractional_rescale_is_written_as_float32_values(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n_slices=4, rows=12, cols=10, slope=0.37, intercept=12.5, seed=5)
    volume = read_dicom_series(tmp_path / "s")
    img = nib.load(write_nifti(volume, tmp_path / "v.nii"))
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(img.dataobj), volume.array)


def test_unsigned_values_past_int16_stay_exact(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n_slices=4, rows=12, cols=10, seed=6)
    for path in sorted((tmp_path / "s").iterdir()):
        ds = dcmread(path)
        values = np.frombuffer(ds.PixelData, dtype="<i2").astype(np.int32) + 40000
        ds.PixelRepresentation = 0
        ds.PixelData = values.astype("<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)
    volume = read_dicom_series(tmp_path / "s")
    assert volume.stored is not None and volume.stored.values.dtype == np.uint16
    assert float(volume.array.max()) > 32767
    img = nib.load(write_nifti(volume, tmp_path / "v.nii"))
    assert img.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asarray(img.dataobj, dtype=np.float32), volume.array)


def test_a_rescale_that_changes_between_slices_takes_the_float_assembly(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n_slices=4, rows=12, cols=10, slope=2.0, seed=7)
    first = sorted((tmp_path / "s").iterdir())[0]
    ds = dcmread(first)
    ds.RescaleSlope = "3"
    ds.save_as(first, enforce_file_format=True)
    volume = read_dicom_series(tmp_path / "s")
    assert volume.stored is None
    raw = volume.array
    assert raw.dtype == np.float32


@pytest.mark.skipif(
    subprocess.run(["which", "dcm2niix"], capture_output=True).returncode != 0, reason="no dcm2niix"
)
def test_the_stored_nifti_holds_what_dcm2niix_writes(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n_slices=6, rows=20, cols=24, intercept=-1024.0, modality="CT", seed=8)
    # dcm2niix may flip rows and reverse slices: compared in the closest canonical orientation.
    ours = nib.as_closest_canonical(
        nib.load(write_nifti(read_dicom_series(tmp_path / "s"), tmp_path / "ours.nii"))
    )
    out = tmp_path / "d2n"
    out.mkdir()
    subprocess.run(
        ["dcm2niix", "-z", "n", "-f", "%s", "-o", str(out), str(tmp_path / "s")],
        check=True,
        capture_output=True,
    )
    (theirs_path,) = out.glob("*.nii")
    theirs = nib.as_closest_canonical(nib.load(theirs_path))
    assert theirs.get_data_dtype() == ours.get_data_dtype() == np.int16
    np.testing.assert_array_equal(ours.get_fdata(), theirs.get_fdata())
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)


def test_a_volume_takes_its_array_or_its_stored_voxels_not_both_nor_neither() -> None:
    stored = StoredVoxels(np.zeros((2, 2, 2), dtype=np.int16), 1.0, 0.0)
    common = {"affine": np.eye(4), "modality": "MR", "source": "dicom", "files": []}
    with pytest.raises(ValueError, match="either"):
        Volume(array=np.zeros((2, 2, 2), dtype=np.float32), stored=stored, **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="either"):
        Volume(**common)  # type: ignore[arg-type]
