"""A small writer of DICOM test series with a known ground truth.

Every series is written from an exact geometry (orientation, pixel spacing, slice positions), so a test
can compare what the reader assembled against the array and the RAS affine the series was made from,
independently of the reader's own arithmetic. Identity headers are made up, so that tests can also
prove that no patient data leaves through the tools' output.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"

FAKE_PATIENT_NAME = "Doe^Jane^Fixture"
FAKE_PATIENT_ID = "PAT-FIXTURE-4711"
FAKE_BIRTH_DATE = "19610203"
FAKE_INSTITUTION = "Saint Fixture Hospital"

ORIENTATIONS: dict[str, tuple[float, ...]] = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
}


def oblique_orientation(deg_a: float = 17.0, deg_b: float = 11.0) -> tuple[float, ...]:
    """An axial plane rotated about the LR axis by deg_a and then about the AP axis by deg_b."""
    a, b = np.deg2rad(deg_a), np.deg2rad(deg_b)
    rot_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rot_y = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rot = rot_y @ rot_x
    row, col = rot @ np.array([1.0, 0, 0]), rot @ np.array([0, 1.0, 0])
    # Cosines written with 8 decimals; the reader and dcm2niix both see exactly these numbers.
    return tuple(round(float(v), 8) for v in (*row, *col))


@dataclass
class SeriesTruth:
    """What a correct reader must produce from a written series (before any dropped/missing slices)."""

    folder: Path
    files: list[Path]
    array: np.ndarray  # float32 (I, J, K): column index, row index, slice index along the normal
    affine: np.ndarray  # voxel -> RAS+ mm
    series_uid: str
    positions: list[tuple[float, float, float]] = field(default_factory=list)


def _fmt(values: tuple[float, ...] | list[float] | np.ndarray) -> list[str]:
    return [f"{float(v):.6f}" for v in values]


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _identity(ds: Dataset, modality: str) -> None:
    ds.PatientName = FAKE_PATIENT_NAME
    ds.PatientID = FAKE_PATIENT_ID
    ds.PatientBirthDate = FAKE_BIRTH_DATE
    ds.InstitutionName = FAKE_INSTITUTION
    ds.StudyDate = "20240117"
    ds.SeriesDate = "20240117"
    ds.Modality = modality


def _pixel_module(ds: Dataset, rows: int, cols: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1


def geometry(
    orientation: str | tuple[float, ...],
    n_slices: int,
    pixel_spacing: tuple[float, float],
    slice_spacing: float,
    origin: tuple[float, float, float],
) -> tuple[tuple[float, ...], list[np.ndarray], np.ndarray]:
    """IOP, the LPS position of every slice, and the RAS affine of the resulting volume."""
    iop = ORIENTATIONS[orientation] if isinstance(orientation, str) else tuple(orientation)
    row_cos, col_cos = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row_cos, col_cos)
    origin_v = np.array(origin, dtype=float)
    positions = [origin_v + k * slice_spacing * normal for k in range(n_slices)]
    lps = np.eye(4)
    lps[:3, 0] = row_cos * pixel_spacing[1]
    lps[:3, 1] = col_cos * pixel_spacing[0]
    lps[:3, 2] = normal * slice_spacing
    lps[:3, 3] = origin_v
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return iop, positions, affine


def write_series(
    folder: Path,
    *,
    n_slices: int = 16,
    rows: int = 32,
    cols: int = 32,
    orientation: str | tuple[float, ...] = "axial",
    pixel_spacing: tuple[float, float] = (0.9, 0.8),
    slice_spacing: float = 2.5,
    origin: tuple[float, float, float] = (-12.5, -14.0, 30.0),
    slope: float = 1.0,
    intercept: float = 0.0,
    modality: str = "MR",
    seed: int = 0,
    shuffle_names: bool = True,
    name_style: str = "plain",
    instance_numbers: bool = True,
    positions: bool = True,
    series_uid: str | None = None,
    omit: tuple[int, ...] = (),
    transfer_syntax: str = ExplicitVRLittleEndian,
    smooth: bool = False,
) -> SeriesTruth:
    """Write one single-frame series into ``folder``; return the ground truth of the full series.

    ``omit`` leaves slices out (to make a gap), ``shuffle_names`` gives files names unrelated to the
    slice order, and ``name_style`` picks "plain" (no extension), "dcm" or "IMA" file names.
    ``smooth`` makes a slowly varying image (for lossy-free compression tests it does not matter).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    iop, pos_list, affine = geometry(orientation, n_slices, pixel_spacing, slice_spacing, origin)
    if smooth:
        ii, jj, kk = np.meshgrid(np.arange(cols), np.arange(rows), np.arange(n_slices), indexing="ij")
        raw = (ii * 7 + jj * 3 + kk * 11).astype(np.int16)
    else:
        raw = rng.integers(-1000, 3000, size=(cols, rows, n_slices), dtype=np.int16)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    frame_uid = generate_uid()
    order = list(range(n_slices))
    names = [f"{k:04d}" for k in order]
    if shuffle_names:
        random.Random(seed).shuffle(names)
    suffix = {"plain": "", "dcm": ".dcm", "IMA": ".IMA"}[name_style]
    files: list[Path] = []
    for k in order:
        if k in omit:
            continue
        sop_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = _file_meta(MRImageStorage, sop_uid, transfer_syntax)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        _identity(ds, modality)
        ds.SeriesDescription = "fixture series"
        ds.SeriesNumber = 3
        if instance_numbers:
            ds.InstanceNumber = k + 1
        if positions:
            ds.ImagePositionPatient = _fmt(pos_list[k])
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
        ds.PixelSpacing = _fmt(pixel_spacing)
        ds.SliceThickness = f"{slice_spacing:.6f}"
        if slope != 1.0 or intercept != 0.0:
            ds.RescaleSlope = f"{slope:g}"
            ds.RescaleIntercept = f"{intercept:g}"
        _pixel_module(ds, rows, cols)
        # The stored frame is (rows, cols); our volumes index (column, row).
        ds.PixelData = np.ascontiguousarray(raw[:, :, k].T).astype("<i2").tobytes()
        path = folder / f"{names[k]}{suffix}"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    values = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return SeriesTruth(
        folder,
        files,
        values,
        affine,
        series_uid,
        [tuple(float(x) for x in p) for p in pos_list],
    )


