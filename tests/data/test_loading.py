"""Loading for training: preprocessing in RAS, the on-disk cache, 2D slices and 3D patches."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from agent.data import loading
from agent.data.catalog import ItemRef, dataset_items, scan_datasets
from agent.data.loading import (
    DataSettings,
    build_train_loader,
    iter_val_volumes,
    load_preprocessed,
    preprocess_key,
)
from agent.db.engine import open_database
from agent.errors import DataLoadError
from tests.fixtures.catalog import make_config, make_nifti_dataset, nifti_dataset_config, write_nifti

SUBJECTS = [f"PAT-{n:04d}" for n in range(1, 6)]


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[ItemRef]:
    tmp = tmp_path_factory.mktemp("loading")
    make_nifti_dataset(tmp / "data", SUBJECTS, modalities=("flair", "t1"))
    cfg = make_config(tmp, [nifti_dataset_config(tmp / "data", modalities=["flair", "t1"])])
    db = open_database(cfg.db_url)
    scan_datasets(cfg, db)
    return dataset_items(db, "brain")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    seen: list[Path] = []
    real = loading.read_nifti_volume

    def counting(path: Path, modality: str = "", **kwargs: Any) -> Any:
        seen.append(Path(path))
        return real(path, modality, **kwargs)

    monkeypatch.setattr(loading, "read_nifti_volume", counting)
    return seen


def _batches(loader: Any) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def test_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="roi_size has 2 values but spatial_dims is 3"):
        DataSettings(spatial_dims=3)
    with pytest.raises(ValidationError, match="spacing must be three voxel sizes"):
        DataSettings(spacing=[1.0, 1.0])
    with pytest.raises(ValidationError, match="extra"):
        DataSettings.model_validate({"roi": [64, 64]})
    assert DataSettings().roi_size == [128, 128]


def test_preprocessing_is_ras_normalised_and_binary(items: list[ItemRef], tmp_path: Path) -> None:
    item = items[0]
    image, label = load_preprocessed(item, DataSettings(), tmp_path)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert image.shape == (2, 24, 24, 12) and label.shape == (1, 24, 24, 12)
    ras = nib.as_closest_canonical(nib.load(str(item.images["flair"])))
    raw = np.asarray(ras.dataobj, dtype=np.float32)
    mask = raw != 0
    # Same voxels, in RAS order: the z-score of the canonical image over its non-zero mask.
    expected = (raw[mask] - raw[mask].mean()) / raw[mask].std()
    np.testing.assert_allclose(image[0][mask], expected, atol=1e-4)
    assert np.all(image[0][~mask] == 0)
    seg = np.asarray(nib.as_closest_canonical(nib.load(str(item.label))).dataobj)
    np.testing.assert_array_equal(label[0], np.isin(seg, [1, 2, 4]))
    assert set(np.unique(seg)) == {0, 1, 2, 4}


def test_resampling_changes_the_grid(items: list[ItemRef], tmp_path: Path) -> None:
    image, label = load_preprocessed(items[0], DataSettings(spacing=[2.0, 2.0, 2.0]), tmp_path)
    assert image.shape == (2, 12, 12, 12) and label.shape == (1, 12, 12, 12)
    assert label.max() == 1


def test_second_epoch_and_next_loader_never_decode_again(
    items: list[ItemRef], tmp_path: Path, reads: list[Path]
) -> None:
    settings = DataSettings(roi_size=[16, 16], samples_per_subject=4)
    loader = build_train_loader(items, settings, batch_size=8, seed=0, cache_dir=tmp_path)
    assert len(reads) == len(items) * 3  # two modalities and the label, once each
    _batches(loader)
    _batches(loader)
    assert len(reads) == len(items) * 3
    again = build_train_loader(items, settings, batch_size=8, seed=0, cache_dir=tmp_path)
    _batches(again)
    list(iter_val_volumes(items, settings, cache_dir=tmp_path))
    assert len(reads) == len(items) * 3
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 2 * len(items) and all(f.endswith(".npy") for f in files)
    # Random-sampling settings share the cache; preprocessing settings do not.
    item = items[0]
    assert preprocess_key(item, settings) == preprocess_key(
        item,
        DataSettings(spatial_dims=3, roi_size=[8, 8, 8], samples_per_subject=2, label_slice_fraction=1.0),
    )
    for other in (DataSettings(spacing=[2, 2, 2]), DataSettings(modalities=["t1"])):
        assert preprocess_key(item, other) != preprocess_key(item, settings)
    relabelled = ItemRef(**{**item.__dict__, "target_labels": (1,)})
    assert preprocess_key(relabelled, settings) != preprocess_key(item, settings)


def test_damaged_cache_entry_is_rebuilt(items: list[ItemRef], tmp_path: Path, reads: list[Path]) -> None:
    settings = DataSettings()
    first, _ = load_preprocessed(items[0], settings, tmp_path)
    (image_file,) = tmp_path.rglob("*.image.npy")
    image_file.write_bytes(b"garbage")
    again, _ = load_preprocessed(items[0], settings, tmp_path)
    np.testing.assert_array_equal(first, again)
    assert len(reads) == 6
    # A cache cleared while a loader exists: its subjects are preprocessed again, not lost.
    small = DataSettings(roi_size=[16, 16], samples_per_subject=2)
    loader = build_train_loader(items[:2], small, batch_size=4, seed=0, cache_dir=tmp_path / "c")
    twin = build_train_loader(items[:2], small, batch_size=4, seed=0, cache_dir=tmp_path / "c")
    expected = [b["image"] for b in loader]
    shutil.rmtree(tmp_path / "c")
    assert all(torch.equal(a, b["image"]) for a, b in zip(expected, twin, strict=True))
    assert len(reads) == 6 + 2 * 2 * 3


def test_2d_batches_shapes_and_label_fraction(items: list[ItemRef], tmp_path: Path) -> None:
    for fraction in (0.0, 0.5, 1.0):
        settings = DataSettings(roi_size=[16, 20], samples_per_subject=8, label_slice_fraction=fraction)
        loader = build_train_loader(items, settings, batch_size=6, seed=3, cache_dir=tmp_path)
        assert len(loader.dataset) == 8 * len(items)  # type: ignore[arg-type]
        assert loader.dataset.num_subjects == len(items)  # type: ignore[attr-defined]
        batches = _batches(loader)
        images = torch.cat([b["image"] for b in batches])
        labels = torch.cat([b["label"] for b in batches])
        assert batches[0]["image"].shape == (6, 2, 16, 20)
        assert images.shape == (40, 2, 16, 20) and labels.shape == (40, 1, 16, 20)
        assert images.dtype == torch.float32 and labels.dtype == torch.float32
        assert type(images) is torch.Tensor
        assert set(labels.unique().tolist()) <= {0.0, 1.0}
        with_label = (labels.flatten(1).amax(1) > 0).float().mean().item()
        assert with_label == pytest.approx(fraction)


def test_3d_patches_shapes_and_padding(items: list[ItemRef], tmp_path: Path) -> None:
    settings = DataSettings(
        spatial_dims=3, roi_size=[16, 16, 8], samples_per_subject=2, label_slice_fraction=1.0
    )
    batches = _batches(build_train_loader(items, settings, batch_size=4, seed=0, cache_dir=tmp_path))
    assert [tuple(b["image"].shape) for b in batches] == [
        (4, 2, 16, 16, 8),
        (4, 2, 16, 16, 8),
        (2, 2, 16, 16, 8),
    ]
    assert all(b["label"].shape == (b["image"].shape[0], 1, 16, 16, 8) for b in batches)
    # Centred on label voxels: every patch contains label.
    assert all(bool(b["label"].flatten(1).amax(1).min() > 0) for b in batches)
    big = DataSettings(spatial_dims=3, roi_size=[32, 28, 16], samples_per_subject=1)
    batch = next(iter(build_train_loader(items, big, batch_size=5, seed=0, cache_dir=tmp_path)))
    assert batch["image"].shape == (5, 2, 32, 28, 16)
    # Zero padding around the whole (24, 24, 12) volume.
    assert float(batch["image"][:, :, :4].abs().sum()) == 0.0


def test_same_seed_same_batches(items: list[ItemRef], tmp_path: Path) -> None:
    settings = DataSettings(roi_size=[16, 16], samples_per_subject=4)

    def run(seed: int) -> list[list[torch.Tensor]]:
        loader = build_train_loader(items, settings, batch_size=5, seed=seed, cache_dir=tmp_path)
        return [[b["image"] for b in loader] for _epoch in range(2)]

    a, b, c = run(7), run(7), run(8)
    for ea, eb in zip(a, b, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(ea, eb, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a[0], a[1], strict=True))  # epochs differ
    assert not all(torch.equal(x, y) for x, y in zip(a[0], c[0], strict=True))  # seeds differ


@pytest.mark.parametrize("dims", [2, 3])
def test_loader_threads_give_the_same_batches_in_the_same_order(
    items: list[ItemRef], tmp_path: Path, dims: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`loader_threads` is a site's choice of speed: it must not change what a round trains on."""
    settings = DataSettings(spatial_dims=dims, roi_size=[16] * dims, samples_per_subject=3)
    loaded_on: set[str] = set()
    loaders: set[threading.Thread] = set()
    real = loading.TrainSamples._region

    def recording(self: loading.TrainSamples, index: int) -> Any:
        loaded_on.add(threading.current_thread().name)
        loaders.add(threading.current_thread())
        return real(self, index)

    monkeypatch.setattr(loading.TrainSamples, "_region", recording)

    def run(threads: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for _epoch in range(2):
            loader = build_train_loader(
                items, settings, batch_size=4, seed=5, cache_dir=tmp_path, threads=threads
            )
            out += list(loading.batches(loader, ahead=threads > 0))
            # The loader lives on (the engine's does until the epoch's end), its threads do not.
            assert not [t for t in threading.enumerate() if t.name.startswith("fedsite-load")]
        return out

    alone = run(0)
    assert loaded_on == {threading.current_thread().name}
    loaded_on.clear()
    loaders.clear()
    with_two = run(2)
    # A batch's samples were loaded by two threads, neither of them this one; an epoch's batches
    # share those two (four batches an epoch, two epochs).
    assert len(loaded_on) >= 2 and threading.current_thread().name not in loaded_on
    assert len(loaders) <= 2 * 2
    assert len(alone) == len(with_two) == 2 * 4  # 15 samples an epoch, in batches of 4
    for a, b in zip(alone, with_two, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


@pytest.mark.parametrize(
    ("dims", "roi"), [(2, [16, 16]), (3, [16, 16, 16]), (2, [64, 40]), (3, [12, 64, 20])]
)
def test_a_batch_is_its_samples_stacked(
    items: list[ItemRef], tmp_path: Path, dims: int, roi: list[int]
) -> None:
    """The loader places each window straight into the batch (one copy, not two); the batch must
    be what stacking the samples gives, padding included (rois past the volume's size)."""
    settings = DataSettings(spatial_dims=dims, roi_size=roi, samples_per_subject=3)
    loader = build_train_loader(items, settings, batch_size=4, seed=3, cache_dir=tmp_path, threads=2)
    samples = loader.dataset
    assert isinstance(samples, loading.TrainSamples)
    indices = [7, 0, 14, 3]
    batch = samples.__getitems__(indices)
    one_by_one = [samples[i] for i in indices]
    for key in ("image", "label"):
        assert torch.equal(batch[key], torch.stack([sample[key] for sample in one_by_one])), key
    assert batch["image"].shape == (4, 2, *roi) and batch["label"].shape == (4, 1, *roi)


def test_batches_loaded_ahead_raise_the_loading_error_and_stop_when_closed(
    items: list[ItemRef], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = DataSettings(roi_size=[16, 16], samples_per_subject=3)
    loader = build_train_loader(items, settings, batch_size=2, seed=5, cache_dir=tmp_path, threads=2)
    stream = loading.batches(loader, ahead=True)
    next(stream)
    stream.close()  # as a cancelled epoch does
    assert not [t for t in threading.enumerate() if t.name == "fedsite-batches"]

    calls = {"n": 0}
    real = loading.TrainSamples._region

    def failing(self: loading.TrainSamples, index: int) -> Any:
        calls["n"] += 1
        if calls["n"] > 4:
            raise DataLoadError("subject PAT-0003: cache entry unreadable")
        return real(self, index)

    monkeypatch.setattr(loading.TrainSamples, "_region", failing)
    got = []
    with pytest.raises(DataLoadError, match="PAT-0003: cache entry unreadable"):
        for batch in loading.batches(loader, ahead=True):
            got.append(batch)
    assert len(got) == 2  # the batches before the failing one arrived, in order
    assert not [t for t in threading.enumerate() if t.name == "fedsite-batches"]


def test_val_volumes_are_centre_cropped(items: list[ItemRef], tmp_path: Path) -> None:
    out = list(iter_val_volumes(items[:2], DataSettings(roi_size=[16, 32]), cache_dir=tmp_path))
    assert [k for k, _, _ in out] == [i.subject_key for i in items[:2]]
    for _, image, label in out:
        assert image.shape == (2, 16, 32, 12) and label.shape == (1, 16, 32, 12)
        assert label.dtype == torch.float32 and set(label.unique().tolist()) <= {0.0, 1.0}
    ((_, image3, _),) = iter_val_volumes(
        items[:1], DataSettings(spatial_dims=3, roi_size=[16, 16, 16]), cache_dir=tmp_path
    )
    assert image3.shape == (2, 16, 16, 16)


def test_errors_name_the_subject_not_the_path(items: list[ItemRef], tmp_path: Path) -> None:
    broken_dir = tmp_path / "PAT-SECRET-77"
    broken = write_nifti(broken_dir / "flair.nii.gz", np.ones((4, 4, 4), np.float32))
    broken.write_bytes(broken.read_bytes()[:100])
    item = ItemRef(**{**items[0].__dict__, "images": {"flair": broken, "t1": broken}, "checksum": "0" * 64})
    with pytest.raises(DataLoadError) as info:
        load_preprocessed(item, DataSettings(), tmp_path / "cache")
    message = str(info.value)
    assert item.subject_key in message and "flair" in message and "PAT-SECRET" not in message
    with pytest.raises(DataLoadError, match="modality 't2' is not in dataset 'brain'"):
        load_preprocessed(items[0], DataSettings(modalities=["t2"]), tmp_path / "cache")
    unlabelled = ItemRef(**{**items[0].__dict__, "label": None})
    with pytest.raises(DataLoadError, match="has no label mask"):
        build_train_loader([unlabelled], DataSettings(), batch_size=2, seed=0, cache_dir=tmp_path / "cache")
    with pytest.raises(DataLoadError, match="no training subjects"):
        build_train_loader([], DataSettings(), batch_size=2, seed=0, cache_dir=tmp_path / "cache")


def test_dicom_items_load_like_nifti(tmp_path: Path) -> None:
    from agent.config import load_config
    from coordinator.demo_federation import generate_federation

    layout = generate_federation(
        tmp_path / "fed", sites=1, subjects_per_site=[2], fmt="dicom", size=32, seed=2
    )
    cfg = load_config(layout.sites[0].config_path)
    db = open_database(cfg.db_url)
    scan_datasets(cfg, db)
    dicom_items = dataset_items(db, "brain")
    settings = DataSettings(roi_size=[32, 32], samples_per_subject=2, label_slice_fraction=1.0)
    batch = next(
        iter(build_train_loader(dicom_items, settings, batch_size=4, seed=0, cache_dir=tmp_path / "c"))
    )
    assert batch["image"].shape == (4, 1, 32, 32)
    assert bool(batch["label"].flatten(1).amax(1).min() > 0)
