"""What every command group shares: the --config option, loading the config and opening its
database with the exit codes the commands document, the CLI's audit actor, and small printers.

Exit codes across `fedsite`: 0 success, 1 a verification failure or a refused operation,
2 a config, database or input that cannot be used.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import typer

from agent.config import AgentConfig, load_config
from agent.db.engine import Database, open_database, sqlite_file
from agent.errors import ConfigError, DatabaseOpenError

# No environment fallback: every FEDSITE_* variable is read as a config override.
ConfigOption = typer.Option(..., "--config", "-c", help="Path to the agent's config.yaml.")


def fail(message: str, code: int) -> NoReturn:
    """Print MESSAGE on standard error and exit with CODE."""
    typer.echo(message, err=True)
    raise typer.Exit(code)


def cli_actor() -> str:
    """The audit log's actor for a command run by the local OS user: `cli:<user>`."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        user = f"uid{os.getuid()}"
    return f"cli:{user}"


def load(config: Path) -> AgentConfig:
    """CONFIG loaded without checking dataset folders, or exit 2 naming the problem.

    Dataset folders are irrelevant to the admin commands (a missing one must not lock an admin
    out of revoking a token), and the catalog scan reports a missing one itself, per dataset.
    """
    try:
        return load_config(config, check_paths=False)
    except ConfigError as exc:
        fail(str(exc), 2)


@contextmanager
def database(cfg: AgentConfig, *, must_exist: bool = False) -> Iterator[Database]:
    """CFG's database (migrated if needed), disposed on exit; exit 2 when it cannot be opened.
    MUST_EXIST refuses a missing SQLite file instead of creating an empty one."""
    if must_exist:
        path = sqlite_file(cfg.db_url)
        if path is not None and not path.exists():
            # Opening would create an empty log that then "verifies": a typo in the config
            # must not look like a clean audit.
            fail(f"error: the audit database {path} does not exist (database_url in {cfg.source})", 2)
    try:
        db = open_database(cfg.db_url)
    except DatabaseOpenError as exc:
        fail(str(exc), 2)
    try:
        yield db
    finally:
        db.dispose()


def when(moment: datetime | None) -> str:
    """A timestamp as printed in tables: ISO 8601 to the second, or '-'."""
    return moment.isoformat(timespec="seconds") if moment is not None else "-"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Plain left-aligned columns (greppable, no box drawing)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for line in [header, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
