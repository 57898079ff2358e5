"""`fedsite admin-users`: the accounts of the admin web console (add, list, password, remove).

Each command opens the database named by the config (migrating it if needed) and records what
it changes in the audit log, with the local OS user as the actor (`cli:<user>`): making an
account needs a shell on the agent's host, which is where the trust starts. The password is
asked for (twice, not echoed) or read from the first line of --password-file (for scripts;
keep that file unreadable by others and delete it after). Exit codes: 0 success, 1 a refused
operation, 2 a config, database or password file that cannot be used.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer

from agent.audit.chain import AuditLog
from agent.cli.common import ConfigOption, cli_actor, database, fail, load, print_table, when
from agent.config import AgentConfig
from agent.console.auth import MIN_PASSWORD_CHARS, add_admin, list_admins, remove_admin, set_password
from agent.db.engine import Database
from agent.errors import AdminUserError

T = TypeVar("T")

admin_users_app = typer.Typer(help="Manage the admin web console's accounts.", no_args_is_help=True)

FILE_HELP = "Read the password from the first line of this file instead of asking for it."


def _change(cfg: AgentConfig, change: Callable[[Database, AuditLog, str], T]) -> T:
    """Run one account change against the config's database, audited as this OS user; a refusal
    (unknown name, short password, ...) ends the command with its reason and exit code 1."""
    with database(cfg) as db:
        try:
            return change(db, AuditLog(db), cli_actor())
        except AdminUserError as exc:
            fail(f"error: {exc}", 1)


def _password(password_file: Path | None) -> str:
    if password_file is None:
        return str(
            typer.prompt(
                f"Password (at least {MIN_PASSWORD_CHARS} characters)",
                hide_input=True,
                confirmation_prompt=True,
            )
        )
    try:
        lines = password_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"error: cannot read --password-file {password_file}: {exc}", 2)
    if not lines or not lines[0]:
        fail(f"error: --password-file {password_file}: the first line is empty", 2)
    return lines[0]


@admin_users_app.command("add")
def admin_users_add(
    name: str = typer.Argument(
        ..., help="The admin's login name, as the audit log will show it (console:NAME)."
    ),
    password_file: Path | None = typer.Option(None, "--password-file", help=FILE_HELP),
    config: Path = ConfigOption,
) -> None:
    """Create a console account (its password is stored as an argon2id hash)."""
    cfg = load(config)
    password = _password(password_file)
    _change(cfg, lambda db, audit, actor: add_admin(db, audit, name, password, actor))
    typer.echo(f"Created console admin {name!r}.")
    if not cfg.console.enabled:
        typer.echo(
            "note: the console is off in this config; set console.enabled: true and restart the agent."
        )


@admin_users_app.command("password")
def admin_users_password(
    name: str = typer.Argument(..., help="The admin's login name."),
    password_file: Path | None = typer.Option(None, "--password-file", help=FILE_HELP),
    config: Path = ConfigOption,
) -> None:
    """Set a new password; the account's open sessions end."""
    cfg = load(config)
    password = _password(password_file)
    ended = _change(cfg, lambda db, audit, actor: set_password(db, audit, name, password, actor))
    typer.echo(f"New password for {name!r}; {ended} session(s) ended.")


@admin_users_app.command("list")
def admin_users_list(config: Path = ConfigOption) -> None:
    """List the console's accounts."""
    cfg = load(config)
    with database(cfg) as db:
        admins = list_admins(db)
    if not admins:
        typer.echo("no console admins")
        return
    print_table(
        ["NAME", "CREATED", "BY", "PASSWORD SET"],
        [[a.name, when(a.created_at), a.created_by, when(a.password_changed_at)] for a in admins],
    )


@admin_users_app.command("remove")
def admin_users_remove(
    name: str = typer.Argument(..., help="The admin's login name."), config: Path = ConfigOption
) -> None:
    """Remove an account; its open sessions end at once."""
    cfg = load(config)
    ended = _change(cfg, lambda db, audit, actor: remove_admin(db, audit, name, actor))
    typer.echo(f"Removed console admin {name!r}; {ended} session(s) ended.")
