"""Analyze 7.5 and NIfTI pairs (.hdr + .img) are read by their header, in `data inspect` and in a
dataset, instead of being refused as "not a DICOM file"; what is not read says what is supported."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from agent.config import WarningCategory
from agent.data.catalog import dataset_items, item_details, scan_datasets
from agent.data.inspect import read_folder
from agent.data.volume import read_nifti_volume, warning_category
from agent.db.engine import Database
from agent.errors import VolumeError
from tests.fixtures.catalog import affine, make_config, nifti_dataset_config, subject_arrays


def _pair(path: Path, seed: int = 0, *, analyze: bool = False) -> np.ndarray:
    image, _ = subject_arrays(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    cls = nib.AnalyzeImage if analyze else nib.Nifti1Pair
    nib.save(cls(image, affine()), str(path))
    return image


def test_a_nifti_pair_is_read_by_its_header(tmp_path: Path) -> None:
    image = _pair(tmp_path / "t1.hdr")
    assert (tmp_path / "t1.img").is_file()
    volume = read_nifti_volume(tmp_path / "t1.hdr")
    np.testing.assert_array_equal(volume.array, image)
    np.testing.assert_allclose(volume.affine, affine())
    assert volume.warnings == []


def test_an_analyze_image_is_read_with_its_orientation_marked_assumed(tmp_path: Path) -> None:
    image = _pair(tmp_path / "old.hdr", analyze=True)
    volume = read_nifti_volume(tmp_path / "old.hdr")
    np.testing.assert_array_equal(volume.array, image)
    [warning] = volume.warnings
    assert "orientation is assumed" in warning
    assert warning_category(warning) is WarningCategory.GEOMETRY


def test_what_is_not_read_says_what_is_supported(tmp_path: Path) -> None:
    _pair(tmp_path / "t1.hdr")
    with pytest.raises(VolumeError, match=r"name its \.hdr file instead"):
        read_nifti_volume(tmp_path / "t1.img")
    (tmp_path / "brain.mgz").write_bytes(b"\0" * 64)
    with pytest.raises(VolumeError, match=r"supported: \.nii, \.nii\.gz, or an Analyze/NIfTI pair"):
        read_nifti_volume(tmp_path / "brain.mgz")
    (tmp_path / "lonely.hdr").write_bytes((tmp_path / "t1.hdr").read_bytes())
    with pytest.raises(VolumeError, match=r"without its voxel file lonely\.img"):
        read_nifti_volume(tmp_path / "lonely.hdr")


def test_inspect_reads_pairs_and_names_what_it_cannot(tmp_path: Path) -> None:
    _pair(tmp_path / "a" / "t1.hdr")
    _pair(tmp_path / "b" / "OLD.HDR", analyze=True)  # an upper-case pair (OLD.IMG), as old tools write
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "orphan.img").write_bytes(b"\0" * 128)
    (tmp_path / "c" / "brain.mgz").write_bytes(b"\0" * 64)
    view = read_folder(tmp_path, workers=1)
    assert sorted(v.files[0].name for v in view.volumes) == ["OLD.HDR", "t1.hdr"]
    reasons = {s.path.name: s.reason for s in view.skipped}
    assert set(reasons) == {"orphan.img", "brain.mgz"}
    assert "without its header orphan.hdr" in reasons["orphan.img"]
    assert "not supported (supported: DICOM, .nii, .nii.gz" in reasons["brain.mgz"]
    assert not any("not a DICOM file" in r for r in reasons.values())


def test_a_dataset_of_pairs_is_scanned_and_a_change_in_the_voxel_file_is_seen(
    tmp_path: Path, db: Database
) -> None:
    root = tmp_path / "data"
    for n, subject in enumerate(["s1", "s2"]):
        _pair(root / subject / "flair.hdr", seed=n)
    cfg = make_config(tmp_path, [nifti_dataset_config(root, images="{subject}/{modality}.hdr", label=None)])
    report = scan_datasets(cfg, db)
    assert report.skipped == [] and report.warned == []
    assert len(dataset_items(db, "brain")) == 2
    before = {d["images"]["flair"]: d["checksum"] for d in item_details(db, "brain")}

    img = root / "s1" / "flair.img"
    data = bytearray(img.read_bytes())
    data[-4:] = b"\x01\x02\x03\x04"
    img.write_bytes(bytes(data))
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    again = scan_datasets(cfg, db)
    assert again.datasets[0].volumes_read == 1
    after = {d["images"]["flair"]: d["checksum"] for d in item_details(db, "brain")}
    changed = [p for p in before if before[p] != after[p]]
    assert changed == [str(root / "s1" / "flair.hdr")]
