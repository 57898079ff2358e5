"""Small generated NIfTI datasets and configs for the catalog and loading tests.

Each subject gets a blob-shaped "lesion" with BraTS-like label values (1, 2, 4) inside a
non-zero "head", so that label maps, z-score normalisation over the non-zero mask and the
2D slice sampler all have something real to work on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from agent.config import AgentConfig, parse_config

SHAPE = (24, 24, 12)
SPACING = (1.0, 1.0, 2.0)
SECRET = "test-site-secret"


def subject_arrays(seed: int, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """An image with a non-zero ellipsoidal 'head' and a label with values 0, 1, 2, 4."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    c = np.array(shape) / 2
    head = ((x - c[0]) / (0.45 * shape[0])) ** 2 + ((y - c[1]) / (0.45 * shape[1])) ** 2 + (
        (z - c[2]) / (0.45 * shape[2])
    ) ** 2 < 1
    image = np.where(head, 100.0 + 20.0 * rng.standard_normal(shape), 0.0).astype(np.float32)
    centre = c + rng.uniform(-2, 2, size=3)
    r = np.sqrt(((x - centre[0]) / 4.0) ** 2 + ((y - centre[1]) / 4.0) ** 2 + ((z - centre[2]) / 2.0) ** 2)
    label = np.zeros(shape, dtype=np.uint8)
    label[r < 1.0] = 2
    label[r < 0.7] = 4
    label[r < 0.35] = 1
    image[label > 0] += 80.0
    return image, label


def affine(spacing: tuple[float, float, float] = SPACING) -> np.ndarray:
    # LPS-like storage (as DICOM-converted files often are), so reorientation to RAS matters.
    return np.array(
        [
            [-spacing[0], 0, 0, 20.0],
            [0, -spacing[1], 0, 30.0],
            [0, 0, spacing[2], -10.0],
            [0, 0, 0, 1],
        ]
    )


def write_nifti(path: Path, array: np.ndarray, aff: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine() if aff is None else aff), str(path))
    return path


def make_nifti_dataset(
    root: Path,
    subjects: list[str],
    *,
    modalities: tuple[str, ...] = ("flair",),
    label: bool = True,
    shape: tuple[int, int, int] = SHAPE,
) -> dict[str, int]:
    """Write `{subject}/{modality}.nii.gz` (+ `{subject}/seg.nii.gz`); returns subject -> seed."""
    seeds = {}
    for n, subject in enumerate(subjects):
        seed = 1000 + n
        image, lab = subject_arrays(seed, shape)
        for m_i, modality in enumerate(modalities):
            write_nifti(root / subject / f"{modality}.nii.gz", image * (1.0 + 0.5 * m_i))
        if label:
            write_nifti(root / subject / "seg.nii.gz", lab)
        seeds[subject] = seed
    return seeds


def make_config(
    tmp: Path,
    datasets: list[dict[str, Any]],
    *,
    secret: str | None = SECRET,
) -> AgentConfig:
    raw: dict[str, Any] = {
        "site": {"id": "site-test"} | ({"secret": secret} if secret else {}),
        "work_dir": str(tmp / "work"),
        "datasets": datasets,
    }
    return parse_config(raw, source=None, environ={}, check_paths=False)


def nifti_dataset_config(root: Path, **overrides: Any) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "name": "brain",
        "format": "nifti",
        "root": str(root),
        "modalities": ["flair"],
        "images": "{subject}/{modality}.nii.gz",
        "label": "{subject}/seg.nii.gz",
        "target_labels": [1, 2, 4],
        "val_fraction": 0.25,
    }
    ds.update(overrides)
    return ds
