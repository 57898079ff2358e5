"""DICOM series assembly and NIfTI volumes: pydicom's test files and generated series with known truth."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from agent.data import dicom as dicom_module
from agent.data.dicom import read_dicom_series, scan_dicom_folder
from agent.data.volume import Volume, read_nifti_volume, write_nifti
from agent.errors import DicomError, VolumeError
from tests.fixtures.dicom import (
    FAKE_BIRTH_DATE,
    FAKE_INSTITUTION,
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    corrupt_copy,
    oblique_orientation,
    write_enhanced_mr,
    write_float_series,
    write_projection,
    write_series,
    write_text_sr,
)

# The files shipped inside the installed pydicom package (never downloaded).
PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _only(scan_root: Path) -> Volume:
    scan = scan_dicom_folder(scan_root, workers=1)
    assert len(scan.volumes) == 1, [v.shape for v in scan.volumes]
    return scan.volumes[0]


def _assert_truth(volume: Volume, array: np.ndarray, affine: np.ndarray) -> None:
    assert volume.array.dtype == np.float32
    assert volume.shape == array.shape
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# pydicom's shipped test files


def test_dicomdir_tree_gives_one_volume_per_series_and_counts_dicomdirs() -> None:
    root = PYDICOM_FILES / "dicomdirtests"
    scan = scan_dicom_folder(root, workers=1)

    expected: dict[str, set[Path]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        if "PixelData" in ds:
            expected.setdefault(ds.SeriesInstanceUID, set()).add(path)
    # Every image series appears, each volume holds files of exactly one series, and no file is lost.
    seen: dict[str, set[Path]] = {}
    for vol in scan.volumes:
        assert vol.source == "dicom"
        assert vol.series_uid in expected
        seen.setdefault(vol.series_uid, set()).update(vol.files)
    assert seen == expected
    assert len(scan.volumes) >= len(expected) >= 10

    assert scan.non_image == {"Media Storage Directory Storage": 8}
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert "not a DICOM file" in reasons["README.txt"]
    assert "without pixel data" in reasons["IM000000"]

    # The 5-slice CT series is one volume ordered along its normal, with z increasing in RAS.
    ct5 = next(v for v in scan.volumes if v.shape == (16, 16, 5))
    assert [p.name for p in ct5.files] == ["3353", "3023", "2693", "2392", "2062"]
    assert ct5.affine[2, 2] == pytest.approx(2.5, abs=1e-4)
    assert ct5.warnings == []

    # A series whose files change orientation is split, one volume per orientation, each saying so.
    split = [v for v in scan.volumes if any("series split" in w for w in v.warnings)]
    assert len(split) >= 3
    # A series with a large gap is kept and warned about.
    ct2 = next(v for v in scan.volumes if v.shape == (16, 16, 4))
    assert any("non-uniform slice spacing" in w for w in ct2.warnings)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
        "MR_small_padded.dcm",
    ],
)
def test_mr_small_variants_decode_to_the_same_volume(name: str) -> None:
    reference = _only(PYDICOM_FILES / "MR_small.dcm")
    variant = _only(PYDICOM_FILES / name)
    assert variant.shape == reference.shape == (64, 64, 1)
    np.testing.assert_array_equal(variant.array, reference.array)
    np.testing.assert_allclose(variant.affine, reference.affine, atol=1e-6)
    # The reference itself holds the stored pixels, transposed to (column, row).
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    np.testing.assert_array_equal(reference.array[:, :, 0], ds.pixel_array.T.astype(np.float32))


def test_rt_dose_frames_are_placed_by_grid_frame_offsets() -> None:
    ds = pydicom.dcmread(PYDICOM_FILES / "rtdose.dcm")
    vol = _only(PYDICOM_FILES / "rtdose.dcm")
    n = int(ds.NumberOfFrames)
    assert vol.shape == (int(ds.Columns), int(ds.Rows), n)
    offsets = [float(x) for x in ds.GridFrameOffsetVector]
    ipp = np.array([float(x) for x in ds.ImagePositionPatient])
    step = offsets[1] - offsets[0]
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    # Frames ascend along the normal: voxel (0,0,0) is the first frame when offsets increase.
    first = ipp if step > 0 else ipp + (offsets[-1] - offsets[0]) * np.array([0, 0, 1.0])
    np.testing.assert_allclose(vol.affine[:3, 3], first * lps_to_ras, atol=1e-4)
    assert vol.spacing[2] == pytest.approx(abs(step), abs=1e-4)
    expected = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    frames = expected if step > 0 else expected[::-1]
    np.testing.assert_allclose(vol.array, frames.transpose(2, 1, 0), rtol=1e-6)


def test_corrupt_and_non_image_pydicom_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    for name in ("MR_truncated.dcm", "rtplan.dcm", "rtstruct.dcm", "test-SR.dcm", "rtplan_truncated.dcm"):
        shutil.copy(PYDICOM_FILES / name, tmp_path / name)
    scan = scan_dicom_folder(tmp_path, workers=1)
    assert scan.volumes == []
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert set(reasons) == {"MR_truncated.dcm", "rtplan_truncated.dcm"}
    assert "truncated" in reasons["MR_truncated.dcm"]
    assert "truncated" in reasons["rtplan_truncated.dcm"]
    assert "MR_truncated.dcm" in str(next(s for s in scan.skipped if s.path.name == "MR_truncated.dcm"))
    assert scan.non_image == {
        "Comprehensive SR Storage": 1,
        "RT Plan Storage": 1,
        "RT Structure Set Storage": 1,
    }


# --------------------------------------------------------------------------------------------------
# Generated series


def test_shuffled_names_of_every_style_assemble_in_spatial_order(tmp_path: Path) -> None:
    for style in ("plain", "dcm", "IMA"):
        truth = write_series(tmp_path / style, name_style=style, seed=7)
        vol = _only(tmp_path / style)
        _assert_truth(vol, truth.array, truth.affine)
        assert vol.warnings == []
        assert vol.orientation == "LPS"
        assert vol.spacing == pytest.approx((0.8, 0.9, 2.5))
        assert vol.modality == "MR"
        assert vol.patient_id == FAKE_PATIENT_ID
        assert vol.series_uid == truth.series_uid
        assert len(vol.files) == 16


def test_missing_instance_numbers_do_not_matter_when_positions_exist(tmp_path: Path) -> None:
    truth = write_series(tmp_path / "s", instance_numbers=False, seed=2)
    vol = _only(tmp_path / "s")
    _assert_truth(vol, truth.array, truth.affine)
    assert vol.warnings == []


def test_files_without_positions_are_2d_images_not_a_stack(tmp_path: Path) -> None:
    # Without slice positions there is no third axis to stack along: each file is its own 2D image
    # (as dcm2niix writes them), not a volume with an assumed spacing ordered by InstanceNumber.
    truth = write_series(tmp_path / "s", positions=False, seed=3)
    scan = scan_dicom_folder(tmp_path / "s", workers=1)
    assert len(scan.volumes) == 16 and scan.skipped == []
    by_file = {vol.files[0]: vol for vol in scan.volumes}
    for k, path in enumerate(sorted(truth.files, key=lambda p: int(pydicom.dcmread(p).InstanceNumber))):
        vol = by_file[path]
        assert vol.files == [path] and vol.shape == (32, 32, 1)
        np.testing.assert_array_equal(vol.array[:, :, 0], truth.array[:, :, k])
        assert vol.spacing[:2] == pytest.approx((0.8, 0.9))
        assert not any("slice" in w for w in vol.warnings)
        assert any("orientation" in w.lower() for w in vol.warnings)


def test_a_missing_slice_keeps_the_volume_and_warns(tmp_path: Path) -> None:
    truth = write_series(tmp_path / "s", n_slices=20, omit=(9,), seed=4)
    vol = _only(tmp_path / "s")
    keep = [k for k in range(20) if k != 9]
    assert vol.shape == (32, 32, 19)
    np.testing.assert_array_equal(vol.array, truth.array[:, :, keep])
    gap = [w for w in vol.warnings if "non-uniform slice spacing" in w]
    assert gap and "1 missing slice" in gap[0] and "median" in gap[0]
    # The affine uses the median spacing, i.e. the series' true spacing.
    np.testing.assert_allclose(vol.affine, truth.affine, atol=1e-4)


def test_an_exact_duplicate_slice_is_dropped_with_a_warning(tmp_path: Path) -> None:
    truth = write_series(tmp_path / "s", seed=5)
    shutil.copy(truth.files[3], tmp_path / "s" / "copy-of-a-slice")
    vol = _only(tmp_path / "s")
    _assert_truth(vol, truth.array, truth.affine)
    assert vol.shape[2] == 16
    assert any("dropped 1 duplicate slice" in w for w in vol.warnings)


def test_a_different_image_at_one_occupied_position_refuses_the_series(tmp_path: Path) -> None:
    """One position with two different images is neither a 3D volume nor a complete 4D series."""
    truth = write_series(tmp_path / "s", seed=6)
    ds = pydicom.dcmread(truth.files[0])
    arr = ds.pixel_array.copy()
    arr[0, 0] += 1
    ds.PixelData = arr.astype("<i2").tobytes()
    ds.InstanceNumber = 999
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "s" / "zz-second-echo")
    scan = scan_dicom_folder(tmp_path / "s", workers=1)
    assert scan.volumes == []
    assert len(scan.skipped) == 17
    assert all("repeat unevenly (1 to 2 different images" in s.reason for s in scan.skipped)


@pytest.mark.parametrize("orientation", ["sagittal", "coronal", "oblique"])
def test_orientations_give_the_written_geometry(tmp_path: Path, orientation: str) -> None:
    iop = oblique_orientation() if orientation == "oblique" else orientation
    truth = write_series(tmp_path / "s", orientation=iop, n_slices=18, seed=8, slope=2.5, intercept=-1024)
    vol = _only(tmp_path / "s")
    _assert_truth(vol, truth.array, truth.affine)
    assert vol.warnings == []


def test_corrupt_and_non_dicom_files_are_skipped_and_the_scan_goes_on(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    truth = write_series(folder, n_slices=18, seed=9)
    truncated = truth.files[5]
    corrupt_copy(truncated, truncated)  # truncate a slice in place
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "garbage.bin").write_bytes(b"\x08\x00\x05\x00" + bytes(range(256)) * 3)
    write_text_sr(folder / "report")
    scan = scan_dicom_folder(tmp_path, workers=1)
    assert len(scan.volumes) == 1
    vol = scan.volumes[0]
    assert vol.shape == (32, 32, 17)
    assert any("non-uniform slice spacing" in w for w in vol.warnings)
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert set(reasons) == {truncated.name, "notes.txt", "garbage.bin"}
    assert "truncated" in reasons[truncated.name]
    assert "not a DICOM file" in reasons["notes.txt"]
    assert "not a DICOM file" in reasons["garbage.bin"]
    assert scan.non_image == {"Basic Text SR Storage": 1}
    assert str(truncated) in str(next(s for s in scan.skipped if s.path == truncated))


def test_mixed_shapes_in_one_series_are_split(tmp_path: Path) -> None:
    first = write_series(tmp_path / "a", n_slices=16, seed=10)
    second = write_series(tmp_path / "b", n_slices=16, rows=24, seed=11, series_uid=first.series_uid)
    scan = scan_dicom_folder(tmp_path, workers=1)
    assert sorted(v.shape for v in scan.volumes) == [(32, 24, 16), (32, 32, 16)]
    for vol in scan.volumes:
        assert any("series split into 2 volumes" in w for w in vol.warnings)
        truth = first if vol.shape == (32, 32, 16) else second
        _assert_truth(vol, truth.array, truth.affine)


def test_several_series_in_one_folder_and_read_dicom_series_errors(tmp_path: Path) -> None:
    write_series(tmp_path / "mixed", seed=12)
    write_series(
        tmp_path / "mixed", seed=13, orientation="sagittal", origin=(0.0, 0.0, 0.0), name_style="dcm"
    )
    scan = scan_dicom_folder(tmp_path / "mixed", workers=1)
    assert len(scan.volumes) == 2
    with pytest.raises(DicomError, match="2 image series found"):
        read_dicom_series(tmp_path / "mixed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="no DICOM image series"):
        read_dicom_series(tmp_path / "empty")
    with pytest.raises(DicomError, match="no such file"):
        scan_dicom_folder(tmp_path / "absent")
    single = write_series(tmp_path / "one", seed=14, n_slices=16)
    _assert_truth(read_dicom_series(tmp_path / "one"), single.array, single.affine)


def test_transfer_syntaxes_written_by_pydicom_read_alike(tmp_path: Path) -> None:
    truth = write_series(tmp_path / "implicit", seed=15, transfer_syntax=ImplicitVRLittleEndian)
    _assert_truth(_only(tmp_path / "implicit"), truth.array, truth.affine)
    # Big endian goes through pydicom's general path rather than the fast one.
    big = tmp_path / "big"
    big.mkdir()
    for path in truth.files:
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.pixel_array.astype(">i2").tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds["PixelData"].VR = "OW"
        pydicom.dcmwrite(big / path.name, ds, little_endian=False, implicit_vr=False, force_encoding=True)
    _assert_truth(_only(big), truth.array, truth.affine)


def test_enhanced_multiframe_uses_per_frame_positions(tmp_path: Path) -> None:
    truth = write_enhanced_mr(tmp_path / "mf" / "enhanced.dcm", orientation=oblique_orientation(9, -14))
    vol = _only(tmp_path / "mf")
    _assert_truth(vol, truth.array, truth.affine)
    assert vol.files == truth.files
    assert vol.warnings == []


def test_parallel_reading_gives_the_same_result(tmp_path: Path) -> None:
    truth = write_series(tmp_path / "s", n_slices=56, rows=16, cols=16, seed=16)
    (tmp_path / "s" / "junk").write_text("x")
    serial = scan_dicom_folder(tmp_path, workers=1)
    for processes in (False, True):
        parallel = scan_dicom_folder(tmp_path, workers=2, processes=processes)
        assert len(parallel.volumes) == 1
        _assert_truth(parallel.volumes[0], truth.array, truth.affine)
        np.testing.assert_array_equal(parallel.volumes[0].array, serial.volumes[0].array)
        assert parallel.volumes[0].files == serial.volumes[0].files
        assert parallel.skipped == serial.skipped
        assert parallel.files_seen == serial.files_seen == 57


def test_warnings_never_carry_identity_or_paths(tmp_path: Path) -> None:
    write_series(tmp_path / "s", n_slices=16, omit=(4,), seed=17)
    truth = write_series(tmp_path / "s2", seed=18)
    shutil.copy(truth.files[0], tmp_path / "s2" / "dup")
    scan = scan_dicom_folder(tmp_path, workers=1)
    text = " ".join(w for v in scan.volumes for w in v.warnings)
    assert text
    for secret in (FAKE_PATIENT_ID, FAKE_PATIENT_NAME, FAKE_BIRTH_DATE, FAKE_INSTITUTION, str(tmp_path)):
        assert secret not in text


# --------------------------------------------------------------------------------------------------
# NIfTI


def test_nifti_scaling_and_round_trip(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.array([[-0.9, 0, 0, 10], [0, 1.1, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, affine)
    img.header.set_slope_inter(0.5, -3.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    vol = read_nifti_volume(tmp_path / "scaled.nii.gz", modality="flair")
    assert vol.source == "nifti" and vol.modality == "flair"
    np.testing.assert_allclose(vol.array, data * 0.5 - 3.0)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6)
    assert vol.spacing == pytest.approx((0.9, 1.1, 3.0), abs=1e-6)
    assert vol.orientation == "LAS"

    out = write_nifti(vol, tmp_path / "out" / "copy.nii.gz")
    again = read_nifti_volume(out)
    np.testing.assert_array_equal(again.array, vol.array)
    assert nib.load(out).get_data_dtype() == np.float32  # half-integral values stay float
    np.testing.assert_allclose(again.affine, vol.affine, atol=1e-5)
    assert not list((tmp_path / "out").glob(".*"))  # no partial file left behind


def test_nifti_shapes_and_errors(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5, 1), np.float32), np.eye(4)), tmp_path / "one.nii")
    assert read_nifti_volume(tmp_path / "one.nii").shape == (3, 4, 5)
    nib.save(nib.Nifti1Image(np.zeros((3, 4), np.float32), np.eye(4)), tmp_path / "flat.nii")
    assert read_nifti_volume(tmp_path / "flat.nii").shape == (3, 4, 1)
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5, 2), np.float32), np.eye(4)), tmp_path / "four.nii.gz")
    with pytest.raises(VolumeError, match=r"four\.nii\.gz is 4D: 2 volumes"):
        read_nifti_volume(tmp_path / "four.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"not gzip at all")
    with pytest.raises(VolumeError, match=r"bad\.nii\.gz"):
        read_nifti_volume(tmp_path / "bad.nii.gz")
    with pytest.raises(VolumeError, match="no such file"):
        read_nifti_volume(tmp_path / "absent.nii")
    vol = read_nifti_volume(tmp_path / "one.nii")
    with pytest.raises(VolumeError, match="must end in"):
        write_nifti(vol, tmp_path / "x.img")


def test_a_slice_without_preamble_or_meta_header_is_still_read(tmp_path: Path) -> None:
    truth = write_series(tmp_path / "s", seed=19)
    victim = truth.files[7]
    data = victim.read_bytes()
    # Drop the preamble, "DICM" and the whole file meta group (its length is in (0002,0000)).
    meta_length = int.from_bytes(data[140:144], "little")
    victim.write_bytes(data[144 + meta_length :])
    assert victim.read_bytes()[:2] == b"\x08\x00"
    vol = _only(tmp_path / "s")
    _assert_truth(vol, truth.array, truth.affine)


def test_gantry_tilt_gives_a_sheared_affine_that_follows_the_positions(tmp_path: Path) -> None:
    truth = write_series(tmp_path / "s", n_slices=16, seed=20)
    for path in truth.files:
        ds = pydicom.dcmread(path)
        k = int(ds.InstanceNumber) - 1
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.6f}", f"{y + 0.4 * k:.6f}", f"{z:.6f}"]
        ds.save_as(path)
    vol = _only(tmp_path / "s")
    np.testing.assert_array_equal(vol.array, truth.array)
    expected = truth.affine.copy()
    expected[1, 2] = -0.4  # LPS y shift per slice, in RAS
    np.testing.assert_allclose(vol.affine, expected, atol=1e-4)
    assert any("gantry tilt" in w for w in vol.warnings)


@pytest.mark.parametrize("syntax", [pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless])
def test_a_compressed_series_assembles_like_the_uncompressed_one(tmp_path: Path, syntax: str) -> None:
    truth = write_series(tmp_path / "s", n_slices=16, seed=24, slope=1.5, intercept=-20.0)
    for path in truth.files:
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path)
    assert pydicom.dcmread(truth.files[0]).file_meta.TransferSyntaxUID == syntax
    _assert_truth(_only(tmp_path / "s"), truth.array, truth.affine)


def test_links_and_special_files_are_reported_not_opened(tmp_path: Path) -> None:
    import os

    truth = write_series(tmp_path / "s", n_slices=16, seed=25)
    (tmp_path / "s" / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "s" / "good-link").symlink_to(truth.files[0])
    os.mkfifo(tmp_path / "s" / "pipe")  # reading it would block forever
    scan = scan_dicom_folder(tmp_path, workers=1)
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert reasons == {"dangling": "broken symbolic link", "pipe": "not a regular file"}
    vol = scan.volumes[0]
    _assert_truth(vol, truth.array, truth.affine)
    assert any("dropped 1 duplicate slice" in w for w in vol.warnings)  # the link is the same slice
    assert scan.files_seen == 19


# --------------------------------------------------------------------------------------------------
# Zero or missing pixel spacing: unknown, a warning, never a crash

REAL_CR = PYDICOM_FILES / "dicomdirtests" / "77654033" / "CR1" / "6154"


def test_a_real_radiograph_with_zero_pixel_spacing_is_read_with_a_warning(tmp_path: Path) -> None:
    ds = pydicom.dcmread(REAL_CR)
    ds.PixelSpacing = ["0", "0"]  # what some projection modalities write instead of leaving it out
    ds.save_as(tmp_path / "cr")
    vol = _only(tmp_path / "cr")
    assert vol.shape == (int(ds.Columns), int(ds.Rows), 1)
    assert vol.spacing[:2] == pytest.approx((1.0, 1.0))
    assert abs(np.linalg.det(vol.affine[:3, :3])) > 0
    assert vol.orientation.isalpha()
    assert any("PixelSpacing is zero" in w for w in vol.warnings)


def test_zero_spacing_in_a_multiframe_file_is_unknown(tmp_path: Path) -> None:
    truth = write_enhanced_mr(tmp_path / "e" / "enhanced.dcm")
    ds = pydicom.dcmread(truth.files[0])
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = ["0", "0.7"]
    ds.save_as(truth.files[0])
    vol = _only(tmp_path / "e")
    np.testing.assert_array_equal(vol.array, truth.array)
    assert vol.spacing == pytest.approx((1.0, 1.0, 3.0))
    assert any("PixelSpacing is zero" in w for w in vol.warnings)


def test_a_series_with_degenerate_geometry_is_skipped_and_the_folder_goes_on(tmp_path: Path) -> None:
    good = write_series(tmp_path / "good", n_slices=16, seed=31)
    tiny = write_series(tmp_path / "tiny", n_slices=4, seed=32)
    for path in tiny.files:
        ds = pydicom.dcmread(path)
        ds.PixelSpacing = ["1e-7", "1e-7"]
        ds.save_as(path)
    scan = scan_dicom_folder(tmp_path, workers=1)
    (vol,) = scan.volumes
    _assert_truth(vol, good.array, good.affine)
    reasons = {s.path for s in scan.skipped if "no valid voxel-to-world transform" in s.reason}
    assert reasons == set(tiny.files)


def test_projection_fixture_with_zero_spacing_reads_the_pixels(tmp_path: Path) -> None:
    ((path, expected),) = write_projection(tmp_path / "cr", n_images=1, pixel_spacing=(0.0, 0.0))
    vol = _only(path)
    np.testing.assert_array_equal(vol.array[:, :, 0], expected)
    assert vol.modality == "CR"
    assert any("PixelSpacing is zero" in w for w in vol.warnings)


# --------------------------------------------------------------------------------------------------
# Projection images: one 2D image per file, never a stack


@pytest.mark.parametrize("modality", ["CR", "DX", "MG"])
def test_projection_views_of_one_series_are_separate_2d_images(tmp_path: Path, modality: str) -> None:
    views = write_projection(tmp_path / "xr", n_images=3, modality=modality, pixel_spacing=(0.15, 0.1))
    scan = scan_dicom_folder(tmp_path / "xr", workers=1)
    assert len(scan.volumes) == 3
    by_file = {vol.files[0]: vol for vol in scan.volumes}
    for path, expected in views:
        vol = by_file[path]
        assert vol.files == [path] and vol.shape == (24, 20, 1) and vol.modality == modality
        np.testing.assert_array_equal(vol.array[:, :, 0], expected)
        assert vol.spacing[:2] == pytest.approx((0.1, 0.15))
        assert not any("slice" in w for w in vol.warnings)


def test_projection_files_with_positions_are_not_stacked_either(tmp_path: Path) -> None:
    # A DX detector may write a position and orientation; its views are still not slices.
    truth = write_series(tmp_path / "dx", n_slices=4, seed=33, modality="DX")
    scan = scan_dicom_folder(tmp_path / "dx", workers=1)
    assert sorted(v.shape for v in scan.volumes) == [(32, 32, 1)] * 4
    assert {v.files[0] for v in scan.volumes} == set(truth.files)


def test_real_radiographs_of_one_study_are_one_image_each(tmp_path: Path) -> None:
    # pydicom's CR views of one patient, put into one series as a PACS export may do.
    uid = pydicom.uid.generate_uid()
    for name in ("CR1/6154", "CR2/6247", "CR3/6278"):
        ds = pydicom.dcmread(PYDICOM_FILES / "dicomdirtests" / "77654033" / name)
        ds.SeriesInstanceUID = uid
        ds.save_as(tmp_path / name.replace("/", "_"))
    scan = scan_dicom_folder(tmp_path, workers=1)
    assert [v.shape for v in scan.volumes] == [(16, 16, 1)] * 3
    assert all(len(v.files) == 1 and v.modality == "CR" for v in scan.volumes)


def test_a_multiframe_file_without_positions_stays_one_volume(tmp_path: Path) -> None:
    # A cine or a multi-frame file without positions: one file, one volume, frames in stored order.
    truth = write_enhanced_mr(tmp_path / "m" / "cine.dcm", shuffle_frames=False)
    ds = pydicom.dcmread(truth.files[0])
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.PlanePositionSequence
    ds.save_as(truth.files[0])
    vol = _only(tmp_path / "m")
    np.testing.assert_array_equal(vol.array, truth.array)
    assert any("frames in the order they are stored" in w for w in vol.warnings)


# --------------------------------------------------------------------------------------------------
# Non-finite voxels: reported by the readers (the catalog scan refuses them)


def test_float_pixel_data_with_nan_and_inf_is_read_and_reported(tmp_path: Path) -> None:
    values = np.random.default_rng(34).random((6, 5, 3)).astype(np.float32)
    values[1, 2, 1] = np.nan
    values[0, 0, 2] = np.inf
    write_float_series(tmp_path / "map", values)
    vol = _only(tmp_path / "map")
    np.testing.assert_array_equal(vol.array, values)
    assert any("2 voxel(s) are not finite" in w for w in vol.warnings)


def test_a_rescale_that_overflows_float32_is_reported(tmp_path: Path) -> None:
    truth = write_series(tmp_path / "s", n_slices=16, seed=35)
    for path in truth.files:
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = "1e38"
        ds.RescaleIntercept = "0"
        ds.save_as(path)
    vol = _only(tmp_path / "s")
    assert not np.all(np.isfinite(vol.array))
    assert any("not finite" in w for w in vol.warnings)


def test_nifti_with_nan_is_read_with_a_warning(tmp_path: Path) -> None:
    data = np.ones((4, 5, 6), np.float32)
    data[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    vol = read_nifti_volume(tmp_path / "nan.nii.gz")
    assert any("1 voxel(s) are not finite" in w for w in vol.warnings)
    clean = read_nifti_volume(_write_clean(tmp_path))
    assert clean.warnings == []


def _write_clean(tmp_path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4)), tmp_path / "ok.nii.gz")
    return tmp_path / "ok.nii.gz"


@pytest.mark.parametrize("size", [0, 5, 131, 132, 133, 4096, 1_000_003])
def test_a_file_is_read_whole_into_one_buffer_whatever_its_size(tmp_path: Path, size: int) -> None:
    content = np.random.default_rng(size).integers(0, 256, size=size, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    path.write_bytes(content)
    with open(path, "rb") as fh:
        head = fh.read(132)
        assert bytes(dicom_module._read_rest(fh, head)) == content


def test_a_file_that_grew_after_its_head_was_read_is_read_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 500)
    with open(path, "rb") as fh:
        head = fh.read(132)
        with open(path, "ab") as more:
            more.write(b"b" * 100)
        assert bytes(dicom_module._read_rest(fh, head)) == b"a" * 500 + b"b" * 100
