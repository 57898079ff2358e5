"""From catalog items to training tensors: a MONAI pipeline with a persistent on-disk cache.

Preprocessing is split in two, because the two halves have opposite costs:

- The deterministic half (read, reorient to RAS, optional resampling, per-modality z-score
  over the non-zero body mask, label map -> binary target) decodes DICOM/NIfTI and is slow.
  Its result is cached as .npy under `cache_dir`, keyed by the item's content checksum and a
  hash of exactly these settings, so the second epoch (and the next round) never decodes
  again, and a changed file or setting can never be served a stale array.
- The random half (which slices or patches, where to crop) is cheap and is drawn per sample
  from a generator seeded by (seed, epoch, subject, sample): the same seed gives the same
  batches, whatever the number of workers.

Errors name the subject key and the modality, never a path: they may end up in a round's
error message, which the coordinator can read.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import weakref
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    NormalizeIntensity,
    Orientation,
    ResampleToMatch,
    ResizeWithPadOrCrop,
    Spacing,
)
from pydantic import Field, field_validator, model_validator
from torch.utils.data import DataLoader, Dataset, Sampler

from agent.data.catalog import ItemRef
from agent.data.volume import Volume, read_nifti_volume
from agent.errors import DataLoadError
from agent.fileio import atomic_file
from agent.validation import StrictModel

# Bump when the deterministic preprocessing changes, so that old cache entries are not reused.
PREPROCESS_VERSION = 1
# At most this many foreground voxels per subject are kept to centre 3D patches on.
_MAX_FG_POINTS = 4096


class DataSettings(StrictModel):
    """The plan's optional "data" key: how subjects become training samples."""

    spatial_dims: Literal[2, 3] = 2
    # 2D slice size (X, Y) or 3D patch size (X, Y, Z), in RAS voxels; images are cropped or
    # zero-padded to it.
    roi_size: list[int] = Field(default_factory=lambda: [128, 128])
    # Channels in this order; default: the dataset's modalities in config order.
    modalities: list[str] | None = None
    # Resample to this voxel size (mm, RAS order) first; default: keep the native grid.
    spacing: list[float] | None = None
    # 2D: fraction of the sampled slices that contain label (the rest contain none, when the
    # subject has such slices). 3D: fraction of patches centred on a label voxel.
    label_slice_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    # 2D slices / 3D patches drawn per subject per epoch.
    samples_per_subject: int = Field(default=16, ge=1, le=100_000)

    @field_validator("roi_size")
    @classmethod
    def _roi_positive(cls, v: list[int]) -> list[int]:
        if any(n < 1 or n > 4096 for n in v):
            raise ValueError("every roi_size value must be between 1 and 4096")
        return v

    @field_validator("spacing")
    @classmethod
    def _spacing_shape(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 3 or any(not (0 < s < 100) for s in v)):
            raise ValueError("spacing must be three voxel sizes in mm, each > 0 and < 100")
        return v

    @field_validator("modalities")
    @classmethod
    def _modalities_unique(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("modalities must be a non-empty list without repeats")
        return v

    @model_validator(mode="after")
    def _roi_matches_dims(self) -> DataSettings:
        if len(self.roi_size) != self.spatial_dims:
            raise ValueError(
                f"roi_size has {len(self.roi_size)} values but spatial_dims is {self.spatial_dims}"
            )
        return self


# ----------------------------------------------------------------------------- deterministic part


def _modalities(item: ItemRef, settings: DataSettings) -> list[str]:
    wanted = settings.modalities or list(item.images)
    missing = [m for m in wanted if m not in item.images]
    if missing:
        raise DataLoadError(
            f"subject {item.subject_key}: modality {missing[0]!r} is not in dataset {item.dataset!r} "
            f"(it has {', '.join(item.images)})"
        )
    return wanted


def preprocess_key(item: ItemRef, settings: DataSettings) -> str:
    """Cache key: the item's content checksum plus every setting the cached arrays depend on."""
    desc = {
        "version": PREPROCESS_VERSION,
        "checksum": item.checksum,
        "orientation": "RAS",
        "spacing": settings.spacing,
        "normalisation": "zscore-nonzero-per-channel",
        "modalities": _modalities(item, settings),
        "target_labels": sorted(set(item.target_labels)),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _read(item: ItemRef, what: str, path: Path, dicom: bool) -> Volume:
    try:
        if dicom:
            # Imported on use: a NIfTI-only site never loads the DICOM stack.
            from agent.data.dicom import read_dicom_series

            return read_dicom_series(path, volume_index=item.volume_index)
        return read_nifti_volume(path, what, volume_index=item.volume_index)
    except Exception as exc:  # the reader's message names the file: keep it out of ours
        raise DataLoadError(
            f"subject {item.subject_key} of dataset {item.dataset!r}: cannot read {what} "
            f"({type(exc).__name__}); run `fedsite data scan` to re-check the dataset"
        ) from exc


def _meta(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), affine=torch.from_numpy(affine)
    )


def _as_meta(x: Any) -> MetaTensor:
    if not isinstance(x, MetaTensor):  # MONAI returns MetaTensor for MetaTensor input
        raise TypeError(f"expected a MetaTensor from the transform, got {type(x).__name__}")
    return x


def _plain(x: Any) -> torch.Tensor:
    """A plain contiguous tensor: batches carry no MONAI metadata."""
    t = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
    return t.contiguous()


def _same_grid(a: MetaTensor, b: MetaTensor) -> bool:
    return bool(a.shape[1:] == b.shape[1:] and np.allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-3))


