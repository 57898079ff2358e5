"""Siemens mosaics: real EPI/DWI files from nibabel's test data are split into their slices.

The files are the ones nibabel ships (`nibabel/nicom/tests/data`), read from the installed package,
never downloaded. Expected tiles come from pydicom's pixel array, expected geometry from nibabel's own
mosaic wrapper (independently of our reader) and, in the `dcm2niix` tests, from dcm2niix.
"""

from __future__ import annotations

import gzip
import math
import shutil
import subprocess
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from agent.data.dicom import scan_dicom_folder
from agent.data.volume import Volume

# Located without importing nibabel.nicom, which warns on import that its DICOM readers are experimental.
NICOM_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _real_mosaic(name: str, folder: Path) -> Path:
    """A copy of one of nibabel's gzipped mosaic files, unpacked as a scanner writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / name.removesuffix(".gz")
    out.write_bytes(gzip.decompress((NICOM_DATA / name).read_bytes()))
    return out


def _second_time_point(folder: Path) -> Path:
    """siemens_dwi_0 with its pixels changed: nibabel ships it with the same pixels as the b=1000 file.

    Its header (geometry, CSA, InstanceNumber 1) is the real one; only the values differ, as those of
    two real acquisitions do, so that the two mosaics are two volumes and not a duplicated file.
    """
    path = _real_mosaic("siemens_dwi_0.dcm.gz", folder)
    ds = pydicom.dcmread(path)
    ds.PixelData = (ds.pixel_array // 2 + 1).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(path)
    return path


def _tiles(path: Path) -> np.ndarray:
    """The mosaic's tiles as (column, row, slice), cut from pydicom's pixel array."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0)
    )
    count = 48  # NumberOfImagesInMosaic of these files (nibabel's own tests say so too)
    grid = math.ceil(math.sqrt(count))
    rows, cols = pixels.shape[0] // grid, pixels.shape[1] // grid
    tiles = [
        pixels[r * rows : (r + 1) * rows, c * cols : (c + 1) * cols]
        for r, c in map(lambda k: divmod(k, grid), range(count))
    ]
    return np.stack([t.T for t in tiles], axis=2)


def test_a_real_siemens_dwi_mosaic_becomes_a_volume_of_its_48_slices(tmp_path: Path) -> None:
    path = _real_mosaic("siemens_dwi_1000.dcm.gz", tmp_path / "dwi")
    scan = scan_dicom_folder(tmp_path / "dwi", workers=1)
    assert scan.skipped == []
    (vol,) = scan.volumes
    assert vol.shape == (128, 128, 48)  # not one 896 x 896 tile image
    np.testing.assert_array_equal(vol.array, _tiles(path))
    assert any("Siemens mosaic: 48 slices" in w for w in vol.warnings)

    # nibabel's mosaic wrapper, independently of our reader: first voxel and slice direction.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom.dicomwrappers import wrapper_from_data

        wrapper = wrapper_from_data(pydicom.dcmread(path))
    np.testing.assert_allclose(vol.affine[:3, 3], LPS_TO_RAS @ np.asarray(wrapper.image_position), atol=1e-4)
    slice_step = LPS_TO_RAS @ (
        np.asarray(wrapper.slice_normal) * float(pydicom.dcmread(path).SpacingBetweenSlices)
    )
    np.testing.assert_allclose(vol.affine[:3, 2], slice_step, atol=1e-4)
    assert vol.spacing[2] == pytest.approx(3.0)


def test_a_mosaic_whose_csa_header_was_stripped_is_skipped_not_read_as_tiles(tmp_path: Path) -> None:
    path = _real_mosaic("siemens_dwi_1000.dcm.gz", tmp_path / "dwi")
    ds = pydicom.dcmread(path)
    ds.remove_private_tags()  # what anonymisers often do
    ds.save_as(path)
    scan = scan_dicom_folder(tmp_path / "dwi", workers=1)
    assert scan.volumes == []
    (skipped,) = scan.skipped
    assert "Siemens mosaic without NumberOfImagesInMosaic" in skipped.reason


def test_a_mosaic_whose_grid_does_not_fit_its_size_is_skipped_with_the_reason(tmp_path: Path) -> None:
    """nibabel's 0.dcm: a 256 x 256 mosaic that claims 48 images (a 7 x 7 grid) cannot be cut."""
    (tmp_path / "s").mkdir()
    shutil.copy(NICOM_DATA / "0.dcm", tmp_path / "s" / "0.dcm")
    scan = scan_dicom_folder(tmp_path / "s", workers=1)
    assert scan.volumes == []
    assert "cannot hold a 7x7 grid of tiles for its 48 images" in scan.skipped[0].reason


def test_a_series_of_mosaics_is_4d_and_follows_the_4d_rule(tmp_path: Path) -> None:
    b0 = _second_time_point(tmp_path / "dwi")
    b1000 = _real_mosaic("siemens_dwi_1000.dcm.gz", tmp_path / "dwi")
    scan = scan_dicom_folder(tmp_path / "dwi", workers=1)
    assert scan.volumes == []  # not a sheared two-slice volume, not one of the two kept silently
    assert all("the series is 4D: 2 volumes" in s.reason for s in scan.skipped)
    assert len(scan.skipped) == 2
    for index, source in enumerate([b0, b1000]):  # InstanceNumber order: b=0 is 1, b=1000 is 2
        (vol,) = scan_dicom_folder(tmp_path / "dwi", workers=1, volume_index=index).volumes
        assert vol.shape == (128, 128, 48)
        np.testing.assert_array_equal(vol.array, _tiles(source))


# --------------------------------------------------------------------------------------------------
# Against dcm2niix


def _dcm2niix(folder: Path, out: Path) -> nib.Nifti1Image:
    out.mkdir()
    proc = subprocess.run(
        ["dcm2niix", "-z", "n", "-x", "n", "-f", "%s_%j", "-o", str(out), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (nii,) = out.glob("*.nii")
    image = nib.load(nii)
    assert isinstance(image, nib.Nifti1Image)
    return image


def _assert_same_in_ras(ours: Volume, theirs: nib.Nifti1Image) -> None:
    theirs = nib.as_closest_canonical(theirs)
    mine = nib.as_closest_canonical(nib.Nifti1Image(ours.array, ours.affine))
    assert mine.shape == theirs.shape
    np.testing.assert_allclose(mine.affine, theirs.affine, atol=1e-3)
    np.testing.assert_array_equal(mine.get_fdata(), theirs.get_fdata())


@pytest.mark.dcm2niix
@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not installed")
def test_a_real_mosaic_matches_dcm2niix(tmp_path: Path) -> None:
    _real_mosaic("siemens_dwi_1000.dcm.gz", tmp_path / "dwi")
    (vol,) = scan_dicom_folder(tmp_path / "dwi", workers=1).volumes
    _assert_same_in_ras(vol, _dcm2niix(tmp_path / "dwi", tmp_path / "out"))


@pytest.mark.dcm2niix
@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not installed")
def test_each_volume_of_a_mosaic_series_matches_dcm2niix_4d_output(tmp_path: Path) -> None:
    _second_time_point(tmp_path / "dwi")
    _real_mosaic("siemens_dwi_1000.dcm.gz", tmp_path / "dwi")
    theirs = _dcm2niix(tmp_path / "dwi", tmp_path / "out")
    assert theirs.shape == (128, 128, 48, 2)
    for index in range(2):
        (vol,) = scan_dicom_folder(tmp_path / "dwi", workers=1, volume_index=index).volumes
        _assert_same_in_ras(vol, theirs.slicer[..., index])
