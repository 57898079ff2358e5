"""(being written)"""

import typer

certs_app = typer.Typer()
