"""What the agent sees in a bare folder, no config needed (`fedsite data inspect` and `convert`).

`read_folder` assembles every volume the agent would read from a folder (DICOM series and NIfTI
files) and lists every file it skipped, with the reason. `convert_volume` writes such a volume
as NIfTI, so that an administrator can open the agent's exact view of the data in a viewer and
compare it with the PACS.

Nothing here exposes DICOM header values (patient name or ID, dates, institution, series
description): only geometry, modality, counts, warnings and local paths.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.data.dicom import DicomScan, Skipped, scan_dicom_folder
from agent.data.volume import (
    SUPPORTED_NIFTI,
    UNSUPPORTED_IMAGE_SUFFIXES,
    Volume,
    is_volume_file_name,
    pair_header,
    read_nifti_volume,
    write_nifti,
)
from agent.errors import VolumeError


@dataclass
class FolderView:
    """Everything found under one path: volumes from DICOM and NIfTI, skipped files, non-image counts."""

    volumes: list[Volume]
    skipped: list[Skipped]
    non_image: dict[str, int]
    files_seen: int


def read_folder(path: Path, *, workers: int | None = None) -> FolderView:
    """Scan ``path`` for DICOM series, then read the NIfTI files (and Analyze/NIfTI pairs, by their
    .hdr) the DICOM scan passed over; image files of formats not read say what is supported, rather
    than the DICOM reader's "not a DICOM file"."""
    scan: DicomScan = scan_dicom_folder(path, workers=workers)
    volumes = list(scan.volumes)
    skipped: list[Skipped] = []
    for entry in scan.skipped:
        header = pair_header(entry.path)
        if header is not None:
            if not header.is_file():
                skipped.append(
                    Skipped(
                        entry.path, f"voxel file of an Analyze/NIfTI pair without its header {header.name}"
                    )
                )
            continue  # read once, through its header
        if entry.path.name.lower().endswith(UNSUPPORTED_IMAGE_SUFFIXES):
            skipped.append(
                Skipped(entry.path, f"image format not supported (supported: DICOM, {SUPPORTED_NIFTI})")
            )
            continue
        if not is_volume_file_name(entry.path):
            skipped.append(entry)
            continue
        try:
            volumes.append(read_nifti_volume(entry.path))
        except VolumeError as exc:
            reason = str(exc).removeprefix(f"{entry.path}: ")
            skipped.append(Skipped(entry.path, reason))
    volumes.sort(key=lambda v: str(v.files[0]))
    return FolderView(volumes, skipped, scan.non_image, scan.files_seen)


def source_folder(volume: Volume) -> Path:
    """The file or the folder a volume was read from (the common folder of its files)."""
    if len(volume.files) == 1:
        return volume.files[0] if volume.source == "nifti" else volume.files[0].parent
    return Path(os.path.commonpath([str(p) for p in volume.files]))


def volume_summary(index: int, volume: Volume) -> dict[str, Any]:
    """The printable facts about a volume: geometry, counts and warnings, never header identity."""
    return {
        "index": index,
        "source": volume.source,
        "modality": volume.modality,
        "shape": list(volume.shape),
        "spacing": [round(s, 4) for s in volume.spacing],
        "num_slices": volume.shape[2],
        "orientation": volume.orientation,
        "files": len(volume.files),
        "warnings": list(volume.warnings),
    }


def output_name(index: int, volume: Volume) -> str:
    """``<index>_<modality>.nii.gz``: built from the index and modality only, never from identity."""
    label = re.sub(r"[^A-Za-z0-9]+", "", volume.modality) or volume.source
    return f"{index:03d}_{label}.nii.gz"


def convert_volume(index: int, volume: Volume, outdir: Path) -> dict[str, Any]:
    """Write VOLUME as OUTDIR/`output_name` and say what was written from where.

    Raises VolumeError naming the target when it cannot be written, whatever the cause: nibabel has
    its own exception types (a matrix it cannot decompose, a header it refuses), and the caller must
    be able to report one failed volume and go on with the others."""
    target = outdir / output_name(index, volume)
    try:
        write_nifti(volume, target)
    except Exception as exc:  # OSError, VolumeError and nibabel's own types alike
        raise VolumeError(f"{target}: cannot be written ({exc})") from None
    return {
        "index": index,
        "source": volume.source,
        "from": str(source_folder(volume)),
        "files": len(volume.files),
        "output": str(target),
        "shape": list(volume.shape),
        "warnings": list(volume.warnings),
    }
