"""(being written)"""

import typer

inspect_app = typer.Typer()
