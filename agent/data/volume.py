"""One 3D image as the agent sees it, whatever file format it came from.

DICOM series and NIfTI files both become a :class:`Volume`: a float32 array indexed (I, J, K) and the
NIfTI-convention affine that maps a voxel index to RAS+ millimetres. Everything downstream (catalog,
loading for training, the admin tools) works on this one representation, so a DICOM series and the
NIfTI file dcm2niix would make of it are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import nibabel as nib
import numpy as np
from nibabel.openers import Opener

from agent.config import WarningCategory
from agent.errors import VolumeError


class VolumeWarning(str):
    """A volume warning: the text shown to the admin, with the category it was given where it was made.

    A ``str``, so that every consumer that prints, joins or compares warnings keeps working; the
    category travels with it to the catalog, which decides from it (and the dataset's
    ``exclude_warnings``) whether the subject may be trained on. Text alone has no category:
    :func:`warning_category` calls it ``other``.
    """

    category: WarningCategory

    def __new__(cls, message: str, category: WarningCategory = WarningCategory.OTHER) -> VolumeWarning:
        self = super().__new__(cls, message)
        self.category = WarningCategory(category)
        return self

    def __getnewargs__(self) -> tuple[str, WarningCategory]:  # type: ignore[override]
        # Pickling (volumes read in worker processes) must keep the category.
        return (str(self), self.category)


def warning_category(warning: str) -> WarningCategory:
    """The category of a warning: the one it was made with, ``other`` for plain text."""
    return warning.category if isinstance(warning, VolumeWarning) else WarningCategory.OTHER


def rescale_into(out: np.ndarray, stored: np.ndarray, slope: float, intercept: float) -> None:
    """OUT (float32) = STORED * SLOPE + INTERCEPT, the one rescale arithmetic of DICOM values.

    The product in float64 then float32, the intercept added in float32: a slice stack rescaled
    frame by frame and stored voxels rescaled whole give the same bits. A value past float32's
    range becomes infinity without a numpy warning (the caller counts such values).
    """
    if slope == 1.0 and intercept == 0.0:
        np.copyto(out, stored, casting="unsafe")
        return
    with np.errstate(over="ignore", invalid="ignore"):
        np.multiply(stored, slope, out=out, casting="unsafe")
        out += np.float32(intercept)


@dataclass(frozen=True)
class StoredVoxels:
    """Integer voxels as a DICOM series stores them, and the linear map to their values.

    ``values`` has the volume's shape (I, J, K) and an integer dtype of at most 16 bits; every
    voxel's value is ``values * slope + intercept`` in float32, computed exactly as the float
    assembly computes it (:meth:`to_float32`).
    """

    values: np.ndarray
    slope: float
    intercept: float

    def to_float32(self) -> np.ndarray:
        """The voxel values, float32, in the memory order of ``values``."""
        out = np.empty(self.values.T.shape, dtype=np.float32).T
        rescale_into(out, self.values, self.slope, self.intercept)
        return out

    @property
    def integral(self) -> bool:
        """Whether every value is the stored integer plus a whole number: slope 1, whole intercept."""
        return self.slope == 1.0 and float(self.intercept).is_integer()


class Volume:
    """A 3D image with its voxel-to-world geometry.

    ``array`` is float32 with shape (I, J, K); for DICOM, I is the column index, J the row index and K
    the slice index in increasing order along the slice normal. ``affine`` maps (i, j, k, 1) to RAS+ mm.
    ``patient_id`` never leaves the site: it exists only to derive the keyed subject hash.

    A DICOM series of integer pixels with one rescale keeps its stored values (``stored``) and
    computes ``array`` from them on first use: converting a folder to NIfTI then writes the stored
    integers as they are, as dcm2niix does, and never makes the float32 copy (twice the size).
    """

    def __init__(
        self,
        *,
        affine: np.ndarray,
        modality: str,
        source: Literal["dicom", "nifti"],
        files: list[Path],
        array: np.ndarray | None = None,
        stored: StoredVoxels | None = None,
        warnings: list[str] | None = None,
        patient_id: str | None = None,
        series_uid: str | None = None,
        description: str = "",
    ) -> None:
        if (array is None) == (stored is None):
            raise ValueError("a Volume takes either its float32 array or its stored voxels")
        self._array = array
        self.stored = stored
        self.affine = affine
        self.modality = modality
        self.source = source
        self.files = files
        self.warnings: list[str] = [] if warnings is None else warnings
        self.patient_id = patient_id
        self.series_uid = series_uid
        self.description = description

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            assert self.stored is not None
            self._array = self.stored.to_float32()
        return self._array

    def __repr__(self) -> str:
        return (
            f"Volume(shape={self.shape}, source={self.source!r}, modality={self.modality!r}, "
            f"files={len(self.files)}, stored={self.stored is not None})"
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        i, j, k = self.array.shape if self.stored is None else self.stored.values.shape
        return int(i), int(j), int(k)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along I, J, K (lengths of the affine's columns)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(norms[0]), float(norms[1]), float(norms[2])

    @property
    def orientation(self) -> str:
        """Closest anatomical axis codes of I, J, K, e.g. "LPS" for a plain DICOM axial series.

        An axis without direction (a degenerate affine) is "?" rather than an exception: this is a
        display value, and one odd volume must not stop the listing of a folder.
        """
        return "".join(code or "?" for code in nib.orientations.aff2axcodes(self.affine))


def count_nonfinite(array: np.ndarray) -> int:
    """How many voxels are NaN or infinite (0 for integer data, which cannot hold either).

    Such voxels poison every statistic computed over a volume (normalisation, loss, gradients), so
    a training round that meets one fails; the readers report them as a warning and the catalog
    scan refuses the subject, naming it, long before a round starts.
    """
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def nonfinite_warning(count: int) -> VolumeWarning:
    """The volume warning for ``count`` non-finite voxels (the same words for DICOM and NIfTI)."""
    return VolumeWarning(
        f"{count} voxel(s) are not finite (NaN or infinity): the catalog scan refuses this volume",
        WarningCategory.PIXELS,
    )


def choose_volume(count: int, volume_index: int | None, what: str) -> tuple[int, VolumeWarning | None]:
    """The 4D rule, one for NIfTI files and DICOM series: which of ``count`` volumes to read.

    A 4D acquisition (an fMRI time series, the directions of a diffusion series, the echoes or
    repeats of a DICOM series, a series of Siemens mosaics) is refused by default with a
    :class:`VolumeError` naming the volume count: silently picking one of its volumes would hand
    training data that nobody chose, and mixing them would not be an image at all. A caller that was
    told which volume to take passes ``volume_index`` (0-based, in acquisition order); the volume then
    carries a warning that says it is one of several. Returns the index and that warning (None for a
    3D image, ``count`` 1).
    """
    if count == 1:
        return 0, None
    if volume_index is None:
        raise VolumeError(
            f"{what} is 4D: {count} volumes (a time series, diffusion directions, echoes or repeats) "
            "where one 3D volume is expected; set the dataset's volume_index to the one to use "
            f"(0 to {count - 1}), or split it into 3D files"
        )
    if not 0 <= volume_index < count:
        raise VolumeError(
            f"{what} is 4D with {count} volumes: volume_index {volume_index} is out of range "
            f"(0 to {count - 1})"
        )
    return volume_index, VolumeWarning(
        f"4D acquisition of {count} volumes: volume {volume_index} taken (volume_index)",
        WarningCategory.ACQUISITION,
    )


def _is_nifti_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


# What read_nifti_volume reads: NIfTI files, and NIfTI pairs or Analyze 7.5 images by their header.
SUPPORTED_NIFTI = ".nii, .nii.gz, or an Analyze/NIfTI pair named by its .hdr (with the .img next to it)"


def is_volume_file_name(path: Path) -> bool:
    """Whether ``path`` names a file read_nifti_volume reads: a NIfTI file or the header of a pair."""
    return _is_nifti_name(path) or path.name.lower().endswith(".hdr")


def pair_image(path: Path) -> Path | None:
    """The .img file that holds the voxels of the pair whose header is ``path`` (None: not a header).

    Its case follows the header's (``T1.HDR`` pairs with ``T1.IMG``), as the tools that write pairs do.
    """
    name = path.name
    if not name.lower().endswith(".hdr"):
        return None
    return path.with_name(name[:-4] + (".IMG" if name.endswith(".HDR") else ".img"))


def pair_header(path: Path) -> Path | None:
    """The .hdr header of the pair whose voxel file is ``path`` (None: not an .img file)."""
    name = path.name
    if not name.lower().endswith(".img"):
        return None
    return path.with_name(name[:-4] + (".HDR" if name.endswith(".IMG") else ".hdr"))


# Image formats the agent does not read; a file of one is refused saying what is supported.
UNSUPPORTED_IMAGE_SUFFIXES = (".mgz", ".mgh", ".nrrd", ".nhdr", ".mha", ".mhd")


def _assumed_orientation(img: nib.AnalyzeImage) -> VolumeWarning | None:
    """A geometry warning when the header gives no orientation and nibabel fell back to a default.

    Analyze 7.5 has no orientation field at all, and a NIfTI header whose qform and sform codes are
    both 0 says the orientation is unknown: the affine is then pixdim on the diagonal, with an
    assumed left-right direction, so the anatomy's side is a guess.
    """
    if not isinstance(img, nib.Nifti1Pair | nib.Nifti2Pair):
        return VolumeWarning(
            "Analyze 7.5 header: it records no orientation, so orientation is assumed "
            "(left-right may be flipped)",
            WarningCategory.GEOMETRY,
        )
    if int(img.header["sform_code"]) == 0 and int(img.header["qform_code"]) == 0:
        return VolumeWarning(
            "NIfTI header without qform and sform (both codes 0): orientation assumed",
            WarningCategory.GEOMETRY,
        )
    return None


def read_nifti_volume(path: Path, modality: str = "", *, volume_index: int | None = None) -> Volume:
    """Read a 3D NIfTI file (or an Analyze/NIfTI pair by its .hdr), applying its scl_slope/scl_inter scaling.

    A pair's .img is read with its header; an .img named alone is refused, naming the .hdr to give
    instead, and any other file is refused saying what is supported (a NIfTI reader's message, not
    "not a DICOM file"). Analyze 7.5, and NIfTI without qform/sform, carry no orientation: read with
    nibabel's default and a geometry warning, which keeps them out of training by default.

    The affine is the one nibabel reports (sform if set, else qform). A 4D file whose fourth dimension
    is 1 is read as 3D; a 4D file with several volumes (a time series, a DWI) follows the 4D rule of
    :func:`choose_volume`: refused, unless ``volume_index`` names the volume to read. Files of more
    than four dimensions are refused. A 2D image becomes a volume with one slice.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path}: no such file")
    if path.name.lower().endswith(".img"):
        raise VolumeError(
            f"{path}: the voxel half of an Analyze/NIfTI pair; name its .hdr file instead "
            f"(supported: {SUPPORTED_NIFTI})"
        )
    if not is_volume_file_name(path):
        raise VolumeError(f"{path}: not a NIfTI file name (supported: {SUPPORTED_NIFTI})")
    image_half = pair_image(path)
    if image_half is not None and not image_half.is_file():
        raise VolumeError(f"{path}: Analyze/NIfTI pair header without its voxel file {image_half.name}")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several unrelated types for bad files
        raise VolumeError(f"{path}: not a readable NIfTI or Analyze file ({exc})") from exc
    if not isinstance(img, nib.AnalyzeImage):  # NIfTI-1/2 files and pairs, Analyze 7.5 (SPM variants too)
        raise VolumeError(f"{path}: not a NIfTI or Analyze image (nibabel read it as {type(img).__name__})")
    shape = img.shape
    if len(shape) > 4:
        raise VolumeError(
            f"{path}: {len(shape)}D NIfTI of shape {tuple(shape)}; only 3D volumes (or one volume of "
            "a 4D file) are read"
        )
    index, taken = choose_volume(int(shape[3]) if len(shape) == 4 else 1, volume_index, f"{path}")
    try:
        # Only the chosen volume is read from disk (an fMRI run may be gigabytes).
        data = np.asarray(img.dataobj[..., index] if len(shape) == 4 else img.dataobj, dtype=np.float32)
    except Exception as exc:  # truncated or corrupt data block
        raise VolumeError(f"{path}: cannot read the voxel data ({exc})") from exc
    shape = shape[:3]
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    data = data.reshape(tuple(int(s) for s in shape) + (1,) * (3 - len(shape)))
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{path}: the header's affine is not a valid voxel-to-world transform")
    warnings: list[str] = [taken] if taken else []
    assumed = _assumed_orientation(img)
    if assumed is not None:
        warnings.append(assumed)
    nonfinite = count_nonfinite(data)
    if nonfinite:
        warnings.append(nonfinite_warning(nonfinite))
    return Volume(
        array=data,
        affine=affine,
        modality=modality,
        source="nifti",
        files=[path],
        warnings=warnings,
    )


