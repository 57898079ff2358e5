"""DICOM discovery and series assembly: a folder of files in, oriented volumes out.

How a folder is read:

* Every regular file under the folder is looked at, whatever its name or extension. A file is DICOM
  when it has the 128-byte preamble followed by ``DICM``. A file without preamble is accepted only when
  it starts like a DICOM data set (a group 0002 or 0008 element) and pydicom parses it into a data set
  with a known SOP Class UID; images among those also need Rows, Columns and pixel data. Anything else
  is skipped with a reason.
* Each file is opened and parsed exactly once, header and pixel data together, by a pool of reader
  threads (or processes, on request). Uncompressed little-endian single-frame files (nearly all of a
  scanner's output) take a fast path that walks the data elements and keeps only those the assembly
  needs; everything else (compressed transfer syntaxes through the pylibjpeg plugins, big endian,
  multi-frame, files without meta header) goes through pydicom.
* Non-image objects (structured reports, RT structure sets and plans, presentation states, DICOMDIR
  files, ...) are counted by SOP class and skipped. Corrupt or truncated files are skipped with a reason;
  the scan goes on.
* Images are grouped by SeriesInstanceUID, and a series is split further when image orientation,
  rows/columns or pixel spacing differ inside it (each part becomes its own volume, with a warning).
* Projection images are 2D images, one volume per file (with one slice), as dcm2niix writes them:
  files of a projection modality (CR, DX, MG, IO, PX, RG, XA, RF) and any file without slice position
  (ImagePositionPatient and ImageOrientationPatient) are never stacked with other files, since the
  views of a radiograph series do not lie at distances along a normal. A multi-frame file stays one
  volume (its frames in frame order, a tomosynthesis stack along its positions).
* Slices are ordered by their position along the slice normal (ImagePositionPatient projected on the
  cross product of the ImageOrientationPatient cosines). The frames of a multi-frame file without
  positions are ordered by frame number, with a warning; such a volume gets an assumed spacing.
* Zero or missing PixelSpacing is unknown: 1 mm is assumed in-plane, with a warning.
* Siemens mosaics (ImageType MOSAIC: EPI, DWI, fMRI) hold a whole volume as tiles of one 2D image. They
  are split as dcm2niix and nibabel split them: NumberOfImagesInMosaic from the CSA image header
  (read by nibabel's ``nicom.csareader``), a square grid of ceil(sqrt(N)) tiles filled row by row,
  ImagePositionPatient moved from the corner of the whole mosaic to the corner of the first tile, and
  slice k placed k x SpacingBetweenSlices along the CSA header's SliceNormalVector. Each tile is then a
  slice like any other, so the several mosaics of one series (its time points or diffusion
  directions) repeat the same positions and follow the 4D rule below. A mosaic whose CSA header is
  missing or unreadable (private tags stripped by an anonymiser) is skipped with the reason, never read
  as one tile image.

Pixel values are the modality's values, as pydicom's ``apply_modality_lut`` gives them:

* a Modality LUT (ModalityLUTSequence) is applied when present, and then takes the place of
  RescaleSlope/RescaleIntercept, as the standard says; otherwise the rescale is applied;
* MONOCHROME1 images (higher values darker, as CR, DX and MG often write them) are inverted within the
  range their stored values can take, so that higher values are brighter as in MONOCHROME2 and a
  dataset mixing both looks alike to training; the volume's warning says so;
* colour images are refused, whether RGB/YBR (three samples per pixel) or PALETTE COLOR (one sample
  that is an index into a colour table, not an intensity): only greyscale images form volumes.

Documented behaviours for irregular series (all reported as warnings on the volume):

* duplicate positions: a slice whose position and pixel data equal an earlier one is dropped;
* 4D series: when every position holds the same number N > 1 of different images (echoes, phases,
  repeats, diffusion directions, a time series; a series of Siemens mosaics), the series is N volumes
  and follows the 4D rule of :func:`agent.data.volume.choose_volume`, the same as for a 4D NIfTI: refused
  with the reason, unless a ``volume_index`` is given (volumes in InstanceNumber order at each
  position). Positions that repeat unevenly are neither one volume nor a complete 4D acquisition: the
  series is refused;
* non-uniform spacing (a missing slice): the volume is kept as it is, and its affine uses the median
  slice spacing, so voxels beyond the gap are displaced by the missing distance: check the warning;
* sheared stacks (CT gantry tilt): the affine follows the actual slice positions, so it is not
  orthogonal; the warning says so.

The affine maps (column, row, slice) to RAS+ mm and matches what dcm2niix writes for the same series,
once both are reoriented to the closest canonical (RAS) orientation.

Volume warnings never contain file names or header values, so they are safe to show anywhere.
"""

from __future__ import annotations

import hashlib
import io
import math
import multiprocessing
import os
import struct
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from pydicom.uid import UID

from agent.config import WarningCategory
from agent.data.volume import (
    StoredVoxels,
    Volume,
    VolumeWarning,
    choose_volume,
    count_nonfinite,
    nonfinite_warning,
    rescale_into,
)
from agent.errors import DicomError, FedsiteError, VolumeError

# A whole file's bytes as read (`_read_rest`): the parser only reads it.
Buffer = bytes | bytearray

with warnings.catch_warnings():
    # nibabel warns on import that its DICOM *readers* are experimental; only its CSA header parser
    # (stable, and what dcm2niix's own parser mirrors) is used here.
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

# Tags the assembly reads; the fast path skips every other element without decoding it.
TAG_IMAGE_TYPE = 0x00080008
TAG_SOP_CLASS = 0x00080016
TAG_MODALITY = 0x00080060
TAG_SERIES_DESCRIPTION = 0x0008103E
TAG_PATIENT_ID = 0x00100020
TAG_SLICE_THICKNESS = 0x00180050
TAG_SPACING_BETWEEN = 0x00180088
TAG_SERIES_UID = 0x0020000E
TAG_INSTANCE_NUMBER = 0x00200013
TAG_IPP = 0x00200032
TAG_IOP = 0x00200037
TAG_SAMPLES = 0x00280002
TAG_PHOTOMETRIC = 0x00280004
TAG_NUMBER_OF_FRAMES = 0x00280008
TAG_ROWS = 0x00280010
TAG_COLUMNS = 0x00280011
TAG_PIXEL_SPACING = 0x00280030
TAG_BITS_ALLOCATED = 0x00280100
TAG_BITS_STORED = 0x00280101
TAG_PIXEL_REPRESENTATION = 0x00280103
TAG_RESCALE_INTERCEPT = 0x00281052
TAG_RESCALE_SLOPE = 0x00281053
TAG_MODALITY_LUT_SEQUENCE = 0x00283000
TAG_FLOAT_PIXEL_DATA = 0x7FE00008
TAG_DOUBLE_PIXEL_DATA = 0x7FE00009
TAG_PIXEL_DATA = 0x7FE00010
FAST_TAGS = [
    0x00020002,  # MediaStorageSOPClassUID
    0x00020010,  # TransferSyntaxUID
    TAG_IMAGE_TYPE,
    TAG_SOP_CLASS,
    TAG_MODALITY,
    TAG_SERIES_DESCRIPTION,
    TAG_PATIENT_ID,
    TAG_SLICE_THICKNESS,
    TAG_SPACING_BETWEEN,
    TAG_SERIES_UID,
    TAG_INSTANCE_NUMBER,
    TAG_IPP,
    TAG_IOP,
    TAG_SAMPLES,
    TAG_PHOTOMETRIC,
    TAG_NUMBER_OF_FRAMES,
    TAG_ROWS,
    TAG_COLUMNS,
    TAG_PIXEL_SPACING,
    TAG_BITS_ALLOCATED,
    TAG_BITS_STORED,
    TAG_PIXEL_REPRESENTATION,
    TAG_RESCALE_INTERCEPT,
    TAG_RESCALE_SLOPE,
    TAG_MODALITY_LUT_SEQUENCE,
    TAG_FLOAT_PIXEL_DATA,
    TAG_DOUBLE_PIXEL_DATA,
    TAG_PIXEL_DATA,
]

