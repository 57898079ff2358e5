"""(being written)"""

import typer

coordinator_app = typer.Typer()
