"""`fedsite flower`: what the Flower side (integrations/flower) needs from the agent's environment.

The Flower ServerApp runs in its own environment without torch or the model registry, so the
model a run starts from is built here, from the plan's registry entry and seed, exactly as
`fedsite coordinate` builds it, and written as safetensors for the ServerApp's run config
(`initial-weights`).
"""

from __future__ import annotations

from pathlib import Path

import typer

from agent.cli.common import fail
from agent.cli.coordinate import load_plan
from agent.fileio import atomic_write_bytes

flower_app = typer.Typer(
    help="Helpers for running sites under Flower (integrations/flower).", no_args_is_help=True
)


@flower_app.command("initial-weights")
def initial_weights_command(
    plan: Path = typer.Option(..., "--plan", help="The fedsite plan (JSON) the Flower run will use."),
    out: Path = typer.Option(..., "--out", help="Where to write the initial model (safetensors)."),
) -> None:
    """Write the plan's initial model (its registry model, initialised with the plan's seed)."""
    from coordinator.weights import encode, initial_weights

    try:
        data = encode(initial_weights(load_plan(plan)))
    except ValueError as exc:  # load_plan's messages already name the file
        fail(f"error: {exc}", 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    typer.echo(str(out))
