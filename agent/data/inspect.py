"""`fedsite data inspect` and `fedsite data convert`: what the agent sees in a bare folder, no config needed.

``inspect`` lists every volume the agent would assemble from a folder (DICOM series and NIfTI files) and
every file it skipped, with the reason. ``convert`` writes those volumes as NIfTI files, so that an
administrator can open the agent's exact view of the data in a viewer and compare it with the PACS.

Neither command prints DICOM header values (patient name or ID, dates, institution, series description):
only geometry, modality, counts, warnings and local paths.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from agent.data.dicom import DicomError, DicomScan, Skipped, scan_dicom_folder
from agent.data.volume import Volume, VolumeError, read_nifti_volume, write_nifti

inspect_app = typer.Typer()


@dataclass
class FolderView:
    """Everything found under one path: volumes from DICOM and NIfTI, skipped files, non-image counts."""

    volumes: list[Volume]
    skipped: list[Skipped]
    non_image: dict[str, int]
    files_seen: int


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_folder(path: Path, *, workers: int | None = None) -> FolderView:
    """Scan ``path`` for DICOM series, then read the NIfTI files the DICOM scan passed over."""
    scan: DicomScan = scan_dicom_folder(path, workers=workers)
    volumes = list(scan.volumes)
    skipped: list[Skipped] = []
    for entry in scan.skipped:
        if not _is_nifti(entry.path):
            skipped.append(entry)
            continue
        try:
            volumes.append(read_nifti_volume(entry.path))
        except VolumeError as exc:
            reason = str(exc).removeprefix(f"{entry.path}: ")
            skipped.append(Skipped(entry.path, reason))
    volumes.sort(key=lambda v: str(v.files[0]))
    return FolderView(volumes, skipped, scan.non_image, scan.files_seen)


def _source_folder(volume: Volume) -> Path:
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


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _read_or_exit(path: Path, workers: int | None) -> FolderView:
    if not path.exists():
        raise _fail(f"{path}: no such file or folder")
    try:
        return read_folder(path, workers=workers)
    except (DicomError, OSError) as exc:
        raise _fail(str(exc)) from None


def _fmt_tuple(values: list[Any]) -> str:
    return " x ".join(str(v) for v in values)


def _print_tables(view: FolderView, path: Path) -> None:
    console = Console()
    table = Table(title=f"Volumes in {path}")
    for column in ("#", "source", "modality", "shape", "spacing (mm)", "orient.", "files", "warnings"):
        table.add_column(column, overflow="fold")
    for index, volume in enumerate(view.volumes):
        info = volume_summary(index, volume)
        table.add_row(
            str(index),
            info["source"],
            info["modality"] or "-",
            _fmt_tuple(info["shape"]),
            _fmt_tuple(info["spacing"]),
            info["orientation"],
            str(info["files"]),
            "\n".join(info["warnings"]) or "-",
        )
    console.print(table)
    if view.skipped:
        skipped = Table(title=f"Skipped files ({len(view.skipped)})")
        skipped.add_column("path", overflow="fold")
        skipped.add_column("reason", overflow="fold")
        for entry in view.skipped:
            skipped.add_row(str(entry.path), entry.reason)
        console.print(skipped)
    if view.non_image:
        listing = ", ".join(f"{name}: {count}" for name, count in view.non_image.items())
        console.print(f"Non-image DICOM objects skipped: {listing}")
    console.print(
        f"{view.files_seen} file(s) read: {len(view.volumes)} volume(s), {len(view.skipped)} skipped, "
        f"{sum(view.non_image.values())} non-image object(s)."
    )


@inspect_app.command("inspect")
def inspect_command(
    path: Path = typer.Argument(..., help="Folder (or single file) to look at."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON for scripts instead of tables."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Reader processes (default: CPUs)."),
) -> None:
    """Show the volumes the agent assembles from PATH (DICOM series, NIfTI files) and what it skipped."""
    view = _read_or_exit(path, workers)
    if json_out:
        payload = {
            "volumes": [volume_summary(i, v) for i, v in enumerate(view.volumes)],
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in view.skipped],
            "non_image": view.non_image,
            "files_seen": view.files_seen,
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    _print_tables(view, path)


def output_name(index: int, volume: Volume) -> str:
    """``<index>_<modality>.nii.gz``: built from the index and modality only, never from identity."""
    label = re.sub(r"[^A-Za-z0-9]+", "", volume.modality) or volume.source
    return f"{index:03d}_{label}.nii.gz"


@inspect_app.command("convert")
def convert_command(
    path: Path = typer.Argument(..., help="Folder (or single file) to convert."),
    outdir: Path = typer.Argument(..., help="Folder that receives one NIfTI file per volume."),
    json_out: bool = typer.Option(False, "--json", help="Print the source-to-file mapping as JSON."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Reader processes (default: CPUs)."),
) -> None:
    """Write every volume found under PATH as NIfTI into OUTDIR, exactly as the agent sees it."""
    if outdir.exists() and not outdir.is_dir():
        raise _fail(f"{outdir}: exists and is not a folder")
    view = _read_or_exit(path, workers)
    if not view.volumes:
        typer.echo(
            f"error: no volume found under {path} ({view.files_seen} file(s) read, "
            f"{len(view.skipped)} skipped); nothing written",
            err=True,
        )
        raise typer.Exit(1)
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[dict[str, Any]] = []
    for index, volume in enumerate(view.volumes):
        target = outdir / output_name(index, volume)
        try:
            write_nifti(volume, target)
        except (OSError, VolumeError) as exc:
            raise _fail(f"{target}: cannot be written ({exc})") from None
        entry = {
            "index": index,
            "source": volume.source,
            "from": str(_source_folder(volume)),
            "files": len(volume.files),
            "output": str(target),
            "shape": list(volume.shape),
            "warnings": list(volume.warnings),
        }
        written.append(entry)
        if not json_out:
            typer.echo(f"{entry['from']} ({entry['files']} file(s), {volume.source}) -> {target}")
            for warning in volume.warnings:
                typer.echo(f"    warning: {warning}")
    if json_out:
        payload = {
            "written": written,
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in view.skipped],
            "non_image": view.non_image,
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    if view.skipped:
        typer.echo(f"{len(view.skipped)} file(s) skipped:")
        for entry_skipped in view.skipped:
            typer.echo(f"    {entry_skipped}")
