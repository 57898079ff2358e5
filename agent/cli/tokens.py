"""`fedsite tokens`: the REST API's bearer tokens (create, list, revoke).

Each command opens the database named by the config (migrating it if needed) and records
what it changes in the audit log, with the local OS user as the actor (`cli:<user>`).
Exit codes: 0 success, 1 a refused operation, 2 a config or database that cannot be used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from agent.access.tokens import ROLES, create_token, list_tokens, revoke_token
from agent.audit.chain import AuditLog
from agent.cli.common import ConfigOption, cli_actor, database, fail, load, print_table, when
from agent.errors import TokenError

tokens_app = typer.Typer(help="Manage the REST API's bearer tokens.", no_args_is_help=True)


@tokens_app.command("add")
def tokens_add(
    name: str = typer.Argument(..., help="A name for the token's holder, e.g. 'coordinator-eu'."),
    role: str = typer.Option(..., "--role", help=f"One of: {', '.join(ROLES)}."),
    config: Path = ConfigOption,
) -> None:
    """Create a token; it is printed once, as the last line, and only its SHA-256 is stored."""
    cfg = load(config)
    with database(cfg) as db:
        try:
            token = create_token(
                db, AuditLog(db), name, role, cli_actor(), reserved_names=[t.name for t in cfg.api.tokens]
            )
        except TokenError as exc:
            fail(f"error: {exc}", 1)
    typer.echo(f"Created token {name!r} with role {role}. It is shown only this once; store it now.")
    typer.echo(token)


@tokens_app.command("list")
def tokens_list(
    config: Path = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List tokens (names, roles, who created or revoked them; never the tokens or hashes)."""
    cfg = load(config)
    with database(cfg) as db:
        records = list_tokens(db)
    rows: list[dict[str, Any]] = [
        {
            "name": t.name,
            "role": t.role,
            "source": "config",
            "status": "active",
            "created_at": None,
            "created_by": None,
            "revoked_at": None,
        }
        for t in cfg.api.tokens
    ] + [
        {
            "name": r.name,
            "role": r.role,
            "source": "database",
            "status": "active" if r.active else "revoked",
            "created_at": when(r.created_at),
            "created_by": r.created_by,
            "revoked_at": when(r.revoked_at) if r.revoked_at else None,
        }
        for r in records
    ]
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no tokens; create one with `fedsite tokens add NAME --role coordinator`")
        return
    print_table(
        ["NAME", "ROLE", "STATUS", "SOURCE", "CREATED", "BY", "REVOKED"],
        [
            [
                r["name"],
                r["role"],
                r["status"],
                r["source"],
                r["created_at"] or "-",
                r["created_by"] or "-",
                r["revoked_at"] or "-",
            ]
            for r in rows
        ],
    )


@tokens_app.command("revoke")
def tokens_revoke(
    name: str = typer.Argument(..., help="The token's name."),
    config: Path = ConfigOption,
) -> None:
    """Revoke the active token NAME; it stops working at once."""
    cfg = load(config)
    if any(t.name == name for t in cfg.api.tokens):
        fail(f"error: token {name!r} is defined in the config (api.tokens); remove it there", 1)
    with database(cfg) as db:
        try:
            revoke_token(db, AuditLog(db), name, cli_actor())
        except TokenError as exc:
            fail(f"error: {exc}", 1)
    typer.echo(f"Revoked token {name!r}.")
