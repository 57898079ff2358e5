"""`fedsite data scan` and `fedsite data list`: build and show the dataset catalog.

These are local admin tools: they may show local paths and the names of skipped subject
folders, which the API never does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from agent.config import AgentConfig, ConfigError, load_config
from agent.data.catalog import CatalogError, dataset_summaries, item_details, scan_datasets
from agent.db.engine import Database, DatabaseError, open_database

catalog_app = typer.Typer()

ConfigOption = typer.Option(..., "--config", "-c", help="Path to the agent's config.yaml.")


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _load(config: Path) -> AgentConfig:
    try:
        # A missing dataset folder is reported by the scan itself, per dataset.
        return load_config(config, check_paths=False)
    except ConfigError as exc:
        _fail(str(exc), 2)


def _open(cfg: AgentConfig) -> Database:
    try:
        return open_database(cfg.db_url)
    except DatabaseError as exc:
        _fail(str(exc), 2)


def _range(lo: list[Any] | None, hi: list[Any] | None, fmt: str) -> str:
    if lo is None or hi is None:
        return "-"
    a = "x".join(format(v, fmt) for v in lo)
    b = "x".join(format(v, fmt) for v in hi)
    return a if a == b else f"{a} .. {b}"


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
        "shape",
        "spacing (mm)",
        "label",
    ):
        table.add_column(col)
    for s in dataset_summaries(db):
        table.add_row(
            s.name,
            s.format,
            ",".join(s.modalities),
            str(s.num_subjects),
            str(s.num_train),
            str(s.num_val),
            str(s.num_skipped),
            _range(s.shape_min, s.shape_max, "d"),
            _range(s.spacing_min, s.spacing_max, ".3g"),
            f"{s.mean_label_fraction:.4f}" if s.mean_label_fraction is not None else "-",
        )
    return table


@catalog_app.command("scan")
def scan(
    config: Path = ConfigOption,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Index every dataset of CONFIG into the catalog (incremental: unchanged files are not read)."""
    from agent.audit.chain import AuditLog
    from agent.audit.cli import cli_actor

    cfg = _load(config)
    db = _open(cfg)
    console = Console()
    err = Console(stderr=True)
    try:
        report = scan_datasets(cfg, db, progress=progress, audit=AuditLog(db), actor=cli_actor(), console=err)
        console.print(_summary_table(db))
    except CatalogError as exc:
        _fail(str(exc), 2)
    finally:
        db.dispose()
    for d in report.datasets:
        if d.error is not None:
            continue
        console.print(
            f"{d.name}: {d.items_added} added, {d.items_removed} removed, "
            f"{d.files_hashed} file(s) hashed, {d.files_unchanged} unchanged, "
            f"{d.volumes_read} volume(s) read, {d.volumes_reused} reused"
        )
    for sk in report.skipped:
        console.print(f"[yellow]skipped[/] {sk.dataset}/{sk.subject}: {sk.reason}", highlight=False)
    for name in report.removed_datasets:
        console.print(f"removed dataset {name} (no longer in the config)")
    failed = [d for d in report.datasets if d.error is not None]
    for d in failed:
        err.print(f"[red]error[/] {d.name}: {d.error} (its catalog entries were kept)", highlight=False)
    if failed:
        raise typer.Exit(1)


@catalog_app.command("list")
def list_(
    config: Path = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print the catalog as JSON (for scripts)."),
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Only this dataset."),
) -> None:
    """Print the catalog: each dataset's statistics and items (key, split, shape, spacing, label).

    Local paths are shown too: this is the site admin's view, never sent anywhere.
    """
    cfg = _load(config)
    db = _open(cfg)
    try:
        summaries = [s for s in dataset_summaries(db) if dataset is None or s.name == dataset]
        if dataset is not None and not summaries:
            _fail(f"dataset {dataset!r} is not in the catalog; run `fedsite data scan --config {config}`", 1)
        items = {s.name: item_details(db, s.name) for s in summaries}
    except CatalogError as exc:
        _fail(str(exc), 2)
    finally:
        db.dispose()
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
        console.print(f"the catalog is empty; run `fedsite data scan --config {config}`")
        return
    for s in summaries:
        table = Table(
            title=f"{s.name} ({s.format}, {', '.join(s.modalities)}): {s.num_train} train, {s.num_val} val, "
            f"scanned {s.scanned_at.isoformat(timespec='seconds')}"
        )
        for col in ("subject key", "split", "shape", "spacing (mm)", "label", "images"):
            table.add_column(col, overflow="fold")
        for it in items[s.name]:
            table.add_row(
                it["subject_key"],
                it["split"],
                "x".join(str(v) for v in it["shape"]),
                "x".join(format(v, ".3g") for v in it["spacing"]),
                f"{it['label_fraction']:.4f}" if it["label_fraction"] is not None else "-",
                "\n".join(f"{m}: {p}" for m, p in it["images"].items()),
            )
        console.print(table)
