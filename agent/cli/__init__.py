"""The `fedsite` command line: one root app that gathers each area's commands.

Each area keeps its commands next to its code; this module only assembles them, so that
`fedsite --help` shows the whole tool.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from agent import __version__
from agent.config import ConfigError, load_config

app = typer.Typer(
    name="fedsite",
    help="fedsite: federated-learning site agent for hospital imaging data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Check the agent's configuration.", no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the agent's version."""
    typer.echo(__version__)


@config_app.command("check")
def config_check(
    config: Path = typer.Argument(..., help="Path to the agent's config.yaml."),
    json_out: bool = typer.Option(False, "--json", help="Print the resolved config as JSON."),
) -> None:
    """Validate CONFIG: unknown keys, wrong types and missing paths are named with their key."""
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if json_out:
        typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return
    typer.echo(f"{config}: OK (site {cfg.site.id}, {len(cfg.datasets)} dataset(s), database {cfg.db_url})")


def _assemble() -> None:
    # Imported here so that each area's module is loaded once, when the CLI starts.
    from agent.audit.cli import audit_app, plans_app, tokens_app
    from agent.cli.certs import certs_app
    from agent.cli.serve import serve_app
    from agent.data.cli import data_app
    from agent.data.demo_data import demo_data_app
    from coordinator.cli import coordinator_app

    app.add_typer(config_app, name="config")
    app.add_typer(data_app, name="data")
    app.add_typer(demo_data_app)
    app.add_typer(tokens_app, name="tokens")
    app.add_typer(plans_app, name="plans")
    app.add_typer(audit_app, name="audit")
    app.add_typer(serve_app)
    app.add_typer(certs_app, name="certs")
    app.add_typer(coordinator_app)


_assemble()


def main() -> None:
    app()
