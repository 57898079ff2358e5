"""(being written)"""

import typer

catalog_app = typer.Typer()
