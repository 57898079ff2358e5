"""One 4D rule for NIfTI files and DICOM series: refused by default, one volume on request.

A 4D acquisition (fMRI, diffusion, echoes, repeats) is never silently reduced to one of its volumes:
without a volume index the reader refuses it with the volume count; with one, it reads that volume and
says so in a warning. Both formats go through `agent.data.volume.choose_volume`, so the words match.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydantic import ValidationError
from pydicom.uid import generate_uid

from agent.config import DatasetConfig
from agent.data.catalog import dataset_items, scan_datasets
from agent.data.dicom import read_dicom_series, scan_dicom_folder
from agent.data.loading import DataSettings, load_preprocessed
from agent.data.volume import read_nifti_volume
from agent.db.engine import open_database
from agent.errors import DicomError, VolumeError
from tests.fixtures.catalog import make_config, nifti_dataset_config, subject_arrays, write_nifti
from tests.fixtures.dicom import SeriesTruth, write_series

REFUSAL = "is 4D: 3 volumes (a time series, diffusion directions, echoes or repeats)"


def _dicom_4d(folder: Path, volumes: int = 3, n_slices: int = 8) -> list[SeriesTruth]:
    """One series of ``volumes`` volumes at the same positions, InstanceNumber running on."""
    uid = generate_uid()
    return [
        write_series(
            folder,
            n_slices=n_slices,
            seed=40 + t,
            series_uid=uid,
            first_instance=1 + t * n_slices,
            name_prefix=f"t{t}-",
        )
        for t in range(volumes)
    ]


def _nifti_4d(path: Path, volumes: int = 3) -> np.ndarray:
    data = np.random.default_rng(7).normal(size=(6, 5, 4, volumes)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), path)
    return data


def test_a_dicom_series_with_repeated_positions_is_refused_like_a_4d_nifti(tmp_path: Path) -> None:
    _dicom_4d(tmp_path / "dicom")
    scan = scan_dicom_folder(tmp_path / "dicom", workers=1)
    assert scan.volumes == []
    assert len(scan.skipped) == 24
    assert all(REFUSAL in s.reason for s in scan.skipped)
    with pytest.raises(DicomError, match="the series is 4D: 3 volumes"):
        read_dicom_series(tmp_path / "dicom", workers=1)

    _nifti_4d(tmp_path / "run.nii.gz")
    with pytest.raises(VolumeError, match=r"run\.nii\.gz is 4D: 3 volumes \(a time series"):
        read_nifti_volume(tmp_path / "run.nii.gz")


@pytest.mark.parametrize("index", [0, 2])
def test_a_volume_index_takes_that_volume_of_either_format(tmp_path: Path, index: int) -> None:
    truths = _dicom_4d(tmp_path / "dicom")
    vol = read_dicom_series(tmp_path / "dicom", workers=1, volume_index=index)
    np.testing.assert_array_equal(vol.array, truths[index].array)
    np.testing.assert_allclose(vol.affine, truths[index].affine, atol=1e-4)
    assert f"4D acquisition of 3 volumes: volume {index} taken (volume_index)" in vol.warnings

    data = _nifti_4d(tmp_path / "run.nii.gz")
    nvol = read_nifti_volume(tmp_path / "run.nii.gz", volume_index=index)
    np.testing.assert_array_equal(nvol.array, data[..., index])
    assert f"4D acquisition of 3 volumes: volume {index} taken (volume_index)" in nvol.warnings


def test_a_volume_index_out_of_range_is_refused_in_both_formats(tmp_path: Path) -> None:
    _dicom_4d(tmp_path / "dicom")
    scan = scan_dicom_folder(tmp_path / "dicom", workers=1, volume_index=3)
    assert scan.volumes == []
    assert "volume_index 3 is out of range (0 to 2)" in scan.skipped[0].reason
    _nifti_4d(tmp_path / "run.nii")
    with pytest.raises(VolumeError, match=r"volume_index 3 is out of range \(0 to 2\)"):
        read_nifti_volume(tmp_path / "run.nii", volume_index=3)


def test_a_3d_image_ignores_the_volume_index(tmp_path: Path) -> None:
    truth = write_series(tmp_path / "dicom", n_slices=6, seed=3)
    vol = read_dicom_series(tmp_path / "dicom", workers=1, volume_index=2)
    np.testing.assert_array_equal(vol.array, truth.array)
    assert not any("4D" in w for w in vol.warnings)


def test_the_dataset_option_takes_a_volume_index_from_zero() -> None:
    base = {"name": "brain", "format": "nifti", "root": "/data/brain"}
    assert DatasetConfig.model_validate(base).volume_index is None  # default: 4D refused
    assert DatasetConfig.model_validate({**base, "volume_index": 2}).volume_index == 2
    with pytest.raises(ValidationError, match="volume_index"):
        DatasetConfig.model_validate({**base, "volume_index": -1})


def test_a_dataset_volume_index_reaches_the_scan_and_training(tmp_path: Path) -> None:
    """The dataset's `volume_index` is the one the catalog scans and training loads; without it a 4D
    subject is refused at scan, and changing it is a new volume for the catalog and the cache."""
    root = tmp_path / "data"
    image, label = subject_arrays(7)
    # Volumes that differ after normalisation: the same anatomy, shifted by a few voxels each.
    volumes = np.stack([np.roll(image, 3 * v, axis=0) for v in range(3)], axis=-1)
    write_nifti(root / "PAT-4D" / "flair.nii.gz", volumes)
    write_nifti(root / "PAT-4D" / "seg.nii.gz", label)
    for n in range(3):
        a, b = subject_arrays(n)
        write_nifti(root / f"PAT-{n}" / "flair.nii.gz", a)
        write_nifti(root / f"PAT-{n}" / "seg.nii.gz", b)

    refused = make_config(tmp_path / "a", [nifti_dataset_config(root)])
    refused_db = open_database(refused.db_url)
    report = scan_datasets(refused, refused_db)
    assert any(s.subject == "PAT-4D" and "4D" in s.reason for s in report.skipped)
    assert len(dataset_items(refused_db, "brain")) == 3

    checksums = {}
    four_d_images = {}
    for index in (1, 2):
        cfg = make_config(tmp_path / "b", [nifti_dataset_config(root, volume_index=index)])
        db = open_database(cfg.db_url)
        scan_datasets(cfg, db)
        items = {i.subject_key: i for i in dataset_items(db, "brain")}
        assert len(items) == 4
        four_d = [i for i in items.values() if i.volume_index == index]
        assert len(four_d) == 4  # every item carries the dataset's index to the loader
        cache = tmp_path / "cache"  # one cache for both runs: the key must tell the volumes apart
        loaded = {k: load_preprocessed(i, DataSettings(), cache) for k, i in items.items()}
        assert all(img.ndim == 4 for img, _ in loaded.values())
        four_d_images[index] = next(
            img
            for k, (img, _) in loaded.items()
            if k not in {i.subject_key for i in dataset_items(refused_db, "brain")}
        )
        checksums[index] = {i.checksum for i in items.values()}
    # The index is part of what identifies each volume: a changed index is re-read, never served stale.
    assert checksums[1].isdisjoint(checksums[2])
    assert not np.array_equal(four_d_images[1], four_d_images[2])