# Two positions closer than this along the normal are the same slice position.
SAME_POSITION_MM = 0.01
# Tolerances when deciding that two slices share orientation / pixel spacing.
ORIENTATION_TOL = 1e-3
PIXEL_SPACING_TOL = 1e-3
# Modalities whose images are projections (radiographs, mammograms, fluoroscopy, intra-oral and
# panoramic X-ray): each file is its own 2D image, never a slice of a stack with the other files.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RG", "XA", "RF"})
# Below this many files the scan reads in-process: starting workers would cost more than it saves.
MIN_FILES_FOR_POOL = 16


@dataclass(frozen=True)
class Skipped:
    """A file the scan did not use, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class DicomScan:
    """What a folder scan found: assembled volumes, skipped files, and non-image objects by SOP class."""

    volumes: list[Volume] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    non_image: dict[str, int] = field(default_factory=dict)
    files_seen: int = 0

    @property
    def num_non_image(self) -> int:
        return sum(self.non_image.values())


@dataclass
class _Frame:
    """One 2D image: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    frame: int
    series_uid: str
    modality: str
    patient_id: str | None
    description: str
    rows: int
    cols: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    instance: int | None
    slope: float
    intercept: float
    pixels: np.ndarray  # stored values, shape (rows, cols)
    # PixelSpacing was present but zero or negative (projection modalities write 0\\0): unknown.
    spacing_zero: bool = False
    # MONOCHROME1: the range (low, high) of the modality values the stored values can map to; the
    # assembly inverts each value v to low + high - v. None for MONOCHROME2.
    invert_range: tuple[float, float] | None = None
    # A tile of a Siemens mosaic of this many images (0: not from a mosaic).
    mosaic: int = 0


@dataclass
class _FileResult:
    path: Path
    frames: list[_Frame] = field(default_factory=list)
    skip_reason: str | None = None
    non_image: str | None = None


class _Skip(FedsiteError):
    """Raised inside a worker to skip the current file with the given reason."""


# ---------------------------------------------------------------------------------------------------
# Reading one file (runs in reader threads or worker processes)


def _text(value: bytes | None) -> str:
    if not value:
        return ""
    return value.decode("latin-1").strip(" \x00")


def _floats(value: bytes | None, tag: int) -> list[float]:
    text = _text(value)
    if not text:
        return []
    try:
        return [float(v) for v in text.split("\\")]
    except ValueError:
        raise _Skip(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) is not numeric: {text[:40]!r}") from None


def _int_string(value: bytes | None) -> int | None:
    text = _text(value)
    if not text:
        return None
    try:
        return int(float(text.split("\\")[0]))
    except ValueError:
        return None


def _us(value: bytes | None) -> int | None:
    if not value or len(value) < 2:
        return None
    return int(struct.unpack("<H", value[:2])[0])


def _geometry_value(values: list[float], n: int, name: str) -> tuple[float, ...] | None:
    if not values:
        return None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise _Skip(f"{name} has {len(values)} value(s), expected {n} finite numbers")
    return tuple(values)


def _pixel_spacing(values: list[float]) -> tuple[tuple[float, float] | None, bool]:
    """PixelSpacing as (row, column) mm, or None when unknown; the flag says it was zero or negative.

    Some projection modalities write ``0\\0`` (or a zero column spacing) instead of leaving the
    element out. A zero spacing makes the voxel-to-world matrix singular, which breaks every consumer
    of the affine (orientation codes, reorientation, NIfTI writing), so it is treated exactly like a
    missing spacing: unknown, with a warning on the volume, never a reason to fail the file.
    """
    spacing = _geometry_value(values, 2, "PixelSpacing")
    if spacing is None:
        return None, False
    if not all(v > 0 for v in spacing):
        return None, True
    return (spacing[0], spacing[1]), False


GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})


def _check_greyscale(samples: int, photometric: str) -> None:
    """Skip colour images: several samples per pixel (RGB, YBR) or a PALETTE COLOR index image.

    A palette image has one sample per pixel like a greyscale one, but its values are indices into a
    colour table: read as intensities they would look like an image and mean nothing. A missing
    PhotometricInterpretation is taken as MONOCHROME2, as readers commonly do.
    """
    photometric = photometric.strip().upper()
    if samples != 1:
        raise _Skip(
            f"colour image (SamplesPerPixel={samples}, {photometric}): only greyscale images form volumes"
        )
    if photometric and photometric not in GREYSCALE:
        kind = "palette colour image" if photometric == "PALETTE COLOR" else "colour image"
        raise _Skip(f"{kind} ({photometric}): only greyscale images (MONOCHROME1/2) form volumes")