# Elements per block of `_compact`: a block, its int16 cast and the cast read back stay in the
# CPU cache (64 Ki elements: 256 KiB of floats).
_COMPACT_BLOCK = 1 << 16


def _compact(array: np.ndarray) -> np.ndarray:
    """The array as int16 when that is exact (most CT and MR data), else unchanged float32.

    One pass over blocks that stay in the CPU cache: each block is cast to int16, read back and
    compared. A value outside int16's range, a fraction or a NaN never equals its cast read
    back, so the round trip alone decides (no min/max passes over the whole volume); this
    halves the time of the check on a 300-slice 512x512 series.
    """
    if array.size == 0:
        return array
    # The volume's memory order (DICOM volumes are transposed views of a slice stack): the
    # blocks are then contiguous, and the int16 copy keeps the layout the writer streams.
    order: Literal["C", "F"] = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
    flat = array.ravel(order=order)
    out = np.empty(flat.shape, dtype=np.int16)
    back = np.empty(min(_COMPACT_BLOCK, flat.size), dtype=np.float32)
    same = np.empty(back.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        for start in range(0, flat.size, _COMPACT_BLOCK):
            block = flat[start : start + _COMPACT_BLOCK]
            n = block.size
            cast = out[start : start + n]
            np.copyto(cast, block, casting="unsafe")
            np.copyto(back[:n], cast)
            np.equal(back[:n], block, out=same[:n])
            if not same[:n].all():
                return array
    return out.reshape(array.shape, order=order)


def write_nifti(volume: Volume, path: Path) -> Path:
    """Write ``volume`` as a NIfTI-1 file (gzip if the name ends in .gz) with sform and qform set.

    Voxels are stored as int16 when that represents every value exactly (half the size of float32, as
    dcm2niix does), else as float32. The file carries only voxels and geometry: no description, no
    patient data.
    """
    path = Path(path)
    if not _is_nifti_name(path):
        raise VolumeError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a sibling first and renamed, so a crash never leaves a half-written file behind.
    tmp = path.with_name(f".{path.name}.partial{''.join(path.suffixes)}")
    if volume.stored is not None and volume.stored.integral:
        _write_stored(volume.stored, volume.affine, tmp)
    else:
        img = nib.Nifti1Image(_compact(np.asarray(volume.array, dtype=np.float32)), volume.affine)
        img.set_sform(volume.affine, code=1)
        img.set_qform(volume.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, str(tmp))
    tmp.replace(path)
    return path


def _write_stored(stored: StoredVoxels, affine: np.ndarray, path: Path) -> None:
    """Write STORED's integers as they are, the whole-number intercept in ``scl_inter``.

    The header is nibabel's; the voxels go out in one write straight from the slice stack (NIfTI's
    order is the stack's memory order), without the copy and the checks nibabel's writer makes.
    """
    values = stored.values
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(values.dtype)
    hdr.set_data_shape(values.shape)
    hdr.set_sform(affine, code=1)
    hdr.set_qform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    if stored.intercept != 0.0:
        hdr.set_slope_inter(1.0, stored.intercept)
    hdr["vox_offset"] = _SINGLE_FILE_OFFSET
    with Opener(str(path), "wb") as out:
        out.write(hdr.binaryblock)
        out.write(b"\0" * (_SINGLE_FILE_OFFSET - len(hdr.binaryblock)))  # no extensions
        # A view of the stack's memory, not a copy (the opener takes any bytes-like object).
        out.write(cast(bytes, np.ascontiguousarray(values.T).data))


# A single-file NIfTI-1's voxels start after the 348-byte header and the 4-byte extension flag.
_SINGLE_FILE_OFFSET = 352
