"""Pixel transforms between stored values and the modality's values: Modality LUT, MONOCHROME1, palette.

The expected values come from pydicom (its ``pixel_array`` and ``apply_modality_lut``), not from the
reader's own arithmetic; the MONOCHROME1 and palette files are real ones shipped with pydicom.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.sequence import Sequence

from agent.data.dicom import scan_dicom_folder

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _single_volume(folder: Path) -> np.ndarray:
    scan = scan_dicom_folder(folder, workers=1)
    assert len(scan.volumes) == 1, scan.skipped
    return scan.volumes[0].array[:, :, 0].T  # back to (row, column)


def test_a_real_monochrome1_radiograph_is_inverted_within_its_stored_range(tmp_path: Path) -> None:
    src = TEST_FILES / "dicomdirtests" / "77654033" / "CR1" / "6154"
    shutil.copy(src, tmp_path / "cr.dcm")
    ds = pydicom.dcmread(src)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    # 12 stored bits: stored 0 is the brightest, 4095 the darkest; after inversion the reverse.
    low, high = intercept, 4095 * slope + intercept
    expected = low + high - (ds.pixel_array.astype(np.float64) * slope + intercept)
    scan = scan_dicom_folder(tmp_path, workers=1)
    vol = scan.volumes[0]
    np.testing.assert_allclose(vol.array[:, :, 0].T, expected, rtol=1e-6, atol=1e-3)
    assert any("MONOCHROME1" in w and "inverted" in w for w in vol.warnings)


def test_monochrome1_through_the_general_path_matches_the_fast_path(tmp_path: Path) -> None:
    """The same image written big endian (read by pydicom, not the fast walker) gives the same values."""
    src = TEST_FILES / "dicomdirtests" / "77654033" / "CR1" / "6154"
    (tmp_path / "le").mkdir()
    (tmp_path / "be").mkdir()
    shutil.copy(src, tmp_path / "le" / "cr.dcm")
    ds = pydicom.dcmread(src)
    ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
    ds["PixelData"].VR = "OW"
    pydicom.dcmwrite(
        tmp_path / "be" / "cr.dcm", ds, little_endian=False, implicit_vr=False, force_encoding=True
    )
    np.testing.assert_array_equal(_single_volume(tmp_path / "le"), _single_volume(tmp_path / "be"))


def test_a_real_palette_colour_image_is_refused_like_rgb(tmp_path: Path) -> None:
    shutil.copy(TEST_FILES / "examples_palette.dcm", tmp_path / "palette.dcm")
    scan = scan_dicom_folder(tmp_path, workers=1)
    assert scan.volumes == []
    assert len(scan.skipped) == 1
    assert "palette colour image (PALETTE COLOR)" in scan.skipped[0].reason
    assert "only greyscale" in scan.skipped[0].reason


def _with_modality_lut(folder: Path, *, undefined_length: bool, monochrome1: bool = False) -> Dataset:
    """CT_small.dcm with a Modality LUT (a non-linear table) that must replace its rescale."""
    folder.mkdir()
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    item = Dataset()
    first, entries = 0, 4096
    item.LUTDescriptor = [entries, first, 16]
    item.ModalityLUTType = "HU"
    table = ((np.arange(entries, dtype=np.float64) / (entries - 1)) ** 2 * 3000).astype(np.uint16)
    item.LUTData = table.astype("<u2").tobytes()  # OW, as scanners write it
    ds.ModalityLUTSequence = Sequence([item])
    ds["ModalityLUTSequence"].is_undefined_length = undefined_length
    if monochrome1:
        ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(folder / "ct.dcm", enforce_file_format=True)
    return pydicom.dcmread(folder / "ct.dcm")


@pytest.mark.parametrize("undefined_length", [False, True])
def test_a_modality_lut_is_applied_as_pydicom_applies_it(tmp_path: Path, undefined_length: bool) -> None:
    ds = _with_modality_lut(tmp_path / "s", undefined_length=undefined_length)
    expected = apply_modality_lut(ds.pixel_array, ds)
    rescaled = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert not np.allclose(expected, rescaled)  # the LUT, not the rescale, decides
    np.testing.assert_allclose(_single_volume(tmp_path / "s"), expected)


def test_monochrome1_with_a_modality_lut_is_inverted_within_the_table(tmp_path: Path) -> None:
    ds = _with_modality_lut(tmp_path / "s", undefined_length=False, monochrome1=True)
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    table = np.frombuffer(ds.ModalityLUTSequence[0].LUTData, dtype="<u2").astype(np.float64)
    expected = table.min() + table.max() - values
    np.testing.assert_allclose(_single_volume(tmp_path / "s"), expected)