def _stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The smallest and largest value ``bits_stored`` bits can hold."""
    if signed:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def _rescaled_range(
    photometric: str, bits_stored: int, signed: bool, slope: float, intercept: float
) -> tuple[float, float] | None:
    """For a MONOCHROME1 image, the range of its rescaled values; None for any other image.

    Inverting within the range the stored values can take (not the range one image happens to use)
    maps the same stored value to the same output in every slice and every file of a series.
    """
    if photometric.strip().upper() != "MONOCHROME1":
        return None
    low, high = _stored_range(bits_stored, signed)
    a, b = low * slope + intercept, high * slope + intercept
    return (min(a, b), max(a, b))


def _sop_class_name(uid: str) -> str:
    if not uid:
        return "unknown SOP class"
    name = UID(uid).name
    return name if name != uid else f"SOP class {uid}"


def _native_pixels(
    raw: bytes | memoryview, rows: int, cols: int, bits_allocated: int, bits_stored: int, signed: bool
) -> np.ndarray:
    dtype = (
        {8: "i1", 16: "<i2", 32: "<i4"}[bits_allocated]
        if signed
        else {8: "u1", 16: "<u2", 32: "<u4"}[bits_allocated]
    )
    count = rows * cols
    need = count * bits_allocated // 8
    if len(raw) < need:
        raise _Skip(f"pixel data truncated: {len(raw)} bytes for {rows}x{cols} pixels ({need} needed)")
    arr = np.frombuffer(raw, dtype=dtype, count=count).reshape(rows, cols)
    if bits_stored < bits_allocated:
        # Bits above BitsStored may hold overlays or garbage; sign-extend or mask them as pydicom does.
        shift = bits_allocated - bits_stored
        arr = (arr << shift) >> shift if signed else arr & ((1 << bits_stored) - 1)
    return arr


class _Fallback(FedsiteError):
    """The fast walker met an encoding it does not handle; pydicom reads the file instead."""


_UNPACK_TAG = struct.Struct("<HH").unpack_from
_UNPACK_U16 = struct.Struct("<H").unpack_from
_UNPACK_U32 = struct.Struct("<I").unpack_from
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_FAST_TAG_SET = frozenset(FAST_TAGS)
_UNDEFINED = 0xFFFFFFFF


def _walk(
    data: Buffer, pos: int, implicit: bool, out: dict[int, memoryview] | None, stop_group: int | None = None
) -> tuple[int, bool]:
    """Walk little-endian data elements from ``pos``, keeping the values of FAST_TAGS in ``out``.

    Returns the position after the last element and whether an item delimiter ended the walk (inside a
    sequence item). Sequences of undefined length are skipped item by item; ``stop_group`` ends the walk
    at the first element of another group (for the file meta group).
    """
    end = len(data)
    view = memoryview(data)
    while pos + 8 <= end:
        group, elem = _UNPACK_TAG(data, pos)
        if stop_group is not None and group != stop_group:
            return pos, False
        tag = group << 16 | elem
        if tag == 0xFFFEE00D:
            return pos + 8, True
        vr = b""
        if implicit:
            length = _UNPACK_U32(data, pos + 4)[0]
            pos += 8
        else:
            vr = bytes(data[pos + 4 : pos + 6])  # hashed below: not a bytearray
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise _Fallback
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    break
                length = _UNPACK_U32(data, pos + 8)[0]
                pos += 12
            else:
                length = _UNPACK_U16(data, pos + 6)[0]
                pos += 8
        if length == _UNDEFINED:
            if tag in (TAG_PIXEL_DATA, TAG_FLOAT_PIXEL_DATA, TAG_DOUBLE_PIXEL_DATA):
                raise _Fallback  # encapsulated pixel data in a native transfer syntax: let pydicom judge
            if out is not None and tag in _FAST_TAG_SET:
                out[tag] = view[pos:pos]  # a sequence's presence is what matters (the Modality LUT)
            pos = _skip_sequence(data, pos, implicit or vr == b"UN")
            continue
        if pos + length > end:
            raise _Skip(
                f"file truncated inside element ({group:04X},{elem:04X}): "
                f"{end - pos} of {length} bytes present"
            )
        if out is not None and tag in _FAST_TAG_SET:
            out[tag] = view[pos : pos + length]
        pos += length
    if pos != end:
        raise _Skip(f"file truncated: {end - pos} trailing byte(s) do not form a data element")
    return pos, False


def _skip_sequence(data: Buffer, pos: int, implicit: bool) -> int:
    end = len(data)
    while True:
        if pos + 8 > end:
            raise _Skip("file truncated inside a sequence")
        group, elem = _UNPACK_TAG(data, pos)
        length = _UNPACK_U32(data, pos + 4)[0]
        pos += 8
        tag = group << 16 | elem
        if tag == 0xFFFEE0DD:
            return pos
        if tag != 0xFFFEE000:
            raise _Fallback
        if length == _UNDEFINED:
            pos, delimited = _walk(data, pos, implicit, None)
            if not delimited:
                raise _Skip("file truncated inside a sequence item")
        else:
            pos += length


def _fast_frames(path: Path, data: Buffer, pos: int, implicit: bool, meta_sop: str) -> _FileResult | None:
    """Parse an uncompressed little-endian file; None when it needs the general path (multi-frame, ...)."""
    raw: dict[int, memoryview] = {}
    try:
        _walk(data, pos, implicit, raw)
    except _Fallback:
        return None
    elems: dict[int, bytes | None] = {tag: bytes(v) for tag, v in raw.items() if tag != TAG_PIXEL_DATA}
    sop = _text(elems.get(TAG_SOP_CLASS)) or meta_sop
    if TAG_PIXEL_DATA not in raw:
        if TAG_FLOAT_PIXEL_DATA in raw or TAG_DOUBLE_PIXEL_DATA in raw:
            return None
        return _no_pixels(path, sop)
    frames = _int_string(elems.get(TAG_NUMBER_OF_FRAMES))
    samples = _us(elems.get(TAG_SAMPLES)) or 1
    bits = _us(elems.get(TAG_BITS_ALLOCATED))
    photometric = _text(elems.get(TAG_PHOTOMETRIC))
    _check_greyscale(samples, photometric)
    if (
        (frames or 1) != 1
        or bits not in (8, 16, 32)
        or TAG_MODALITY_LUT_SEQUENCE in raw
        or "MOSAIC" in _text(elems.get(TAG_IMAGE_TYPE)).upper().split("\\")
    ):
        # A Modality LUT is applied by pydicom's own function, and a mosaic needs its CSA header
        # (a private element the fast walker skips): both on the general path.
        return None
    rows, cols = _us(elems.get(TAG_ROWS)), _us(elems.get(TAG_COLUMNS))
    if not rows or not cols:
        raise _Skip("image without Rows/Columns")
    assert bits is not None
    bits_stored = _us(elems.get(TAG_BITS_STORED)) or bits
    signed = (_us(elems.get(TAG_PIXEL_REPRESENTATION)) or 0) == 1
    pixels = _native_pixels(raw[TAG_PIXEL_DATA], rows, cols, bits, bits_stored, signed)
    spacing, spacing_zero = _pixel_spacing(_floats(elems.get(TAG_PIXEL_SPACING), TAG_PIXEL_SPACING))
    slope = _floats(elems.get(TAG_RESCALE_SLOPE), TAG_RESCALE_SLOPE)
    intercept = _floats(elems.get(TAG_RESCALE_INTERCEPT), TAG_RESCALE_INTERCEPT)
    thickness = _floats(elems.get(TAG_SPACING_BETWEEN), TAG_SPACING_BETWEEN) or _floats(
        elems.get(TAG_SLICE_THICKNESS), TAG_SLICE_THICKNESS
    )
    ipp = _geometry_value(_floats(elems.get(TAG_IPP), TAG_IPP), 3, "ImagePositionPatient")
    slope_value = slope[0] if slope and slope[0] != 0 else 1.0
    intercept_value = intercept[0] if intercept else 0.0
    frame = _Frame(
        path=path,
        frame=0,
        series_uid=_text(elems.get(TAG_SERIES_UID)),
        modality=_text(elems.get(TAG_MODALITY)),
        patient_id=_text(elems.get(TAG_PATIENT_ID)) or None,
        description=_text(elems.get(TAG_SERIES_DESCRIPTION)),
        rows=rows,
        cols=cols,
        iop=_geometry_value(_floats(elems.get(TAG_IOP), TAG_IOP), 6, "ImageOrientationPatient"),
        ipp=(ipp[0], ipp[1], ipp[2]) if ipp else None,
        pixel_spacing=spacing,
        spacing_zero=spacing_zero,
        thickness=thickness[0] if thickness else None,
        instance=_int_string(elems.get(TAG_INSTANCE_NUMBER)),
        slope=slope_value,
        intercept=intercept_value,
        pixels=pixels,
        invert_range=_rescaled_range(photometric, bits_stored, signed, slope_value, intercept_value),
    )
    return _FileResult(path, frames=[frame])


def _no_pixels(path: Path, sop: str) -> _FileResult:
    name = _sop_class_name(sop)
    if "Image Storage" in name and "Presentation" not in name:
        return _FileResult(path, skip_reason=f"{name} object without pixel data")
    return _FileResult(path, non_image=name)


def _item(ds: Any, sequence: str) -> Any:
    seq = ds.get(sequence) if ds is not None else None
    return seq[0] if seq else None


def _functional(per_frame: Any, shared: Any, sequence: str, attribute: str) -> Any:
    for group in (per_frame, shared):
        item = _item(group, sequence)
        if item is not None and attribute in item:
            return item.get(attribute)
    return None


def _as_floats(value: Any) -> list[float]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes | int | float) or not hasattr(value, "__iter__"):
        return [float(value)]
    return [float(v) for v in value]


def _dataset_frames(path: Path, ds: pydicom.Dataset, meta_sop: str) -> _FileResult:
    """Frames from a fully parsed data set: compressed, big endian, multi-frame, no meta header."""
    sop = str(ds.get("SOPClassUID", "") or meta_sop)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return _no_pixels(path, sop)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    _check_greyscale(samples, photometric)
    if not ds.get("Rows") or not ds.get("Columns"):
        raise _Skip("image without Rows/Columns")
    syntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # every decoder raises its own types
        syntax_name = UID(str(syntax)).name if syntax else "unknown transfer syntax"
        raise _Skip(f"pixel data cannot be decoded ({syntax_name}): {exc}") from None
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.ndim != 3 or pixels.shape[0] != n_frames:
        raise _Skip(f"pixel data of shape {pixels.shape} does not match NumberOfFrames={n_frames}")
    modality_lut = _modality_lut(ds, pixels)
    if modality_lut is not None:
        pixels, lut_range = modality_lut
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame_seq is not None and len(per_frame_seq) != n_frames:
        raise _Skip(f"PerFrameFunctionalGroupsSequence has {len(per_frame_seq)} items for {n_frames} frames")
    top_iop = _geometry_value(_as_floats(ds.get("ImageOrientationPatient")), 6, "ImageOrientationPatient")
    top_ipp = _geometry_value(_as_floats(ds.get("ImagePositionPatient")), 3, "ImagePositionPatient")
    top_spacing, top_spacing_zero = _pixel_spacing(_as_floats(ds.get("PixelSpacing")))
    top_thickness = _as_floats(ds.get("SpacingBetweenSlices")) or _as_floats(ds.get("SliceThickness"))
    top_slope = _as_floats(ds.get("RescaleSlope")) or _as_floats(ds.get("DoseGridScaling")) or [1.0]
    top_intercept = _as_floats(ds.get("RescaleIntercept")) or [0.0]
    offsets = _as_floats(ds.get("GridFrameOffsetVector"))
    instance = ds.get("InstanceNumber")
    result = _FileResult(path)
    for f in range(n_frames):
        item = per_frame_seq[f] if per_frame_seq is not None else None
        iop = _geometry_value(
            _as_floats(_functional(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient")),
            6,
            "ImageOrientationPatient",
        )
        iop = iop or top_iop
        ipp = _geometry_value(
            _as_floats(_functional(item, shared, "PlanePositionSequence", "ImagePositionPatient")),
            3,
            "ImagePositionPatient",
        )
        if ipp is None and top_ipp is not None:
            if n_frames == 1:
                ipp = top_ipp
            elif len(offsets) == n_frames and iop is not None:
                # RT dose and similar: frames lie along the normal at GridFrameOffsetVector offsets.
                normal = np.cross(iop[:3], iop[3:])
                ipp = tuple(np.asarray(top_ipp) + (offsets[f] - offsets[0]) * normal)
        spacing, spacing_zero = _pixel_spacing(
            _as_floats(_functional(item, shared, "PixelMeasuresSequence", "PixelSpacing"))
        )
        if spacing is None and not spacing_zero:
            spacing, spacing_zero = top_spacing, top_spacing_zero
        thickness = _as_floats(
            _functional(item, shared, "PixelMeasuresSequence", "SpacingBetweenSlices")
        ) or _as_floats(_functional(item, shared, "PixelMeasuresSequence", "SliceThickness"))
        thickness = thickness or top_thickness
        slope = _as_floats(_functional(item, shared, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _as_floats(
            _functional(item, shared, "PixelValueTransformationSequence", "RescaleIntercept")
        )
        slope_value = (slope or top_slope)[0]
        slope_value = slope_value if slope_value != 0 else 1.0
        intercept_value = (intercept or top_intercept)[0]
        if modality_lut is not None:
            # The LUT replaced the rescale: the pixels are modality values already.
            slope_value, intercept_value = 1.0, 0.0
            invert = lut_range if photometric.strip().upper() == "MONOCHROME1" else None
        elif np.issubdtype(pixels.dtype, np.integer):
            bits_stored = int(ds.get("BitsStored", 0) or 0) or pixels.dtype.itemsize * 8
            signed = np.issubdtype(pixels.dtype, np.signedinteger)
            invert = _rescaled_range(photometric, bits_stored, signed, slope_value, intercept_value)
        else:
            invert = None  # float pixel data has no stored range to invert within
        result.frames.append(
            _Frame(
                path=path,
                frame=f,
                series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
                modality=str(ds.get("Modality", "") or ""),
                patient_id=str(ds.get("PatientID", "") or "") or None,
                description=str(ds.get("SeriesDescription", "") or ""),
                rows=int(ds.Rows),
                cols=int(ds.Columns),
                iop=iop,
                ipp=(float(ipp[0]), float(ipp[1]), float(ipp[2])) if ipp is not None else None,
                pixel_spacing=spacing,
                spacing_zero=spacing_zero,
                thickness=thickness[0] if thickness else None,
                instance=int(instance) if instance not in (None, "") else None,
                slope=slope_value,
                intercept=intercept_value,
                pixels=pixels[f],
                invert_range=invert,
            )
        )
    if _is_mosaic(ds):
        if n_frames != 1:
            raise _Skip(f"Siemens mosaic with {n_frames} frames: only single-frame mosaics are split")
        result.frames = _demosaic(ds, result.frames[0])
    return result


def _is_mosaic(ds: pydicom.Dataset) -> bool:
    image_type = ds.get("ImageType") or []
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "MOSAIC" for v in values)


def _demosaic(ds: pydicom.Dataset, mosaic: _Frame) -> list[_Frame]:
    """The slices of a Siemens mosaic, each a frame with its own position, as dcm2niix makes them.

    NumberOfImagesInMosaic and SliceNormalVector come from the CSA image header. The tiles fill a
    square grid of ceil(sqrt(N)) tiles row by row (the grid's last tiles are padding). The mosaic's
    ImagePositionPatient is that of a slice as large as the whole mosaic, centred like the tiles: it is
    moved by half the size difference along the row and column directions to the first tile's corner
    (nibabel's ``MosaicWrapper.image_position``, dcm2niix's mosaic correction). Slice k lies k slice
    spacings (SpacingBetweenSlices, else SliceThickness) along the slice normal.
    """
    try:
        csa = csareader.get_csa_header(ds, "image")
        count = csareader.get_n_mosaic(csa) if csa else None
        csa_normal = csareader.get_slice_normal(csa) if csa else None
    except Exception as exc:  # nibabel raises its own and plain errors for a damaged header
        raise _Skip(f"Siemens mosaic whose CSA header cannot be read ({type(exc).__name__}): {exc}") from None
    if not count:
        raise _Skip(
            "Siemens mosaic without NumberOfImagesInMosaic in a CSA image header (private tags "
            "removed?): its tiles cannot be split into slices"
        )
    count = int(count)
    grid = math.ceil(math.sqrt(count))
    if mosaic.rows % grid or mosaic.cols % grid:
        raise _Skip(
            f"Siemens mosaic of {mosaic.rows}x{mosaic.cols} pixels cannot hold a {grid}x{grid} grid "
            f"of tiles for its {count} images"
        )
    if mosaic.iop is None or mosaic.ipp is None:
        raise _Skip("Siemens mosaic without ImagePositionPatient/ImageOrientationPatient")
    if not mosaic.thickness or mosaic.thickness <= 0:
        raise _Skip("Siemens mosaic without SpacingBetweenSlices or SliceThickness")
    tile_rows, tile_cols = mosaic.rows // grid, mosaic.cols // grid
    row_dir, col_dir, normal = _orientation_vectors(mosaic.iop)
    if csa_normal is not None and len(csa_normal) == 3 and np.all(np.isfinite(csa_normal)):
        length = float(np.linalg.norm(csa_normal))
        if length > 1e-6:
            normal = np.asarray(csa_normal, dtype=np.float64) / length
    spacing = mosaic.pixel_spacing or (1.0, 1.0)  # unknown spacing: warned about at assembly
    corner = (
        np.asarray(mosaic.ipp, dtype=np.float64)
        + col_dir * spacing[0] * (mosaic.rows - tile_rows) / 2
        + row_dir * spacing[1] * (mosaic.cols - tile_cols) / 2
    )
    slices: list[_Frame] = []
    for k in range(count):
        r, c = divmod(k, grid)
        position = corner + normal * mosaic.thickness * k
        slices.append(
            replace(
                mosaic,
                frame=k,
                rows=tile_rows,
                cols=tile_cols,
                ipp=(float(position[0]), float(position[1]), float(position[2])),
                pixels=mosaic.pixels[
                    r * tile_rows : (r + 1) * tile_rows, c * tile_cols : (c + 1) * tile_cols
                ],
                mosaic=count,
            )
        )
    return slices


def _modality_lut(ds: pydicom.Dataset, pixels: np.ndarray) -> tuple[np.ndarray, tuple[float, float]] | None:
    """Pixels through the data set's Modality LUT, and the LUT's output range; None without a LUT.

    pydicom's ``apply_modality_lut`` does the lookup (values past the table take its first or last
    entry), so a LUT means here exactly what it means to pydicom.
    """
    if "ModalityLUTSequence" not in ds or not ds.ModalityLUTSequence:
        return None
    item = ds.ModalityLUTSequence[0]
    try:
        out = np.asarray(apply_modality_lut(pixels, ds))
        entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
        # Every input the table maps, through pydicom too: the table as pydicom reads it (OW or US).
        table = np.asarray(apply_modality_lut(np.arange(first, first + entries), ds))
    except Exception as exc:  # a malformed LUT is a reason to skip this file, not the folder
        raise _Skip(f"Modality LUT cannot be applied: {type(exc).__name__}: {exc}") from None
    return out, (float(table.min()), float(table.max()))


def _looks_like_dataset_start(head: bytes) -> bool:
    """A file without preamble may still be DICOM: it then starts with a group 0002 or 0008 element."""
    if len(head) < 8:
        return False
    group_le = head[0] | head[1] << 8
    group_be = head[0] << 8 | head[1]
    return group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008)


def _read_file(path: Path) -> _FileResult:
    """Classify and read one file; never raises for a bad file (the result says why it was skipped)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
            has_marker = len(head) == 132 and head[128:132] == b"DICM"
            if not has_marker and not _looks_like_dataset_start(head):
                return _FileResult(path, skip_reason="not a DICOM file (no 'DICM' marker at byte 128)")
            data = _read_rest(fh, head)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _parse(path, data, has_marker)
    except _Skip as exc:
        return _FileResult(path, skip_reason=str(exc))
    except OSError as exc:
        return _FileResult(path, skip_reason=f"cannot be read: {exc.strerror or exc}")
    except Exception as exc:  # a corrupt file must never stop the scan
        return _FileResult(path, skip_reason=f"cannot be parsed as DICOM: {type(exc).__name__}: {exc}")


