"""(being written)"""

import typer

demo_data_app = typer.Typer()
