"""`fedsite relay ...`: the coordinator's relay for pull-mode (outbound-only) sites.

- `add-site NAME`: issue the token a pull site connects with; only its SHA-256 is stored.
- `sites`: the pull sites, whether and when they registered, when last seen, their tasks.
- `serve`: the relay on its own (the same database and directory `fedsite coordinate` uses).

All three read the `relay:` section of a federation file. Exit codes: 0 done, 1 refused
(a site that already has a token), 2 unusable input.
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime
from pathlib import Path

import typer

from agent.cli.common import fail
from agent.errors import Conflict, InvalidRequest
from coordinator.errors import FederationError
from coordinator.federation import Federation, RelaySettings, load_federation, split_listen
from coordinator.relay.store import RelayStore

relay_app = typer.Typer(help="The coordinator's relay that pull-mode sites connect to.", no_args_is_help=True)

FederationOption = typer.Option(..., "--federation", help="Federation file with a relay: section.")


def _relay(federation: Path) -> tuple[Federation, RelaySettings]:
    try:
        fed = load_federation(federation)
    except FederationError as exc:
        fail(str(exc), 2)
    if fed.relay is None:
        fail(f"{federation}: no 'relay:' section (where the relay listens and keeps its database)", 2)
    return fed, fed.relay


def _write_token_file(path: Path, token: str, *, replace: bool) -> None:
    """TOKEN in PATH, created owner-only (0600) from the start; an existing file is kept unless REPLACE."""
    if path.exists() and not replace:
        fail(f"{path} exists; pass --replace to overwrite it (and replace the site's token)", 1)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        fail(f"cannot write the token to {path}: {exc}", 2)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "never"


@relay_app.command("add-site")
def add_site(
    name: str = typer.Argument(..., help="The pull site's name, as in the federation file."),
    federation: Path = FederationOption,
    token_file: Path | None = typer.Option(
        None, "--token-file", help="Write the token here (0600) instead of printing it."
    ),
    replace: bool = typer.Option(False, "--replace", help="Issue a new token for a site that has one."),
) -> None:
    """Issue the token a pull site connects with; printed once (or written to --token-file)."""
    fed, settings = _relay(federation)
    token = secrets.token_urlsafe(32)
    if token_file is not None:
        _write_token_file(token_file, token, replace=replace)
    store = RelayStore.from_settings(settings)
    try:
        store.add_site(name, token=token, replace=replace)
    except (Conflict, InvalidRequest) as exc:
        if token_file is not None and not replace:
            token_file.unlink(missing_ok=True)
        fail(f"error: {exc}", 1)
    finally:
        store.close()
    if name not in fed.pull_names:
        typer.echo(
            f"note: {name} is not a pull entry of {federation}; "
            f"add `- {{name: {name}, pull: true}}` to its agents",
            err=True,
        )
    if token_file is not None:
        typer.echo(f"Token for {name} written to {token_file} (0600); the relay keeps only its SHA-256.")
        return
    typer.echo(f"Token for {name}. It is shown only this once; give it to the site's admin now.")
    typer.echo(token)


@relay_app.command("sites")
def sites(federation: Path = FederationOption) -> None:
    """The pull sites: registered or not, last seen, their tasks by state."""
    _, settings = _relay(federation)
    store = RelayStore.from_settings(settings)
    try:
        rows = store.sites()
    finally:
        store.close()
    if not rows:
        typer.echo("no pull sites; add one with `fedsite relay add-site NAME --federation FILE`")
        return
    typer.echo(f"{'site':<20} {'registered':<24} {'last seen':<24} tasks")
    for row in rows:
        tasks = ", ".join(f"{k} {v}" for k, v in sorted(row.tasks.items())) or "none"
        typer.echo(f"{row.name:<20} {_when(row.registered_at):<24} {_when(row.last_seen):<24} {tasks}")


@relay_app.command("serve")
def serve(
    federation: Path = FederationOption,
    listen: str | None = typer.Option(None, "--listen", help="HOST:PORT (default: relay.listen)."),
) -> None:
    """Serve the relay on its own until Ctrl-C (the coordinator may run elsewhere on the same database)."""
    from coordinator.relay.server import serve_forever

    _, settings = _relay(federation)
    try:
        host, port = split_listen(listen or settings.listen)
    except ValueError as exc:
        fail(f"--listen: {exc}", 2)
    store = RelayStore.from_settings(settings)
    try:
        serve_forever(store, host, port, tls=settings.tls)
    except FederationError as exc:
        fail(str(exc), 2)
    finally:
        store.close()