def _read_rest(fh: io.BufferedReader, head: bytes) -> Buffer:
    """HEAD and the rest of the file in one buffer, read into place.

    ``head + fh.read()`` would copy every file's pixels once more (157 MB for a 300-slice
    512x512 series); the frames' pixel arrays are views of this buffer.
    """
    size = os.fstat(fh.fileno()).st_size
    if size <= len(head):
        return head + fh.read()
    buf = bytearray(size)
    view = memoryview(buf)
    view[: len(head)] = head
    got = len(head)
    while got < size:
        n = fh.readinto(view[got:])
        if not n:
            break  # the file shrank while read: parse what is there, as fh.read() would
        got += n
    view.release()
    rest = fh.read()  # the file grew while read: its tail too
    if got < size or rest:
        return bytes(buf[:got]) + rest
    return buf  # bytes-like: the parser only reads it


def _parse(path: Path, data: Buffer, has_marker: bool) -> _FileResult:
    meta_sop = ""
    if has_marker:
        meta: dict[int, memoryview] = {}
        try:
            pos, _ = _walk(data, 132, False, meta, stop_group=0x0002)
        except _Fallback:
            pos = -1
        syntax = _text(bytes(meta.get(0x00020010, b"")))
        meta_sop = _text(bytes(meta.get(0x00020002, b"")))
        if meta_sop == DICOMDIR_SOP_CLASS:
            return _FileResult(path, non_image=_sop_class_name(meta_sop))
        if pos > 0 and syntax in (IMPLICIT_LE, EXPLICIT_LE):
            fast = _fast_frames(path, data, pos, syntax == IMPLICIT_LE, meta_sop)
            if fast is not None:
                return fast
        ds = pydicom.dcmread(io.BytesIO(data))
        return _dataset_frames(path, ds, meta_sop)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception:
        raise _Skip(
            "not a DICOM file (no 'DICM' marker, and it does not parse as a DICOM data set)"
        ) from None
    sop = str(ds.get("SOPClassUID", "") or "")
    if not sop or UID(sop).name == sop:
        raise _Skip("not a DICOM file (no 'DICM' marker, and no known SOP Class UID)")
    if "PixelData" not in ds:
        return _no_pixels(path, sop)
    if not ds.get("Rows") or not ds.get("Columns"):
        raise _Skip("image without Rows/Columns")
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        raise _Skip("DICOM data set without meta header whose encoding cannot be determined")
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(
        IMPLICIT_LE if implicit else EXPLICIT_LE if little else pydicom.uid.ExplicitVRBigEndian
    )
    return _dataset_frames(path, ds, "")