def write_enhanced_mr(
    path: Path,
    *,
    n_frames: int = 12,
    rows: int = 24,
    cols: int = 32,
    orientation: str | tuple[float, ...] = "axial",
    pixel_spacing: tuple[float, float] = (1.1, 0.7),
    slice_spacing: float = 3.0,
    origin: tuple[float, float, float] = (-20.0, 5.0, -12.0),
    slope: float = 2.0,
    intercept: float = -100.0,
    seed: int = 3,
    shuffle_frames: bool = True,
) -> SeriesTruth:
    """Write an Enhanced MR multi-frame file whose frames are stored out of spatial order.

    Positions live in each frame's PlanePositionSequence; orientation, pixel measures and the rescale
    live in the SharedFunctionalGroupsSequence, as scanners write them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    iop, pos_list, affine = geometry(orientation, n_frames, pixel_spacing, slice_spacing, origin)
    raw = rng.integers(0, 4000, size=(cols, rows, n_frames), dtype=np.int16)
    frame_order = list(range(n_frames))
    if shuffle_frames:
        random.Random(seed).shuffle(frame_order)
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(ENHANCED_MR_STORAGE, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID = ENHANCED_MR_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    _identity(ds, "MR")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = 1
    ds.ContentDate = "20240117"
    ds.ContentTime = "101010"
    ds.AcquisitionDateTime = "20240117101010"
    ds.SeriesNumber = 5
    ds.NumberOfFrames = n_frames
    _pixel_module(ds, rows, cols)

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = _fmt(pixel_spacing)
    measures.SliceThickness = f"{slice_spacing:.6f}"
    shared.PixelMeasuresSequence = Sequence([measures])
    plane_orient = Dataset()
    plane_orient.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
    shared.PlaneOrientationSequence = Sequence([plane_orient])
    transform = Dataset()
    transform.RescaleSlope = f"{slope:g}"
    transform.RescaleIntercept = f"{intercept:g}"
    transform.RescaleType = "US"
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    dim_uid = generate_uid()
    dim_index = Dataset()
    dim_index.DimensionOrganizationUID = dim_uid
    dim_index.DimensionIndexPointer = 0x00209057  # In-Stack Position Number
    dim_index.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
    ds.DimensionOrganizationSequence = Sequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dim_uid
    ds.DimensionIndexSequence = Sequence([dim_index])

    per_frame = []
    frames = []
    for stack_pos in frame_order:
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = _fmt(pos_list[stack_pos])
        item.PlanePositionSequence = Sequence([position])
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = stack_pos + 1
        content.DimensionIndexValues = [stack_pos + 1]
        item.FrameContentSequence = Sequence([content])
        per_frame.append(item)
        frames.append(np.ascontiguousarray(raw[:, :, stack_pos].T).astype("<i2"))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)
    values = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return SeriesTruth(path.parent, [path], values, affine, ds.SeriesInstanceUID)


def write_text_sr(path: Path) -> None:
    """A minimal Basic Text SR: a non-image object the scan must count and skip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(BASIC_TEXT_SR_STORAGE, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    _identity(ds, "SR")
    ds.ValueType = "CONTAINER"
    ds.save_as(path, enforce_file_format=True)


def corrupt_copy(src: Path, dst: Path, keep_fraction: float = 0.5) -> None:
    """Write the first part of ``src`` to ``dst``: a DICOM file truncated inside its pixel data."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep_fraction)])


def read_back(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)
