"""`fedsite coordinate`: train a model across a federation's agents with the reference coordinator.

The coordinator package does the work (`coordinator.runner.run_strategy`); this module reads
the federation and plan files, maps the options onto `RunOptions` and prints the summary.
When the federation has pull sites (or `--serve` is given) the relay they connect to is served
in this process for the duration of the run, on `--serve HOST:PORT` or the file's `relay.listen`;
with `--no-serve` a relay that `fedsite relay serve` runs elsewhere on the same database does.
Exit codes: 0 done, 1 a round or an agent failed (partial results are kept), 2 unusable input,
130 interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape

from coordinator.errors import AgentError, FederationError, RoundFailed, RunError
from coordinator.federation import Federation, load_federation, split_listen
from coordinator.options import RunOptions
from coordinator.report import Reporter, print_outputs, print_text
from coordinator.runner import run_strategy
from coordinator.strategies import STRATEGIES

if TYPE_CHECKING:
    from coordinator.relay.server import RelayServer

coordinate_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def load_plan(path: Path) -> dict[str, Any]:
    """Read and validate a plan file with the agents' own plan rules; errors name the file and key."""
    from agent.errors import PlanError
    from agent.training.plan import parse_plan

    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the plan: {exc}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    try:
        parse_plan(raw)
    except PlanError as exc:
        raise ValueError("\n".join(f"{path}: {line}" for line in str(exc).splitlines())) from None
    assert isinstance(raw, dict)
    return raw


@coordinate_app.command("coordinate")
def coordinate(
    federation: Path = typer.Option(..., "--federation", help="Federation file (agents, tokens, min_sites)."),
    plan: Path = typer.Option(..., "--plan", help="Plan JSON sent to every site."),
    out: Path = typer.Option(..., "--out", help="Folder for results.json, the models per round and the PNG."),
    strategy: str = typer.Option(
        "fedavg", "--strategy", help="fedavg, fedavgm, fedadam, fedyogi, fednova, iil, ciil or secure_fedavg."
    ),
    rounds: int = typer.Option(
        3, "--rounds", min=1, help="FedAvg rounds, or CIIL cycles (IIL visits each site once)."
    ),
    order: str | None = typer.Option(
        None, "--order", help="IIL/CIIL visiting order: comma-separated site names."
    ),
    patience: int = typer.Option(8, "--patience", min=1, help="IIL: epochs without validation improvement."),
    max_epochs: int = typer.Option(50, "--max-epochs", min=1, help="IIL: most epochs at one site."),
    init_weights: Path | None = typer.Option(
        None, "--init-weights", help="Start from these weights (safetensors) instead of a fresh model."
    ),
    keep_updates: bool = typer.Option(
        False, "--keep-updates", help="Keep each site's update under OUT/updates/."
    ),
    evaluate_every_visit: bool = typer.Option(
        False, "--eval-every-visit", help="CIIL: evaluate after every visit."
    ),
    no_eval: bool = typer.Option(
        False, "--no-eval", help="Skip the evaluation at every site after each round."
    ),
    server_lr: float | None = typer.Option(
        None, "--server-lr", help="fedavgm/fedadam/fedyogi: server step size (default 1.0 / 1e-2 / 1e-2)."
    ),
    server_momentum: float = typer.Option(0.9, "--server-momentum", help="fedavgm: server momentum."),
    server_beta1: float = typer.Option(0.9, "--server-beta1", help="fedadam/fedyogi: first-moment decay."),
    server_beta2: float = typer.Option(0.99, "--server-beta2", help="fedadam/fedyogi: second-moment decay."),
    server_tau: float = typer.Option(1e-3, "--server-tau", help="fedadam/fedyogi: adaptivity floor."),
    quiet: bool = typer.Option(False, "--quiet", help="No live progress; warnings and the summary only."),
    serve: str | None = typer.Option(
        None,
        "--serve",
        help="HOST:PORT where the relay for pull sites listens during the run (default: relay.listen).",
    ),
    no_serve: bool = typer.Option(
        False,
        "--no-serve",
        help="Serve no relay: the pull sites reach one that `fedsite relay serve` runs on the same database.",
    ),
) -> None:
    """Train a model across the federation's agents over HTTP (FedAvg and variants, IIL or CIIL)."""
    from coordinator.report import QuietReporter
    from coordinator.weights import initial_weights, load_file

    # Messages name files and sites' reasons: never wrapped (a path cut by a line break cannot be
    # pasted) and never read as markup (a "[...]" in them would vanish, or stop the command).
    console = Console(stderr=True, soft_wrap=True)
    if strategy not in STRATEGIES:
        console.print(f"--strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
        raise typer.Exit(2)
    try:
        fed = load_federation(federation)
        plan_doc = load_plan(plan)
        start = load_file(init_weights) if init_weights is not None else initial_weights(plan_doc)
    except (FederationError, ValueError) as exc:
        console.print(str(exc), markup=False)
        raise typer.Exit(2) from None
    options = RunOptions(
        strategy=strategy,
        rounds=rounds,
        order=[s.strip() for s in order.split(",") if s.strip()] if order else None,
        patience=patience,
        max_epochs=max_epochs,
        evaluate=not no_eval,
        evaluate_every_visit=evaluate_every_visit,
        keep_updates=keep_updates,
        server_lr=server_lr,
        server_momentum=server_momentum,
        server_beta1=server_beta1,
        server_beta2=server_beta2,
        server_tau=server_tau,
    )
    reporter = QuietReporter(console) if quiet else Reporter(console)
    if serve is not None and no_serve:
        console.print("--serve and --no-serve exclude each other")
        raise typer.Exit(2)
    try:
        relay = None if no_serve else _start_relay(fed, serve, console)
    except (FederationError, ValueError) as exc:
        console.print(str(exc), markup=False)
        raise typer.Exit(2) from None
    try:
        result = run_strategy(
            fed,
            plan_doc,
            out,
            options,
            initial_weights=start,
            reporter=reporter,
            relay_store=relay.store if relay is not None else None,
        )
    except (AgentError, RunError, RoundFailed) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        print_text(console, f"partial results: {out / 'results.json'}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        print_text(console, f"interrupted; partial results in {out / 'results.json'}")
        raise typer.Exit(130) from None
    finally:
        if relay is not None:
            relay.stop()
            relay.store.close()
    print_outputs(Console(), result)


def _start_relay(fed: Federation, serve: str | None, console: Console) -> RelayServer | None:
    """The relay for FED's pull sites, serving in a thread; None when there is nothing to serve."""
    from coordinator.relay.server import RelayServer
    from coordinator.relay.store import RelayStore

    if not fed.pull_names and serve is None:
        return None
    if fed.relay is None:
        raise FederationError(f"--serve {serve}: {fed.source or 'the federation'} has no 'relay:' section")
    try:
        host, port = split_listen(serve or fed.relay.listen)
    except ValueError as exc:
        raise ValueError(f"--serve: {exc}") from None
    store = RelayStore.from_settings(fed.relay)
    try:
        server = RelayServer(store, host, port, tls=fed.relay.tls).start()
    except BaseException:
        store.close()
        raise
    pull = ", ".join(fed.pull_names) or "none yet"
    print_text(console, f"relay: serving {server.url} for pull sites ({pull}); database in {store.root}")
    return server
