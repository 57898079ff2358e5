"""`fedsite config check`: validate an agent config the way `fedsite serve` reads it, then show
`fedsite doctor`'s checks, so that a config that parses but leaves the agent nothing to train on
(data its uid cannot read, an empty folder, TLS files that do not fit) is not called OK alone."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from agent.cli.common import fail
from agent.cli.doctor import AsUidOption, HostOption, print_report
from agent.config import load_config
from agent.doctor import run_doctor
from agent.errors import ConfigError

config_app = typer.Typer(help="Check the agent's configuration.", no_args_is_help=True)


@config_app.command("check")
def config_check(
    config: Path = typer.Argument(..., help="Path to the agent's config.yaml."),
    json_out: bool = typer.Option(False, "--json", help="Print the resolved config as JSON."),
    doctor: bool = typer.Option(True, "--doctor/--no-doctor", help="Run `fedsite doctor`'s checks too."),
    as_uid: int | None = AsUidOption,
    host: list[str] = HostOption,
) -> None:
    """Validate CONFIG: unknown keys, wrong types and missing paths are named with their key; then
    the doctor's checks, one line each (exit 1 when one fails)."""
    try:
        # Unlike the admin commands, dataset folders are checked: serve needs them.
        cfg = load_config(config)
    except ConfigError as exc:
        fail(str(exc), 2)
    if json_out:
        # The resolved config only: scripts parse it (run `fedsite doctor --json` for the checks).
        typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return
    typer.echo(f"{config}: OK (site {cfg.site.id}, {len(cfg.datasets)} dataset(s), database {cfg.db_url})")
    if not doctor:
        return
    report = run_doctor(cfg, as_uid=as_uid, hosts=host)
    print_report(report)
    if not report.ok:
        raise typer.Exit(1)