def _read_chunk(paths: Sequence[Path]) -> list[_FileResult]:
    return [_read_file(p) for p in paths]


# ---------------------------------------------------------------------------------------------------
# Discovery and parallel reading


def _list_files(root: Path) -> tuple[list[Path], list[Skipped]]:
    """Regular files under ``root`` in a stable order, and what could not be listed or is not a file."""
    if root.is_file():
        return [root], []
    found: list[Path] = []
    problems: list[Skipped] = []

    def unreadable(exc: OSError) -> None:
        problems.append(
            Skipped(Path(exc.filename or root), f"folder cannot be listed: {exc.strerror or exc}")
        )

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file():
                found.append(path)
            elif not path.exists():
                problems.append(Skipped(path, "broken symbolic link"))
            else:
                # FIFOs, sockets and devices: opening one could block the scan forever.
                problems.append(Skipped(path, "not a regular file"))
    return found, problems


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    # Threads mostly overlap file reads, so a few more than the CPUs pay off even on small machines.
    return max(4, min(cpus, 8))


def read_files(
    paths: Sequence[Path], workers: int | None = None, *, processes: bool = False
) -> list[_FileResult]:
    """Read files in parallel (in this process for few files), keeping the input order.

    Threads are the default: they overlap the file reads, share the decoded pixels without copying and
    start instantly. ``processes=True`` parses in worker processes instead, which pays off for large
    folders of compressed images on an otherwise idle many-core machine (decoding runs truly in
    parallel), at the price of pickling every decoded frame back to this process.
    """
    workers = _default_workers() if workers is None else max(1, workers)
    if workers == 1 or len(paths) < MIN_FILES_FOR_POOL:
        return _read_chunk(paths)
    if not processes:
        with ThreadPoolExecutor(max_workers=workers) as threads:
            return list(threads.map(_read_file, paths))
    # A few chunks per worker balance load without paying per-file inter-process overhead.
    n_chunks = min(len(paths), workers * 4)
    size = -(-len(paths) // n_chunks)
    chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
    methods = multiprocessing.get_all_start_methods()
    # fork starts workers in milliseconds with pydicom already imported; spawn is the portable fallback.
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    results: list[_FileResult] = []
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=context) as pool:
        for chunk_result in pool.map(_read_chunk, chunks):
            results.extend(chunk_result)
    return results


