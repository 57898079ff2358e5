"""(being written)"""

import typer

serve_app = typer.Typer()
