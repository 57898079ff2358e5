"""(being written)"""

import typer

audit_app = typer.Typer()
plans_app = typer.Typer()
tokens_app = typer.Typer()
