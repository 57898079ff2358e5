"""Small generated datasets and plans for the engine and exchange tests."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from agent.data.catalog import ItemRef
from agent.data.synthetic.subjects import generate_subject
from agent.data.synthetic.writers import write_nifti_subject
from agent.training.engine import EngineContext
from agent.training.plan import Plan, parse_plan
from agent.training.registry import build_model, exchanged_state

TARGET_LABELS = (1, 2, 4)


def tiny_plan_dict(**overrides: Any) -> dict[str, Any]:
    """A 2D U-Net small enough to train a few epochs on two cores in seconds."""
    plan: dict[str, Any] = {
        "dataset": "brain",
        "model": {
            "name": "unet",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 1,
            "channels": [8, 16, 32],
            "strides": [2, 2],
            "num_res_units": 1,
            "norm": "batch",
        },
        "local_epochs": 1,
        "batch_size": 8,
        "optimizer": {"name": "adam", "lr": 0.003},
        "loss": "log_dice",
        "seed": 3,
        "data": {
            "spatial_dims": 2,
            "roi_size": [32, 32],
            "samples_per_subject": 8,
            "label_slice_fraction": 0.7,
        },
    }
    for key, value in overrides.items():
        plan[key] = value
    return copy.deepcopy(plan)


def tiny_plan(**overrides: Any) -> Plan:
    return parse_plan(tiny_plan_dict(**overrides))


def make_items(
    root: Path, *, train: int, val: int, size: int = 32, seed: int = 0
) -> tuple[list[ItemRef], list[ItemRef]]:
    """Generated brain-MRI-like subjects of one site written as NIfTI, as the catalog would list them."""
    out: dict[str, list[ItemRef]] = {"train": [], "val": []}
    for index in range(train + val):
        subject = generate_subject(seed, 1, index, size=size)
        folder = root / f"subject-{index:02d}"
        files = write_nifti_subject(subject, folder)
        split = "train" if index < train else "val"
        checksum = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()
        out[split].append(
            ItemRef(
                dataset="brain",
                subject_key=hashlib.sha256(f"{seed}-{index}".encode()).hexdigest()[:16],
                split=split,  # type: ignore[arg-type]
                images={"flair": folder / "flair.nii.gz"},
                label=folder / "seg.nii.gz",
                fmt="nifti",
                checksum=checksum,
                target_labels=TARGET_LABELS,
            )
        )
    return out["train"], out["val"]


def make_blob_items(
    root: Path, *, train: int, val: int, shape: tuple[int, int, int] = (32, 32, 16), seed: int = 0
) -> tuple[list[ItemRef], list[ItemRef]]:
    """Subjects with one to three bright, noisy spherical lesions in a textured background.

    Far easier than the generated brain MRI (whose lesions are a few dozen voxels at the
    sizes a CI test can afford), so that a few CPU epochs show real learning.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    out: dict[str, list[ItemRef]] = {"train": [], "val": []}
    for index in range(train + val):
        label = np.zeros(shape, dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            centre = rng.uniform(6, np.asarray(shape) - 6)
            radius = rng.uniform(3.0, 6.0)
            label[np.linalg.norm(grid - centre, axis=-1) <= radius] = 1
        image = rng.normal(100.0, 20.0, shape) + 60.0 * label + 10.0 * np.sin(grid[..., 0] / 3.0)
        folder = root / f"blob-{index:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        affine = np.diag([1.0, 1.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / "flair.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "seg.nii.gz")
        split = "train" if index < train else "val"
        files = [folder / "flair.nii.gz", folder / "seg.nii.gz"]
        out[split].append(
            ItemRef(
                dataset="brain",
                subject_key=f"blob-{seed}-{index}",
                split=split,  # type: ignore[arg-type]
                images={"flair": files[0]},
                label=files[1],
                fmt="nifti",
                checksum=hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest(),
                target_labels=(1,),
            )
        )
    return out["train"], out["val"]


def context(tmp: Path, name: str = "round", **kwargs: Any) -> EngineContext:
    return EngineContext(device="cpu", work_dir=tmp / "rounds" / name, cache_dir=tmp / "cache", **kwargs)


def initial_weights(plan: Plan, seed: int = 11) -> dict[str, torch.Tensor]:
    """Global weights as a coordinator would send them: a seeded initialisation."""
    torch.manual_seed(seed)
    return exchanged_state(build_model(plan))
