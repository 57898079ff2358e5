"""The `fedsite` command line, assembled here from one module per command group.

Every group lives in `agent.cli.<group>` (init, config, doctor, data, demo, tokens, plans, admin_users,
audit, serve, certs, coordinate, relay, flower, secagg) and calls library code elsewhere in the agent;
shared helpers are in `agent.cli.common`. No module outside this package imports Typer. The order below
is the order `fedsite --help` lists the commands in.
"""

from __future__ import annotations

import typer

from agent import __version__
from agent.cli.admin_users import admin_users_app
from agent.cli.audit import audit_app
from agent.cli.certs import certs_app
from agent.cli.config import config_app
from agent.cli.coordinate import coordinate_app
from agent.cli.data import data_app
from agent.cli.demo import demo_app, demo_data_app
from agent.cli.doctor import doctor_app
from agent.cli.flower import flower_app
from agent.cli.init import init_app
from agent.cli.plans import plans_app
from agent.cli.privacy import privacy_app
from agent.cli.relay import relay_app
from agent.cli.secagg import secagg_app
from agent.cli.serve import serve_app
from agent.cli.tokens import tokens_app

app = typer.Typer(
    name="fedsite",
    help="fedsite: federated-learning site agent for hospital imaging data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the agent's version."""
    typer.echo(__version__)


app.add_typer(init_app)
app.add_typer(config_app, name="config")
app.add_typer(doctor_app)
app.add_typer(data_app, name="data")
app.add_typer(demo_data_app)
app.add_typer(tokens_app, name="tokens")
app.add_typer(plans_app, name="plans")
app.add_typer(admin_users_app, name="admin-users")
app.add_typer(audit_app, name="audit")
app.add_typer(privacy_app, name="privacy")
app.add_typer(serve_app)
app.add_typer(certs_app, name="certs")
app.add_typer(coordinate_app)
app.add_typer(relay_app, name="relay")
app.add_typer(flower_app, name="flower")
app.add_typer(secagg_app, name="secagg")
app.add_typer(demo_app)


def main() -> None:
    """The `fedsite` console script (pyproject's entry point `agent.cli:main`)."""
    app()
