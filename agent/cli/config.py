"""`fedsite config check`: validate an agent config the way `fedsite serve` reads it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from agent.cli.common import fail
from agent.config import load_config
from agent.errors import ConfigError

config_app = typer.Typer(help="Check the agent's configuration.", no_args_is_help=True)


@config_app.command("check")
def config_check(
    config: Path = typer.Argument(..., help="Path to the agent's config.yaml."),
    json_out: bool = typer.Option(False, "--json", help="Print the resolved config as JSON."),
) -> None:
    """Validate CONFIG: unknown keys, wrong types and missing paths are named with their key."""
    try:
        # Unlike the admin commands, dataset folders are checked: serve needs them.
        cfg = load_config(config)
    except ConfigError as exc:
        fail(str(exc), 2)
    if json_out:
        typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return
    typer.echo(f"{config}: OK (site {cfg.site.id}, {len(cfg.datasets)} dataset(s), database {cfg.db_url})")