def _preprocess(item: ItemRef, settings: DataSettings) -> tuple[np.ndarray, np.ndarray]:
    if item.label is None:
        raise DataLoadError(
            f"subject {item.subject_key} of dataset {item.dataset!r} has no label mask; "
            "training and validation need one (set the dataset's label pattern)"
        )
    orient = Orientation(axcodes="RAS", labels=None)
    channels: list[MetaTensor] = []
    for modality in _modalities(item, settings):
        vol = _read(item, modality, item.images[modality], item.fmt == "dicom")
        ch = _as_meta(orient(_meta(vol.array[None], vol.affine)))
        if channels and not _same_grid(channels[0], ch):
            # Co-registered modalities on slightly different grids: resample in world space.
            ch = _as_meta(ResampleToMatch(mode="bilinear", padding_mode="zeros")(ch, channels[0]))
        channels.append(ch)
    image = MetaTensor(torch.cat([c.as_tensor() for c in channels], dim=0), affine=channels[0].affine)
    lab = _read(item, "label", item.label, False)
    target = np.isin(np.rint(lab.array), np.asarray(item.target_labels)).astype(np.float32)
    label = _as_meta(orient(_meta(target[None], lab.affine)))
    if settings.spacing is not None:
        image = _as_meta(Spacing(pixdim=settings.spacing, mode="bilinear", padding_mode="zeros")(image))
    if not _same_grid(image, label):
        label = _as_meta(ResampleToMatch(mode="nearest", padding_mode="zeros")(label, image))
    normalised = NormalizeIntensity(nonzero=True, channel_wise=True)(image)
    img_np = np.ascontiguousarray(_plain(normalised).numpy(), dtype=np.float32)
    lab_np = (_plain(label).numpy() > 0.5).astype(np.uint8)
    if not np.all(np.isfinite(img_np)):
        raise DataLoadError(
            f"subject {item.subject_key} of dataset {item.dataset!r}: image has non-finite values"
        )
    return img_np, lab_np


# ----------------------------------------------------------------------------- the on-disk cache


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    folder = Path(cache_dir) / key[:2]
    return folder / f"{key}.image.npy", folder / f"{key}.label.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as fh:
        np.save(fh, array, allow_pickle=False)


def _load_cached(cache_dir: Path, key: str, *, mmap: bool) -> tuple[np.ndarray, np.ndarray] | None:
    img_path, lab_path = _cache_paths(cache_dir, key)
    if not (img_path.is_file() and lab_path.is_file()):
        return None
    mode: Literal["r"] | None = "r" if mmap else None
    try:
        image = np.load(img_path, mmap_mode=mode, allow_pickle=False)
        label = np.load(lab_path, mmap_mode=mode, allow_pickle=False)
    except (OSError, ValueError):
        return None  # unreadable entry (disk trouble, foreign file): rebuilt by the caller
    if (
        image.dtype != np.float32
        or label.dtype != np.uint8
        or image.ndim != 4
        or label.shape != (1, *image.shape[1:])
    ):
        return None
    return image, label


def _ensure_cached(
    item: ItemRef, settings: DataSettings, cache_dir: Path, *, mmap: bool
) -> tuple[np.ndarray, np.ndarray]:
    key = preprocess_key(item, settings)
    hit = _load_cached(cache_dir, key, mmap=mmap)
    if hit is not None:
        return hit
    image, label = _preprocess(item, settings)
    img_path, lab_path = _cache_paths(cache_dir, key)
    # Label first, image last: a reader sees the pair only once the image is in place.
    _save_atomic(lab_path, label)
    _save_atomic(img_path, image)
    if mmap:
        hit = _load_cached(cache_dir, key, mmap=True)
        if hit is not None:
            return hit
    return image, label


