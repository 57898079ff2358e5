"""Preview slices of one subject, rendered locally as grayscale PNG pixels.

The PNG is written here, byte by byte (signature, IHDR, one IDAT, IEND): no text chunk, no
time stamp, no library adding metadata of its own. What leaves this module is the pixels of a
few axial slices, windowed to 8 bits: never a DICOM header value, a file name or a path. The
console serves them only to a logged-in admin, with `Cache-Control: no-store`.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from agent.config import DatasetConfig
from agent.data.catalog import item_details
from agent.data.volume import Volume, read_nifti_volume
from agent.db.engine import Database
from agent.errors import PreviewError, UnknownDataset

# Where along the slice axis the previews are taken (fractions of the volume's depth).
SLICE_FRACTIONS = (0.3, 0.5, 0.7)
# The rendered side: small volumes are enlarged by whole pixels up to about this size.
TARGET_PIXELS = 192
_CACHE_SUBJECTS = 8


def png_gray8(image: np.ndarray) -> bytes:
    """A grayscale 8-bit PNG of IMAGE (2D uint8), with no chunk but the image's own."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError("png_gray8 takes a 2D uint8 array")
    height, width = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def window(slice2d: np.ndarray) -> np.ndarray:
    """Map the 1st-99th percentile of the slice's finite values to 0-255."""
    values = np.asarray(slice2d, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = np.percentile(finite, [1.0, 99.0])
    if high <= low:
        high = low + 1.0
    scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) / (high - low)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_slices(volume: Volume) -> list[bytes]:
    """PNGs of the axial slices at SLICE_FRACTIONS: array axes (I, J, K), K the slice axis; shown
    with J upwards so that a RAS or LPS volume is not upside down."""
    array = volume.array
    depth = array.shape[2]
    out = []
    for fraction in SLICE_FRACTIONS:
        k = min(depth - 1, max(0, round(fraction * (depth - 1))))
        image = window(np.flipud(array[:, :, k].T))
        factor = max(1, TARGET_PIXELS // max(image.shape))
        if factor > 1:
            image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
        out.append(png_gray8(image))
    return out


def _read(ds: DatasetConfig, path: Path) -> Volume:
    if ds.format == "dicom":
        from agent.data.dicom import read_dicom_series

        return read_dicom_series(path, volume_index=ds.volume_index)
    return read_nifti_volume(path, volume_index=ds.volume_index)


class Previews:
    """Rendered previews of the few subjects looked at last, keyed by dataset and subject key."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], list[bytes]] = OrderedDict()

    def slices(self, ds: DatasetConfig, subject_key: str) -> list[bytes]:
        """The preview PNGs of SUBJECT_KEY's first modality; PreviewError naming the subject's
        key (never its folder) when it has none or cannot be read."""
        key = (ds.name, subject_key)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            items = [d for d in item_details(self.db, ds.name) if d["subject_key"] == subject_key]
        except UnknownDataset:
            items = []
        if not items or not items[0]["images"]:
            raise PreviewError(f"dataset {ds.name} has no subject {subject_key[:16]}")
        images: dict[str, str] = items[0]["images"]
        modality = next((m for m in ds.modalities if m in images), next(iter(images)))
        try:
            rendered = render_slices(_read(ds, Path(images[modality])))
        except Exception as exc:  # the reader's message may name the file: not repeated here
            raise PreviewError(
                f"subject {subject_key[:16]} of dataset {ds.name} could not be read ({type(exc).__name__})"
            ) from None
        with self._lock:
            self._cache[key] = rendered
            while len(self._cache) > _CACHE_SUBJECTS:
                self._cache.popitem(last=False)
        return rendered
