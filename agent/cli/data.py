"""`fedsite data ...`: the dataset catalog (scan, list) and the bare-folder tools (inspect, convert).

These are local admin tools: they may show local paths and the names of skipped subject
folders, which the API never does. `inspect` and `convert` need no config: they show what the
agent sees in a folder (`agent.data.inspect`), so that an administrator can compare it with
the PACS. Neither prints DICOM header values (patient name or ID, dates, institution, series
description): only geometry, modality, counts, warnings and local paths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.cli.common import ConfigOption, cli_actor, database, fail, load
from agent.data.catalog import dataset_summaries, item_details, scan_datasets
from agent.data.inspect import FolderView, convert_volume, read_folder, source_folder, volume_summary
from agent.db.engine import Database
from agent.errors import CatalogError, DicomError, VolumeError

data_app = typer.Typer(help="Local datasets: scan, list, inspect, convert.", no_args_is_help=True)


def _range(lo: list[Any] | None, hi: list[Any] | None, fmt: str) -> str:
    if lo is None or hi is None:
        return "-"
    a = "x".join(format(v, fmt) for v in lo)
    b = "x".join(format(v, fmt) for v in hi)
    return a if a == b else f"{a} .. {b}"


def _row(table: Table, *cells: str) -> None:
    """One table row of values: rich reads a str cell as markup, and a folder or file named
    like a tag ("[anon]") would be shown without it, or stop the command."""
    table.add_row(*(escape(c) for c in cells))


def _summary_table(db: Database) -> Table:
    table = Table(title="datasets")
    for col in (
        "dataset",
        "format",
        "modalities",
        "subjects",
        "train",
        "val",
        "skipped",
        "excluded",
        "shape",
        "spacing (mm)",
        "label",
    ):
        table.add_column(col)
    for s in dataset_summaries(db):
        _row(
            table,
            s.name,
            s.format,
            ",".join(s.modalities),
            str(s.num_subjects),
            str(s.num_train),
            str(s.num_val),
            str(s.num_skipped),
            str(s.num_excluded),
            _range(s.shape_min, s.shape_max, "d"),
            _range(s.spacing_min, s.spacing_max, ".3g"),
            f"{s.mean_label_fraction:.4f}" if s.mean_label_fraction is not None else "-",
        )
    return table


def _warning_text(entry: dict[str, str]) -> str:
    """One stored warning as `[category] source: message` (source: the modality or "label"); plain
    text, which rich reads as markup unless escaped where it is printed."""
    return f"[{entry['category']}] {entry['source']}: {entry['message']}"


@data_app.command("scan")
def scan(
    config: Path = ConfigOption,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    allow_shrink: bool = typer.Option(
        False,
        "--allow-shrink",
        help="Accept a scan that drops more than half of a dataset's subjects (else its catalog is kept).",
    ),
) -> None:
    """Index every dataset of CONFIG into the catalog (incremental: unchanged files are not read)."""
    from agent.audit.chain import AuditLog

    cfg = load(config)
    # One line per skipped or warned subject, never wrapped: a script (or grep) reads them by line.
    console = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)
    with database(cfg) as db:
        try:
            report = scan_datasets(
                cfg,
                db,
                progress=progress,
                audit=AuditLog(db),
                actor=cli_actor(),
                console=err,
                allow_shrink=allow_shrink,
            )
            console.print(_summary_table(db))
        except CatalogError as exc:
            fail(str(exc), 2)
    for d in report.datasets:
        if d.error is not None:
            continue
        console.print(
            f"{d.name}: {d.items_added} added, {d.items_removed} removed, "
            f"{d.files_hashed} file(s) hashed, {d.files_unchanged} unchanged, "
            f"{d.volumes_read} volume(s) read, {d.volumes_reused} reused"
        )
    for sk in report.skipped:
        console.print(
            f"[yellow]skipped[/] {escape(sk.dataset)}/{escape(sk.subject)}: {escape(sk.reason)}",
            highlight=False,
        )
    for w in report.warned:
        verdict = "[red]excluded[/]" if w.excluded else "[yellow]warning[/]"
        for entry in w.warnings:
            console.print(
                f"{verdict} {escape(w.dataset)}/{escape(w.subject)} {escape(_warning_text(entry))}",
                highlight=False,
            )
    if any(w.excluded for w in report.warned):
        console.print(
            "excluded subjects stay in the catalog but are never trained or evaluated on "
            "(the dataset's exclude_warnings in the config)"
        )
    for name in report.removed_datasets:
        console.print(f"removed dataset {name} (no longer in the config)", markup=False)
    failed = [d for d in report.datasets if d.error is not None]
    for d in failed:
        err.print(
            f"[red]error[/] {escape(d.name)}: {escape(str(d.error))} (its catalog entries were kept)",
            highlight=False,
        )
    if failed:
        raise typer.Exit(1)


@data_app.command("list")
def list_(
    config: Path = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print the catalog as JSON (for scripts)."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Only this dataset."),
) -> None:
    """Print the catalog: each dataset's statistics and items (key, split, shape, spacing, label).

    Local paths are shown too: this is the site admin's view, never sent anywhere.
    """
    cfg = load(config)
    with database(cfg) as db:
        try:
            summaries = [s for s in dataset_summaries(db) if dataset is None or s.name == dataset]
            if dataset is not None and not summaries:
                fail(
                    f"dataset {dataset!r} is not in the catalog; run `fedsite data scan --config {config}`", 1
                )
            items = {s.name: item_details(db, s.name) for s in summaries}
        except CatalogError as exc:
            fail(str(exc), 2)
    if json_out:
        out = {
            "datasets": [
                {
                    "name": s.name,
                    "format": s.format,
                    "modalities": s.modalities,
                    "num_subjects": s.num_subjects,
                    "num_items": s.num_items,
                    "num_train": s.num_train,
                    "num_val": s.num_val,
                    "num_skipped": s.num_skipped,
                    "num_excluded": s.num_excluded,
                    "shape_min": s.shape_min,
                    "shape_max": s.shape_max,
                    "spacing_min": s.spacing_min,
                    "spacing_max": s.spacing_max,
                    "mean_label_fraction": s.mean_label_fraction,
                    "scanned_at": s.scanned_at.isoformat(timespec="seconds"),
                    "items": items[s.name],
                }
                for s in summaries
            ]
        }
        typer.echo(json.dumps(out, indent=2))
        return
    console = Console()
    if not summaries:
        console.print(f"the catalog is empty; run `fedsite data scan --config {config}`", markup=False)
        return
    for s in summaries:
        table = Table(
            title=f"{s.name} ({s.format}, {', '.join(s.modalities)}): {s.num_train} train, {s.num_val} val, "
            f"{s.num_excluded} excluded, scanned {s.scanned_at.isoformat(timespec='seconds')}"
        )
        for col in ("subject key", "split", "shape", "spacing (mm)", "label", "images", "warnings"):
            table.add_column(col, overflow="fold")
        for it in items[s.name]:
            _row(
                table,
                it["subject_key"],
                it["split"],
                "x".join(str(v) for v in it["shape"]),
                "x".join(format(v, ".3g") for v in it["spacing"]),
                f"{it['label_fraction']:.4f}" if it["label_fraction"] is not None else "-",
                "\n".join(f"{m}: {p}" for m, p in it["images"].items()),
                "\n".join(_warning_text(w) for w in it["warnings"]) or "-",
            )
        console.print(table)


# -- bare folders: no config, no catalog -------------------------------------------------------


def _fail(message: str, code: int, *, json_out: bool, payload: dict[str, Any] | None = None) -> NoReturn:
    """Exit with CODE; with --json, first print the reason (and what is known) as JSON on stdout.

    A script that asked for JSON reads standard output only: an error that reached standard error
    alone would leave it with an empty document and no reason.
    """
    if json_out:
        typer.echo(json.dumps({"error": message, **(payload or {})}, indent=2))
    fail(f"error: {message}", code)


def _skipped_json(view: FolderView) -> list[dict[str, str]]:
    return [{"path": str(s.path), "reason": s.reason} for s in view.skipped]


def _read_or_exit(path: Path, workers: int | None, *, json_out: bool = False) -> FolderView:
    if not path.exists():
        _fail(f"{path}: no such file or folder", 2, json_out=json_out)
    try:
        return read_folder(path, workers=workers)
    except (DicomError, OSError) as exc:
        _fail(str(exc), 2, json_out=json_out)


def _fmt_tuple(values: list[Any]) -> str:
    return " x ".join(str(v) for v in values)


def _print_tables(view: FolderView, path: Path) -> None:
    console = Console()
    # The folder as a line of its own, not the table's title, which would wrap it at the table's width.
    console.print(f"Volumes in {path}", markup=False, soft_wrap=True)
    table = Table()
    for column in ("#", "source", "modality", "shape", "spacing (mm)", "orient.", "files", "warnings"):
        table.add_column(column, overflow="fold")
    for index, volume in enumerate(view.volumes):
        info = volume_summary(index, volume)
        _row(
            table,
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
            _row(skipped, str(entry.path), entry.reason)
        console.print(skipped)
    if view.non_image:
        listing = ", ".join(f"{name}: {count}" for name, count in view.non_image.items())
        console.print(f"Non-image DICOM objects skipped: {listing}", markup=False)
    console.print(
        f"{view.files_seen} file(s) read: {len(view.volumes)} volume(s), {len(view.skipped)} skipped, "
        f"{sum(view.non_image.values())} non-image object(s)."
    )


@data_app.command("inspect")
def inspect_command(
    path: Path = typer.Argument(..., help="Folder (or single file) to look at."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON for scripts instead of tables."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Reader processes (default: CPUs)."),
) -> None:
    """Show the volumes the agent assembles from PATH (DICOM series, NIfTI files) and what it skipped."""
    view = _read_or_exit(path, workers, json_out=json_out)
    if json_out:
        payload = {
            "volumes": [volume_summary(i, v) for i, v in enumerate(view.volumes)],
            "skipped": _skipped_json(view),
            "non_image": view.non_image,
            "files_seen": view.files_seen,
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    _print_tables(view, path)


@data_app.command("convert")
def convert_command(
    path: Path = typer.Argument(..., help="Folder (or single file) to convert."),
    outdir: Path = typer.Argument(..., help="Folder that receives one NIfTI file per volume."),
    json_out: bool = typer.Option(False, "--json", help="Print the source-to-file mapping as JSON."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Reader processes (default: CPUs)."),
) -> None:
    """Write every volume found under PATH as NIfTI into OUTDIR, exactly as the agent sees it."""
    if outdir.exists() and not outdir.is_dir():
        _fail(f"{outdir}: exists and is not a folder", 2, json_out=json_out)
    view = _read_or_exit(path, workers, json_out=json_out)
    found = {
        "written": [],
        "failed": [],
        "skipped": _skipped_json(view),
        "non_image": view.non_image,
        "files_seen": view.files_seen,
    }
    if not view.volumes:
        # The skipped files and their reasons are the answer to "why was nothing converted?".
        _fail(
            f"no volume found under {path} ({view.files_seen} file(s) read, "
            f"{len(view.skipped)} skipped); nothing written",
            1,
            json_out=json_out,
            payload=found,
        )
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"{outdir}: cannot be created ({exc.strerror or exc})", 2, json_out=json_out, payload=found)
    written: list[dict[str, Any]] = []
    # A volume that cannot be written is reported and the others still are: an administrator
    # converting a folder wants every volume that can be converted, and a list of the rest.
    failed: list[dict[str, Any]] = []
    for index, volume in enumerate(view.volumes):
        try:
            entry = convert_volume(index, volume, outdir)
        except VolumeError as exc:
            failed.append({"index": index, "from": str(source_folder(volume)), "error": str(exc)})
            if not json_out:
                typer.echo(f"error: {exc}", err=True)
            continue
        written.append(entry)
        if not json_out:
            typer.echo(f"{entry['from']} ({entry['files']} file(s), {volume.source}) -> {entry['output']}")
            for warning in volume.warnings:
                typer.echo(f"    warning: {warning}")
    if json_out:
        payload = {**found, "written": written, "failed": failed}
        typer.echo(json.dumps(payload, indent=2))
    elif view.skipped:
        typer.echo(f"{len(view.skipped)} file(s) skipped:")
        for entry_skipped in view.skipped:
            typer.echo(f"    {entry_skipped}")
    if failed:
        raise typer.Exit(2)