# ---------------------------------------------------------------------------------------------------
# Series assembly


@dataclass
class _Group:
    series_uid: str
    rows: int
    cols: int
    iop: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    frames: list[_Frame] = field(default_factory=list)
    note: str | None = None

    def accepts(self, f: _Frame) -> bool:
        if (f.series_uid, f.rows, f.cols) != (self.series_uid, self.rows, self.cols):
            return False
        return _close(f.iop, self.iop, ORIENTATION_TOL) and _close(
            f.pixel_spacing, self.pixel_spacing, PIXEL_SPACING_TOL
        )


def _close(a: tuple[float, ...] | None, b: tuple[float, ...] | None, tol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= tol


def _is_projection(f: _Frame) -> bool:
    """A frame that is a 2D image of its own: a projection modality, or no slice position at all.

    Stacking such files along an assumed 1 mm spacing would make a volume that does not exist (the
    views of one radiograph series, a stack ordered only by InstanceNumber).
    """
    return f.modality.upper() in PROJECTION_MODALITIES or f.ipp is None or f.iop is None


def _group_frames(frames: Iterable[_Frame]) -> list[_Group]:
    groups: list[_Group] = []
    by_series: dict[str, list[_Group]] = {}
    for f in frames:
        # Files without SeriesInstanceUID are grouped per folder rather than merged across the tree.
        series = f.series_uid or f"folder:{f.path.parent}"
        if not f.series_uid:
            f.series_uid = series
        # A projection file is a group of its own (its frames, if several, stay together).
        key = f"{series}|file:{f.path}" if _is_projection(f) else series
        candidates = by_series.setdefault(key, [])
        for g in candidates:
            if g.accepts(f):
                g.frames.append(f)
                break
        else:
            g = _Group(series, f.rows, f.cols, f.iop, f.pixel_spacing, [f])
            candidates.append(g)
            groups.append(g)
    for parts in by_series.values():
        if len(parts) > 1:
            for n, g in enumerate(parts, start=1):
                g.note = (
                    f"series split into {len(parts)} volumes because orientation, rows/columns or pixel "
                    f"spacing differ inside it; this is part {n}"
                )
    return groups


def _orientation_vectors(iop: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row = np.asarray(iop[:3], dtype=np.float64)
    col = np.asarray(iop[3:], dtype=np.float64)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise DicomError("ImageOrientationPatient row and column cosines are parallel")
    return row, col, normal / norm


def _order_key(f: _Frame) -> tuple[int, str, int]:
    return (f.instance if f.instance is not None else 1 << 30, str(f.path), f.frame)


def _pixel_key(f: _Frame) -> tuple[Any, ...]:
    """Equal for two frames exactly when they give the same voxels (a digest stands for the pixels)."""
    digest = hashlib.blake2b(np.ascontiguousarray(f.pixels).tobytes(), digest_size=16).digest()
    return (f.slope, f.intercept, f.invert_range, f.pixels.dtype.str, f.pixels.shape, digest)


def _by_position(
    frames: list[_Frame], dist: list[float], warns: list[str], volume_index: int | None
) -> tuple[list[_Frame], list[float]]:
    """One frame per slice position: exact duplicates dropped, and the 4D rule where positions repeat.

    ``frames`` are sorted along the normal. At each position the frames are taken in InstanceNumber
    order, so that the k-th image at every position belongs to the k-th volume of a 4D series.
    """
    runs: list[tuple[float, list[_Frame]]] = []
    exact = 0
    i = 0
    while i < len(frames):
        j = i + 1
        while j < len(frames) and dist[j] - dist[i] < SAME_POSITION_MM:
            j += 1
        if j == i + 1:  # the usual case: one image at this position, nothing to compare
            runs.append((dist[i], [frames[i]]))
            i = j
            continue
        seen: set[tuple[Any, ...]] = set()
        unique: list[_Frame] = []
        for f in sorted(frames[i:j], key=_order_key):
            key = _pixel_key(f)
            if key in seen:
                exact += 1
            else:
                seen.add(key)
                unique.append(f)
        runs.append((dist[i], unique))
        i = j
    if exact:
        warns.append(
            VolumeWarning(
                f"dropped {exact} duplicate slice(s): same position and same pixel data as another slice",
                WarningCategory.SLICES,
            )
        )
    counts = sorted({len(images) for _, images in runs})
    if len(counts) > 1:
        raise DicomError(
            f"slice positions repeat unevenly ({counts[0]} to {counts[-1]} different images at a "
            "position): neither one 3D volume nor a complete 4D acquisition"
        )
    index, taken = choose_volume(counts[0], volume_index, "the series")
    if taken:
        warns.append(taken)
    return [images[index] for _, images in runs], [d for d, _ in runs]


def _fallback_thickness(frames: list[_Frame]) -> float:
    for f in frames:
        if f.thickness and f.thickness > 0:
            return float(f.thickness)
    return 1.0


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _provably_finite(frames: Sequence[_Frame]) -> bool:
    """Whether every rescaled voxel of FRAMES is finite without looking at one.

    Integer stored values times a finite slope plus a finite intercept stay finite in float32
    when even the dtype's extreme values do; most series are such, and skipping the count then
    saves a pass over the whole volume. Float pixel data are always counted.
    """
    for f in frames:
        if not np.issubdtype(f.pixels.dtype, np.integer):
            return False
        info = np.iinfo(f.pixels.dtype)
        extreme = max(abs(int(info.min)), abs(int(info.max)))
        bound = extreme * abs(f.slope) + abs(f.intercept)
        if f.invert_range is not None:
            bound += abs(f.invert_range[0]) + abs(f.invert_range[1])
        if not math.isfinite(bound) or bound >= _FLOAT32_MAX / 2:
            return False
    return True


# Stored pixel types a volume keeps as they are (rescaled on use): float32 holds each exactly.
_KEPT_STORED = frozenset(np.dtype(t) for t in ("i1", "u1", "<i2", "<u2"))


def _kept_stored(frames: Sequence[_Frame]) -> tuple[np.dtype[Any], float, float] | None:
    """The stored type, slope and intercept when the volume can keep its frames' stored values.

    That is when every frame has the same integer type of at most 16 bits, the same rescale and
    no MONOCHROME1 inversion, and the rescaled values are finite: one linear map then gives every
    voxel's value. None otherwise: the frames are rescaled into a float32 stack one by one.
    """
    ref = frames[0]
    dtype = ref.pixels.dtype
    if dtype not in _KEPT_STORED or not _provably_finite(frames):
        return None
    for f in frames:
        if (
            f.pixels.dtype != dtype
            or f.slope != ref.slope
            or f.intercept != ref.intercept
            or f.invert_range is not None
        ):
            return None
    return dtype, ref.slope, ref.intercept


def _assemble(group: _Group, volume_index: int | None = None) -> Volume:
    warns: list[str] = []
    if group.note:
        warns.append(VolumeWarning(group.note, WarningCategory.SERIES))
    frames = group.frames
    spacing = group.pixel_spacing
    if spacing is None:
        if any(f.spacing_zero for f in frames):
            warns.append(
                VolumeWarning(
                    "PixelSpacing is zero (unknown): 1 mm assumed in-plane", WarningCategory.GEOMETRY
                )
            )
        else:
            warns.append(
                VolumeWarning("PixelSpacing missing: 1 mm assumed in-plane", WarningCategory.GEOMETRY)
            )
        spacing = (1.0, 1.0)
    has_positions = group.iop is not None and all(f.ipp is not None for f in frames)
    if group.iop is not None:
        row, col, normal = _orientation_vectors(group.iop)
    else:
        row, col, normal = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])
        warns.append(
            VolumeWarning(
                "ImageOrientationPatient missing: axial orientation assumed", WarningCategory.GEOMETRY
            )
        )

    if has_positions:
        dist = [float(np.dot(f.ipp, normal)) for f in frames]  # type: ignore[arg-type]
        order = sorted(range(len(frames)), key=lambda n: (dist[n], _order_key(frames[n])))
        frames = [frames[n] for n in order]
        dist = [dist[n] for n in order]
        frames, dist = _by_position(frames, dist, warns, volume_index)
        first = np.asarray(frames[0].ipp, dtype=np.float64)
        if len(frames) > 1:
            gaps = np.diff(dist)
            step_mm = float(np.median(gaps))
            irregular = np.abs(gaps - step_mm) > max(0.01 * step_mm, 1e-3)
            if irregular.any():
                largest = float(gaps.max())
                missing = max(0, round(largest / step_mm) - 1)
                warns.append(
                    VolumeWarning(
                        f"non-uniform slice spacing: {int(irregular.sum())} gap(s) differ from the median "
                        f"{step_mm:.4g} mm (largest {largest:.4g} mm, about {missing} missing slice(s)); "
                        "the volume is kept and its affine uses the median spacing",
                        WarningCategory.GEOMETRY,
                    )
                )
            last = np.asarray(frames[-1].ipp, dtype=np.float64)
            travel = last - first
            along = float(np.dot(travel, normal))
            step = travel / along * step_mm
            shear = travel - along * normal
            if np.linalg.norm(shear) > 1e-3 * max(1.0, abs(along)):
                warns.append(
                    VolumeWarning(
                        "slice positions are not along the slice normal (gantry tilt?): the affine follows "
                        "the positions and is not orthogonal",
                        WarningCategory.TILT,
                    )
                )
        else:
            step = normal * _fallback_thickness(frames)
    else:
        if len(frames) > 1:
            # Only the frames of one multi-frame file get here: files without positions are 2D images.
            warns.append(
                VolumeWarning(
                    "slice positions missing: frames in the order they are stored", WarningCategory.GEOMETRY
                )
            )
            warns.append(
                VolumeWarning(
                    "slice spacing unknown without positions: SpacingBetweenSlices/SliceThickness assumed",
                    WarningCategory.GEOMETRY,
                )
            )
        frames = sorted(frames, key=_order_key)
        first = np.asarray(frames[0].ipp if frames[0].ipp is not None else (0.0, 0.0, 0.0), dtype=np.float64)
        step = normal * _fallback_thickness(frames)

    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]
    lps[:3, 1] = col * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = first
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    if not np.all(np.isfinite(affine)) or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-9:
        # Checked here, where it is a reason to skip one series, rather than when a viewer, the NIfTI
        # writer or the catalog meets the singular matrix and fails the whole folder.
        raise DicomError("the series' geometry gives no valid voxel-to-world transform")

    kept = _kept_stored(frames)
    stack = np.empty((len(frames), group.rows, group.cols), dtype=np.float32 if kept is None else kept[0])
    # A rescale past float32's range gives infinity: counted and reported below, not a numpy warning.
    with np.errstate(over="ignore", invalid="ignore"):
        for k, f in enumerate(frames):
            if kept is not None:
                stack[k] = f.pixels
            else:
                rescale_into(stack[k], f.pixels, f.slope, f.intercept)
            if f.invert_range is not None:
                low, high = f.invert_range
                np.subtract(np.float32(low + high), stack[k], out=stack[k])
    mosaic = max((f.mosaic for f in frames), default=0)
    if mosaic:
        # Not a doubt about the data: it says where the slices came from, for whoever checks them.
        warns.append(
            VolumeWarning(
                f"Siemens mosaic: {mosaic} slices split from its tiles, placed by the CSA header",
                WarningCategory.ACQUISITION,
            )
        )
    if any(f.invert_range is not None for f in frames):
        warns.append(
            VolumeWarning(
                "MONOCHROME1 (higher values darker): values inverted so that higher values are "
                "brighter, as in MONOCHROME2",
                WarningCategory.PIXELS,
            )
        )
    # Float pixel data (and float rescale of integers) can hold NaN or infinity; say so here, where
    # the administrator inspects a folder, not first in a training round.
    nonfinite = 0 if kept is not None or _provably_finite(frames) else count_nonfinite(stack)
    if nonfinite:
        warns.append(nonfinite_warning(nonfinite))
    files = list(dict.fromkeys(f.path for f in frames))
    ref = frames[0]
    return Volume(
        array=stack.transpose(2, 1, 0) if kept is None else None,
        stored=None if kept is None else StoredVoxels(stack.transpose(2, 1, 0), kept[1], kept[2]),
        affine=affine,
        modality=ref.modality,
        source="dicom",
        files=files,
        warnings=warns,
        patient_id=ref.patient_id,
        series_uid=None if ref.series_uid.startswith("folder:") else ref.series_uid,
        description=ref.description,
    )


