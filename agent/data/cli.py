"""`fedsite data ...`: the catalog commands and the bare-folder admin tools."""

from __future__ import annotations

import typer

from agent.data.catalog_cli import catalog_app
from agent.data.inspect import inspect_app

data_app = typer.Typer(help="Local datasets: scan, list, inspect, convert.", no_args_is_help=True)
data_app.add_typer(catalog_app)
data_app.add_typer(inspect_app)
