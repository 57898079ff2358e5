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

from agent.access.tokens import ROLES, create_token, list_tokens, parse_token_expiry, revoke_token
from agent.audit.chain import AuditLog
from agent.cli.common import ConfigOption, cli_actor, database, fail, load, print_table, when
from agent.errors import TokenError

tokens_app = typer.Typer(help="Manage the REST API's bearer tokens.", no_args_is_help=True)


@tokens_app.command("add")
def tokens_add(
    name: str = typer.Argument(..., help="A name for the token's holder, e.g. 'coordinator-eu'."),
    role: str = typer.Option(..., "--role", help=f"One of: {', '.join(ROLES)}."),
    expires: str | None = typer.Option(
        None,
        "--expires",
        help="When the token stops working: a lifetime (90d, 12h, 30m, 2w), YYYY-MM-DD "
        "(valid through that day, UTC) or an ISO date-time with offset. Default: never.",
    ),
    config: Path = ConfigOption,
) -> None:
    """Create a token; it is printed once, as the last line, and only its SHA-256 is stored."""
    cfg = load(config)
    try:
        expires_at = parse_token_expiry(expires) if expires is not None else None
    except TokenError as exc:
        fail(f"error: {exc}", 1)
    with database(cfg) as db:
        try:
            token = create_token(
                db,
                AuditLog(db),
                name,
                role,
                cli_actor(),
                reserved_names=[t.name for t in cfg.api.tokens],
                expires_at=expires_at,
            )
        except TokenError as exc:
            fail(f"error: {exc}", 1)
    until = f", valid until {when(expires_at)}" if expires_at is not None else ", without expiry"
    typer.echo(f"Created token {name!r} with role {role}{until}. It is shown only this once; store it now.")
    typer.echo(token)


@tokens_app.command("list")
def tokens_list(
    config: Path = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List tokens (names, roles, status, expiry, who created or revoked them; never the tokens
    or hashes). An expired token is listed as `expired` until it is revoked."""
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
            "expires_at": None,
        }
        for t in cfg.api.tokens
    ] + [
        {
            "name": r.name,
            "role": r.role,
            "source": "database",
            "status": r.status(),
            "created_at": when(r.created_at),
            "created_by": r.created_by,
            "revoked_at": when(r.revoked_at) if r.revoked_at else None,
            "expires_at": when(r.expires_at) if r.expires_at else None,
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
        ["NAME", "ROLE", "STATUS", "SOURCE", "CREATED", "BY", "EXPIRES", "REVOKED"],
        [
            [
                r["name"],
                r["role"],
                r["status"],
                r["source"],
                r["created_at"] or "-",
                r["created_by"] or "-",
                r["expires_at"] or "never",
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