def assemble(results: Iterable[_FileResult], *, volume_index: int | None = None) -> DicomScan:
    """Turn per-file read results into volumes, skipped entries and non-image counts.

    ``volume_index`` is the volume to take from a 4D series (see :func:`choose_volume`); without it a
    4D series is skipped with the reason.
    """
    scan = DicomScan()
    frames: list[_Frame] = []
    non_image: Counter[str] = Counter()
    for res in results:
        scan.files_seen += 1
        if res.skip_reason is not None:
            scan.skipped.append(Skipped(res.path, res.skip_reason))
        elif res.non_image is not None:
            non_image[res.non_image] += 1
        else:
            frames.extend(res.frames)
    scan.non_image = dict(sorted(non_image.items()))
    for group in _group_frames(frames):
        try:
            scan.volumes.append(_assemble(group, volume_index))
        except Exception as exc:  # one odd series must never stop the rest of the folder
            ours = isinstance(exc, DicomError | VolumeError)
            detail = str(exc) if ours else f"{type(exc).__name__}: {exc}"
            for path in dict.fromkeys(f.path for f in group.frames):
                scan.skipped.append(Skipped(path, f"series cannot be assembled: {detail}"))
    scan.volumes.sort(key=lambda v: str(v.files[0]))
    return scan


def scan_dicom_folder(
    root: Path, *, workers: int | None = None, processes: bool = False, volume_index: int | None = None
) -> DicomScan:
    """Find and assemble every DICOM image series under ``root`` (a folder, or a single file).

    ``workers`` is the number of parallel readers (default: the CPUs available, between 4 and 8; 1 reads
    everything in the calling thread); ``processes`` reads in worker processes rather than threads (see
    :func:`read_files`); ``volume_index`` takes that volume of a 4D series (see :func:`assemble`).
    """
    root = Path(root)
    if not root.exists():
        raise DicomError(f"{root}: no such file or folder")
    files, problems = _list_files(root)
    scan = assemble(read_files(files, workers, processes=processes), volume_index=volume_index)
    scan.skipped = problems + scan.skipped
    scan.files_seen += sum(1 for p in problems if not p.reason.startswith("folder cannot be listed"))
    return scan


def read_dicom_series(folder: Path, *, workers: int | None = None, volume_index: int | None = None) -> Volume:
    """Read the one image series in ``folder``; DicomError when there is none or more than one.

    A 4D series is refused (its reason is the first skipped file's), or read at ``volume_index``.
    """
    scan = scan_dicom_folder(folder, workers=workers, volume_index=volume_index)
    if not scan.volumes:
        detail = f"; first skipped file: {scan.skipped[0]}" if scan.skipped else ""
        raise DicomError(
            f"{folder}: no DICOM image series found ({scan.files_seen} file(s), {len(scan.skipped)} skipped, "
            f"{scan.num_non_image} non-image object(s)){detail}"
        )
    if len(scan.volumes) > 1:
        shapes = ", ".join(str(v.shape) for v in scan.volumes)
        raise DicomError(
            f"{folder}: {len(scan.volumes)} image series found (shapes {shapes}); expected exactly one"
        )
    volume = scan.volumes[0]
    if scan.skipped:
        volume.warnings.append(
            VolumeWarning(f"{len(scan.skipped)} file(s) in the folder were skipped", WarningCategory.SERIES)
        )
    return volume
