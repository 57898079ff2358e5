"""A generated subject on disk: NIfTI files or DICOM series, plus the label map as NIfTI.

The same subject always gives the same bytes (fixed gzip header, UIDs and file names derived from
the seed), so tests and benchmarks can compare generated trees by hash.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from agent.data.synthetic.rendering import MODALITIES
from agent.data.synthetic.seeding import random_stream
from agent.data.synthetic.subjects import SyntheticSubject

# How a subject's images are written: one NIfTI file per modality, or one DICOM series per modality.
Format = Literal["nifti", "dicom"]

_SERIES: dict[str, dict[str, Any]] = {
    "flair": {"description": "AX T2 FLAIR", "sequence": "IR", "tr": 9000.0, "te": 120.0, "ti": 2500.0},
    "t1": {"description": "AX T1 SE", "sequence": "SE", "tr": 550.0, "te": 12.0, "ti": None},
    "t1gd": {"description": "AX T1 SE +C", "sequence": "SE", "tr": 550.0, "te": 12.0, "ti": None},
    "t2": {"description": "AX T2 TSE", "sequence": "SE", "tr": 4500.0, "te": 95.0, "ti": None},
}


def _gzip_bytes(data: bytes) -> bytes:
    # mtime=0 and no file name in the gzip header: the same input gives the same bytes.
    return gzip.compress(data, compresslevel=6, mtime=0)


def nifti_bytes(
    array: np.ndarray, affine: np.ndarray, *, slope: float = 1.0, intercept: float = 0.0
) -> bytes:
    """A gzipped NIfTI-1 file of ARRAY (stored dtype kept) with exactly this slope and intercept.

    nibabel recomputes scaling on save, so the two scl_ fields are written into the header bytes.
    """
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    raw = bytearray(img.to_bytes())
    endian = "<" if img.header.endianness == "<" else ">"
    struct.pack_into(f"{endian}ff", raw, 112, slope, intercept)
    return _gzip_bytes(bytes(raw))


def write_nifti_subject(subject: SyntheticSubject, folder: Path) -> list[Path]:
    """Write <folder>/<modality>.nii.gz per modality and <folder>/seg.nii.gz; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for modality, stored in subject.stored.items():
        path = folder / f"{modality}.nii.gz"
        data = nifti_bytes(
            stored, subject.affine, slope=subject.rescale_slope, intercept=subject.rescale_intercept
        )
        path.write_bytes(data)
        written.append(path)
    written.append(write_label(subject, folder))
    return written


def write_label(subject: SyntheticSubject, folder: Path) -> Path:
    """The label map as <folder>/seg.nii.gz on the image grid (uint8, values 0/1/2/4)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "seg.nii.gz"
    path.write_bytes(nifti_bytes(subject.label, subject.affine))
    return path


def _ds(value: float) -> str:
    """A DICOM decimal string of a value that has at most 4 decimals (exact, <= 16 characters)."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _uid(seed: int, *parts: object) -> UID:
    return generate_uid(entropy_srcs=["fedsite-synthetic", str(seed), *[str(p) for p in parts]])


def _file_names(rng: np.random.Generator, style: str, count: int) -> list[str]:
    names: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        n = int(rng.integers(16**8))
        name = {"hex": f"{n:08X}", "dcm": f"{n:08x}.dcm", "im": f"IM_{n % 10**6:06d}"}[style]
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def write_dicom_series(subject: SyntheticSubject, modality: str, folder: Path) -> list[Path]:
    """Write one MR series (one file per slice, shuffled random file names) into FOLDER."""
    profile = subject.profile
    geometry = subject.geometry
    ident = subject.identity
    stored = subject.stored[modality]
    seed = profile.seed
    key = (profile.index, subject.subject_index)
    study_uid = _uid(seed, *key, "study")
    series_uid = _uid(seed, *key, modality, "series")
    frame_uid = _uid(seed, *key, "frame")
    series = _SERIES[modality]
    real = subject.image(modality)
    lo, hi = np.percentile(
        real[real > profile.offset * 1.5] if np.any(real > profile.offset * 1.5) else real, [1, 99]
    )
    rng = random_stream(seed, profile.index, subject.subject_index, 0xD1 + MODALITIES.index(modality))
    names = _file_names(rng, profile.file_style, geometry.shape[2])
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for k in range(geometry.shape[2]):
        sop_uid = _uid(seed, *key, modality, "slice", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = folder / names[k]
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ident.study_date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ident.study_time
        ds.AccessionNumber = ident.accession
        ds.Modality = "MR"
        ds.Manufacturer = profile.manufacturer
        ds.InstitutionName = profile.institution
        ds.ReferringPhysicianName = "Referrer^Example"
        ds.StudyDescription = "MR BRAIN W/WO CONTRAST"
        ds.SeriesDescription = series["description"]
        ds.ManufacturerModelName = profile.model_name
        ds.PatientName = ident.name
        ds.PatientID = ident.patient_id
        ds.PatientBirthDate = ident.birth_date
        ds.PatientSex = ident.sex
        ds.BodyPartExamined = "BRAIN"
        ds.ScanningSequence = series["sequence"]
        ds.SequenceVariant = "SK"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = _ds(geometry.slice_thickness)
        ds.SpacingBetweenSlices = _ds(geometry.spacing[2])
        ds.RepetitionTime = _ds(series["tr"])
        ds.EchoTime = _ds(series["te"])
        if series["ti"] is not None:
            ds.InversionTime = _ds(series["ti"])
        ds.MagneticFieldStrength = _ds(profile.field_strength)
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = ident.accession[-6:]
        ds.SeriesNumber = 100 * (MODALITIES.index(modality) + 1) + 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        pos = geometry.position(k)
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(np.dot(pos, geometry.normal)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = geometry.shape[1]
        ds.Columns = geometry.shape[0]
        # PixelSpacing is (between rows, between columns) = (J spacing, I spacing).
        ds.PixelSpacing = [_ds(geometry.spacing[1]), _ds(geometry.spacing[0])]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.WindowCenter = _ds(round(float(lo + hi) / 2.0, 1))
        ds.WindowWidth = _ds(round(max(float(hi - lo), 1.0), 1))
        ds.RescaleIntercept = _ds(subject.rescale_intercept)
        ds.RescaleSlope = _ds(subject.rescale_slope)
        ds.RescaleType = "US"
        # Pixel data is row-major (rows, columns) = (J, I): the transpose of our (I, J) slice.
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_dicom_subject(subject: SyntheticSubject, folder: Path) -> list[Path]:
    """Write <folder>/<modality>/ DICOM series per modality and <folder>/seg.nii.gz."""
    written: list[Path] = []
    for modality in subject.stored:
        written.extend(write_dicom_series(subject, modality, folder / modality))
    written.append(write_label(subject, folder))
    return written