def load_preprocessed(
    item: ItemRef, settings: DataSettings, cache_dir: Path
) -> tuple[np.ndarray, np.ndarray]:
    """The item's preprocessed image (C, X, Y, Z) float32 and binary label (1, X, Y, Z) uint8,
    in RAS, from the cache when present (else computed and cached)."""
    return _ensure_cached(item, settings, Path(cache_dir), mmap=False)


# ----------------------------------------------------------------------------- random sampling


@dataclass(frozen=True)
class _Entry:
    item: ItemRef
    key: str
    shape: tuple[int, ...]  # (C, X, Y, Z)
    fg_slices: np.ndarray  # Z indices with label
    bg_slices: np.ndarray  # Z indices without label
    fg_points: np.ndarray  # (N, 3) sample of label voxels


def _pad_to(array: np.ndarray, roi: Sequence[int]) -> torch.Tensor:
    """Zero-pad the spatial axes symmetrically up to `roi` (same placement as MONAI's
    SpatialPad(method="symmetric")). Done by hand: it runs once per sample, where MONAI's
    metadata tracking costs more than the copy itself. Always a copy, never the memory map."""
    out = np.empty((array.shape[0], *roi), dtype=np.float32)
    _place(array, out)
    return torch.from_numpy(out)


def _place(region: np.ndarray, out: np.ndarray) -> None:
    """Write REGION into OUT (C, *roi), centred, zeros around: a sample's one copy out of the
    memory map, into its own array (`_pad_to`) or its place in a batch."""
    spatial = region.shape[1:]
    if tuple(spatial) == tuple(out.shape[1:]):
        out[...] = region
        return
    out.fill(0.0)
    offsets = [(r - n) // 2 for n, r in zip(spatial, out.shape[1:], strict=True)]
    out[(slice(None), *(slice(o, o + n) for o, n in zip(offsets, spatial, strict=True)))] = region


def _collated(batch: Any) -> Any:
    """The DataLoader's collate step for `TrainSamples.__getitems__`, which made the batch."""
    return batch


def _window(rng: np.random.Generator, dim: int, size: int, centre: int | None) -> tuple[int, int]:
    """[start, end) in the original axis for a `size` window; when dim < size the whole axis
    (zero-padded afterwards). With a centre, the window contains it."""
    if dim <= size:
        return 0, dim
    if centre is None:
        start = int(rng.integers(0, dim - size + 1))
    else:
        start = int(np.clip(centre - size // 2, 0, dim - size))
    return start, start + size


class TrainSamples(Dataset[dict[str, torch.Tensor]]):
    """Slices (2D) or patches (3D) drawn from cached, preprocessed subjects.

    Index = epoch * len(self) + position: the sampler carries the epoch, so that each
    sample's randomness is a function of (seed, epoch, subject, sample) only.
    """

    def __init__(
        self,
        entries: list[_Entry],
        settings: DataSettings,
        cache_dir: Path,
        seed: int,
        threads: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.entries = entries
        self.settings = settings
        self.cache_dir = Path(cache_dir)
        self.seed = seed
        self.threads = threads
        self.pin_memory = pin_memory
        self.num_subjects = len(entries)
        per = settings.samples_per_subject
        self._num_pos = round(per * settings.label_slice_fraction)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._opening = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.entries) * self.settings.samples_per_subject

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}  # memory maps are reopened in each worker
        state["_pool"] = None
        del state["_opening"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._opening = threading.Lock()

    def _threads(self) -> ThreadPoolExecutor:
        """The threads that place a batch's samples, started at the first batch and kept for
        the loader's life: starting them per batch cost about 0.9 ms a batch on 2 cores, three
        times the placing itself for small windows."""
        if self._pool is None:
            pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fedsite-load")
            # A loader nobody closes (a test, a DP round) still lets its threads go with it.
            weakref.finalize(self, pool.shutdown, wait=False)
            self._pool = pool
        return self._pool

    def close(self) -> None:
        """Stop the placing threads (`batches` does so when its epoch ends); a later batch
        starts them again."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _open(self, entry: _Entry) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._arrays.get(entry.key)
        if arrays is None:
            # One thread at a time: two would both rebuild a missing entry into the same files.
            with self._opening:
                arrays = self._arrays.get(entry.key)
                if arrays is None:
                    # Rebuilt here if the cache entry was removed or damaged since the loader was made.
                    arrays = _ensure_cached(entry.item, self.settings, self.cache_dir, mmap=True)
                    if tuple(arrays[0].shape) != entry.shape:
                        raise DataLoadError(
                            f"subject {entry.item.subject_key}: preprocessed shape changed during training"
                        )
                    self._arrays[entry.key] = arrays
        return arrays

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The batch of INDICES, as `torch.stack` of their samples would give it, but with one
        copy instead of two: each window goes from the memory map straight into its place in
        the batch (in pinned memory when `pin_memory`, ready for an asynchronous copy to the
        GPU). With `threads`, samples are placed by that many threads (NumPy copies without
        the GIL). The DataLoader hands the result to `_collated`, which leaves it as it is."""
        roi = tuple(self.settings.roi_size)
        channels = self.entries[0].shape[0]
        n = len(indices)
        image = torch.empty((n, channels, *roi), dtype=torch.float32, pin_memory=self.pin_memory)
        label = torch.empty((n, 1, *roi), dtype=torch.float32, pin_memory=self.pin_memory)
        image_np, label_np = image.numpy(), label.numpy()

        def place(slot: int) -> None:
            img, lab = self._region(indices[slot])
            _place(img, image_np[slot])
            _place(lab, label_np[slot])

        if self.threads < 2 or n < 2:
            for slot in range(n):
                place(slot)
        else:
            list(self._threads().map(place, range(n)))
        return {"image": image, "label": label}

    def _region(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample INDEX's image and label windows: views of the memory maps, up to roi_size."""
        epoch, pos = divmod(int(index), len(self))
        subject, sample = divmod(pos, self.settings.samples_per_subject)
        entry = self.entries[subject]
        rng = np.random.default_rng([self.seed, epoch, subject, sample])
        positive = sample < self._num_pos and len(entry.fg_slices) > 0
        image, label = self._open(entry)
        roi = self.settings.roi_size
        if self.settings.spatial_dims == 2:
            if positive:
                z = int(rng.choice(entry.fg_slices))
            elif len(entry.bg_slices):
                z = int(rng.choice(entry.bg_slices))
            else:
                z = int(rng.integers(entry.shape[3]))
            lab_slice = np.asarray(label[0, :, :, z])
            centre: list[int | None] = [None, None]
            if positive:
                pts = np.argwhere(lab_slice)
                centre = [int(v) for v in pts[int(rng.integers(len(pts)))]]
            (x0, x1), (y0, y1) = (_window(rng, entry.shape[1 + a], roi[a], centre[a]) for a in range(2))
            return image[:, x0:x1, y0:y1, z], label[:, x0:x1, y0:y1, z]
        centre3: list[int | None] = [None, None, None]
        if positive and len(entry.fg_points):
            centre3 = [int(v) for v in entry.fg_points[int(rng.integers(len(entry.fg_points)))]]
        (x0, x1), (y0, y1), (z0, z1) = (
            _window(rng, entry.shape[1 + a], roi[a], centre3[a]) for a in range(3)
        )
        return image[:, x0:x1, y0:y1, z0:z1], label[:, x0:x1, y0:y1, z0:z1]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        img, lab = self._region(index)
        roi = self.settings.roi_size
        return {"image": _pad_to(img, roi), "label": _pad_to(lab, roi)}


class _EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, seeded by (seed, epoch); indices carry the epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        self.epoch += 1
        order = np.random.default_rng([self.seed, epoch, 0x5A]).permutation(self.n)
        base = epoch * self.n
        return iter([base + int(i) for i in order])


# Sampling facts per cached entry, kept per process: the engine builds a loader per epoch,
# and computing them takes a full pass over each label volume.
_ENTRIES: dict[tuple[str, str, int], _Entry] = {}
_MAX_ENTRIES = 10_000


def _entry(item: ItemRef, settings: DataSettings, cache_dir: Path) -> _Entry:
    key = preprocess_key(item, settings)
    memo = (str(cache_dir), key, settings.spatial_dims)
    known = _ENTRIES.get(memo)
    if known is not None and all(p.is_file() for p in _cache_paths(cache_dir, key)):
        return known
    image, label = _ensure_cached(item, settings, cache_dir, mmap=True)
    lab = np.asarray(label[0])
    has = lab.any(axis=(0, 1))
    # Patch centres are needed in 3D only; 2D picks a label voxel of the chosen slice.
    fg = np.argwhere(lab) if settings.spatial_dims == 3 else np.zeros((0, 3), dtype=np.int64)
    if len(fg) > _MAX_FG_POINTS:
        # The subsample depends on the cache key only, so it is the same in every run.
        pick = np.random.default_rng(int(key[:8], 16)).choice(len(fg), _MAX_FG_POINTS, replace=False)
        fg = fg[np.sort(pick)]
    entry = _Entry(
        item=item,
        key=key,
        shape=tuple(int(s) for s in image.shape),
        fg_slices=np.flatnonzero(has),
        bg_slices=np.flatnonzero(~has),
        fg_points=fg.astype(np.int32),
    )
    if len(_ENTRIES) >= _MAX_ENTRIES:
        _ENTRIES.clear()
    _ENTRIES[memo] = entry
    return entry


def build_train_loader(
    items: Sequence[ItemRef],
    settings: DataSettings,
    *,
    batch_size: int,
    seed: int,
    cache_dir: Path,
    threads: int = 0,
    pin_memory: bool = False,
) -> DataLoader[dict[str, torch.Tensor]]:
    """A loader of {"image": (B, C, *roi) float32, "label": (B, 1, *roi) float32 in {0, 1}}.

    Every item is preprocessed (or found in the cache) here, before the first batch, so that a
    broken subject fails the round at once and workers never decode the same volume twice.
    Each iteration of the loader is one epoch with `samples_per_subject` samples per subject.
    `loader.dataset.num_subjects` is the number of subjects (FedAvg's sample count).
    A sample depends on (seed, epoch, subject, sample) alone, so a batch loaded by THREADS
    threads is the batch loaded by one; PIN_MEMORY stages batches for a GPU. Iterate it with
    `batches` to load the next batch while the current one trains.
    """
    if not items:
        raise DataLoadError("no training subjects: the dataset's train split is empty")
    if batch_size < 1:
        raise DataLoadError(f"batch_size must be at least 1, not {batch_size}")
    cache = Path(cache_dir)
    entries = [_entry(item, settings, cache) for item in items]
    channels = {e.shape[0] for e in entries}
    if len(channels) > 1:
        raise DataLoadError(f"subjects have different channel counts {sorted(channels)}")
    dataset = TrainSamples(entries, settings, cache, seed, threads=threads, pin_memory=pin_memory)
    # Loading stays in this process (threads, not worker processes): a worker process is
    # started per epoch, since the engine builds a loader per epoch, and on a GPU machine that
    # start cost more than the loading it took over (H200, 3D U-Net: 22 volumes/s with four
    # processes, 36 with none).
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=_EpochSampler(len(dataset), seed),
        num_workers=0,
        collate_fn=_collated,
        drop_last=False,
    )


_END = object()


def batches(loader: Iterable[Any], *, ahead: bool) -> Generator[Any, None, None]:
    """LOADER's batches in order; with AHEAD, the next one is loaded by a thread while the caller
    trains on the current one (on a GPU, loading and training then overlap).

    The iterator is made here, in the caller's thread: making it draws the loader's base seed
    from torch's global generator, and that draw must come at the same point of the training's
    random stream whether batches are loaded ahead or not. Closing this generator (a cancelled
    epoch) stops the thread before it returns. Its end, either way, also stops the threads
    that placed the loader's samples.
    """
    samples = getattr(loader, "dataset", None)
    try:
        yield from _batches(loader, ahead=ahead)
    finally:
        if isinstance(samples, TrainSamples):
            samples.close()


def _batches(loader: Iterable[Any], *, ahead: bool) -> Generator[Any, None, None]:
    source = iter(loader)
    if not ahead:
        yield from source
        return
    ready: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def load() -> None:
        try:
            for batch in source:
                if not offer(batch):
                    return
            offer(_END)
        except BaseException as exc:  # handed to the training thread, which raises it
            offer(exc)

    thread = threading.Thread(target=load, name="fedsite-batches", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def iter_val_volumes(
    items: Sequence[ItemRef], settings: DataSettings, *, cache_dir: Path
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(subject key, image (C, X, Y, Z) float32, label (1, X, Y, Z) float32 in {0, 1}) per item.

    Volumes are in RAS and normalised like the training data, centre-cropped / zero-padded to
    roi_size: in-plane (X, Y) for 2D models, which then run slice by slice along Z, and in
    all three axes for 3D models.
    """
    size = [*settings.roi_size, -1] if settings.spatial_dims == 2 else list(settings.roi_size)
    fit = ResizeWithPadOrCrop(spatial_size=size, method="symmetric", mode="constant")
    for item in items:
        image, label = load_preprocessed(item, settings, Path(cache_dir))
        img = _plain(fit(torch.from_numpy(image)))
        lab = _plain(fit(torch.from_numpy(label.astype(np.float32))))
        yield item.subject_key, img, lab
