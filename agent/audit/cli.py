"""`fedsite tokens`, `fedsite plans` and `fedsite audit`: the site admin's commands.

Each command opens the database named by the config (migrating it if needed) and records
what it changes in the audit log, with the local OS user as the actor (`cli:<user>`).
Exit codes: 0 success, 1 a verification failure or a refused operation, 2 a config or
database that cannot be used.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import typer

from agent.access.approvals import (
    ApprovalError,
    approve_plan,
    check_plan_hash,
    is_approved,
    list_approvals,
    parse_expiry,
    revoke_approval,
)
from agent.access.tokens import ROLES, TokenError, create_token, list_tokens, revoke_token
from agent.audit.chain import AuditLog, parse_anchor
from agent.config import AgentConfig, ConfigError, load_config
from agent.db.engine import Database, DatabaseError, open_database, sqlite_file
from agent.fileio import atomic_file

tokens_app = typer.Typer(help="Manage the REST API's bearer tokens.", no_args_is_help=True)
plans_app = typer.Typer(help="Manage the plan allow-list (approval policy 'manual').", no_args_is_help=True)
audit_app = typer.Typer(help="Verify, export and follow the hash-chained audit log.", no_args_is_help=True)

# No environment fallback: every FEDSITE_* variable is read as a config override.
ConfigOption = typer.Option(..., "--config", "-c", help="Path to the agent's config.yaml.")


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        user = f"uid{os.getuid()}"
    return f"cli:{user}"


def _load(config: Path) -> AgentConfig:
    try:
        # Dataset folders are irrelevant to these commands; a missing one must not lock an
        # admin out of revoking a token.
        return load_config(config, check_paths=False)
    except ConfigError as exc:
        _fail(str(exc), 2)


@contextmanager
def _database(cfg: AgentConfig, *, must_exist: bool = False) -> Iterator[Database]:
    if must_exist:
        path = sqlite_file(cfg.db_url)
        if path is not None and not path.exists():
            # Opening would create an empty log that then "verifies": a typo in the config
            # must not look like a clean audit.
            _fail(f"error: the audit database {path} does not exist (database_url in {cfg.source})", 2)
    try:
        db = open_database(cfg.db_url)
    except DatabaseError as exc:
        _fail(str(exc), 2)
    try:
        yield db
    finally:
        db.dispose()


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment is not None else "-"


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for line in [header, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


# -- tokens ----------------------------------------------------------------------------------


@tokens_app.command("add")
def tokens_add(
    name: str = typer.Argument(..., help="A name for the token's holder, e.g. 'coordinator-eu'."),
    role: str = typer.Option(..., "--role", help=f"One of: {', '.join(ROLES)}."),
    config: Path = ConfigOption,
) -> None:
    """Create a token; it is printed once, as the last line, and only its SHA-256 is stored."""
    cfg = _load(config)
    with _database(cfg) as db:
        try:
            token = create_token(
                db, AuditLog(db), name, role, cli_actor(), reserved_names=[t.name for t in cfg.api.tokens]
            )
        except TokenError as exc:
            _fail(f"error: {exc}", 1)
    typer.echo(f"Created token {name!r} with role {role}. It is shown only this once; store it now.")
    typer.echo(token)


@tokens_app.command("list")
def tokens_list(
    config: Path = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List tokens (names, roles, who created or revoked them; never the tokens or hashes)."""
    cfg = _load(config)
    with _database(cfg) as db:
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
            "created_at": _when(r.created_at),
            "created_by": r.created_by,
            "revoked_at": _when(r.revoked_at) if r.revoked_at else None,
        }
        for r in records
    ]
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no tokens; create one with `fedsite tokens add NAME --role coordinator`")
        return
    _table(
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
    cfg = _load(config)
    if any(t.name == name for t in cfg.api.tokens):
        _fail(f"error: token {name!r} is defined in the config (api.tokens); remove it there", 1)
    with _database(cfg) as db:
        try:
            revoke_token(db, AuditLog(db), name, cli_actor())
        except TokenError as exc:
            _fail(f"error: {exc}", 1)
    typer.echo(f"Revoked token {name!r}.")


# -- plans -----------------------------------------------------------------------------------


@plans_app.command("approve")
def plans_approve(
    plan_hash: str = typer.Argument(
        ..., metavar="HASH", help="The plan's SHA-256, as shown in a 403 answer."
    ),
    expires: str | None = typer.Option(
        None, "--expires", help="YYYY-MM-DD (valid through that day, UTC) or an ISO date-time with offset."
    ),
    note: str = typer.Option("", "--note", help="Why, ticket number, ... (kept with the approval)."),
    config: Path = ConfigOption,
) -> None:
    """Allow the plan with this hash to run under approval policy 'manual'."""
    cfg = _load(config)
    try:
        plan_hash = check_plan_hash(plan_hash)
        expires_at = parse_expiry(expires) if expires is not None else None
    except ApprovalError as exc:
        _fail(f"error: {exc}", 1)
    with _database(cfg) as db:
        try:
            record = approve_plan(db, AuditLog(db), plan_hash, cli_actor(), expires_at, note)
        except ApprovalError as exc:
            _fail(f"error: {exc}", 1)
    if record.expires_at is None:
        until = "without expiry"
    elif expires is not None and len(expires.strip()) == 10:
        until = f"through {expires.strip()} (UTC; expires {_when(record.expires_at)})"
    else:
        until = f"until {_when(record.expires_at)}"
    typer.echo(f"Approved plan {record.plan_hash} {until}.")
    if cfg.approval.policy != "manual":
        typer.echo("note: this site's approval policy is 'auto'; approvals matter only under 'manual'.")


@plans_app.command("hash")
def plans_hash(
    plan_file: Path = typer.Argument(
        ..., metavar="PLAN", help="A plan as JSON (e.g. the coordinator's plan.json)."
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Also say whether this site has approved the plan."
    ),
) -> None:
    """Validate a plan and print its hash (the last line), the value that `plans approve` takes."""
    from agent.training.plan import PlanError, parse_plan, plan_hash

    try:
        plan = parse_plan(plan_file.read_bytes())
    except OSError as exc:
        _fail(f"error: cannot read plan {plan_file}: {exc.strerror or exc}", 2)
    except PlanError as exc:
        _fail(f"error: {plan_file}: invalid plan:\n{exc}", 1)
    digest = plan_hash(plan)
    typer.echo(f"plan: dataset {plan.dataset}, model {plan.model.name}, {plan.local_epochs} local epoch(s)")
    if config is not None:
        cfg = _load(config)
        with _database(cfg) as db:
            approved = is_approved(db, digest)
        typer.echo(f"approved at this site: {'yes' if approved else 'no'} (policy {cfg.approval.policy})")
    typer.echo(digest)


@plans_app.command("list")
def plans_list(
    config: Path = ConfigOption,
    show_all: bool = typer.Option(False, "--all", help="Also show revoked and expired approvals."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List plan approvals (active ones unless --all)."""
    cfg = _load(config)
    with _database(cfg) as db:
        records = list_approvals(db, include_inactive=show_all)
    rows: list[dict[str, Any]] = [
        {
            "plan_hash": r.plan_hash,
            "status": r.status(),
            "approved_by": r.approved_by,
            "approved_at": _when(r.approved_at),
            "expires_at": _when(r.expires_at) if r.expires_at else None,
            "revoked_at": _when(r.revoked_at) if r.revoked_at else None,
            "revoked_by": r.revoked_by,
            "note": r.note,
        }
        for r in records
    ]
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"approval policy: {cfg.approval.policy}")
    if not rows:
        typer.echo("no approvals" if show_all else "no active approvals")
        return
    _table(
        ["PLAN HASH", "STATUS", "APPROVED", "BY", "EXPIRES", "NOTE"],
        [
            [
                r["plan_hash"],
                r["status"],
                r["approved_at"],
                r["approved_by"],
                r["expires_at"] or "never",
                r["note"],
            ]
            for r in rows
        ],
    )


@plans_app.command("revoke")
def plans_revoke(
    plan_hash: str = typer.Argument(..., metavar="HASH", help="The plan's SHA-256."),
    config: Path = ConfigOption,
) -> None:
    """Withdraw the approval of a plan; queued rounds are not affected, new ones are refused."""
    cfg = _load(config)
    with _database(cfg) as db:
        try:
            n = revoke_approval(db, AuditLog(db), plan_hash, cli_actor())
        except ApprovalError as exc:
            _fail(f"error: {exc}", 1)
    typer.echo(f"Revoked {n} approval(s) of plan {check_plan_hash(plan_hash)}.")


# -- audit -----------------------------------------------------------------------------------


@audit_app.command("verify")
def audit_verify(
    config: Path = ConfigOption,
    anchor: str | None = typer.Option(
        None,
        "--anchor",
        help="ID:HASH of an event recorded earlier outside the site; it must still be there.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check the whole chain; exit 1 naming the first bad event, else print the head to keep."""
    cfg = _load(config)
    try:
        expected = parse_anchor(anchor) if anchor is not None else None
    except ValueError as exc:
        _fail(f"error: {exc}", 2)
    with _database(cfg, must_exist=True) as db:
        report = AuditLog(db).verify(anchor=expected)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        typer.echo(report.summary())
        if report.count:
            typer.echo(f"anchor: {report.last_id}:{report.head_hash}")
    else:
        typer.echo(report.summary(), err=True)
    raise typer.Exit(0 if report.ok else 1)


@audit_app.command("export")
def audit_export(
    config: Path = ConfigOption,
    fmt: str = typer.Option("jsonl", "--format", help="Output format; 'jsonl' (one event per line)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write to this file instead of standard output."
    ),
    since_id: int = typer.Option(
        0, "--since-id", min=0, help="Only events after this id (incremental export)."
    ),
) -> None:
    """Export events as JSON lines (id, ts, actor, action, details, prev_hash, hash) for a SIEM."""
    if fmt != "jsonl":
        _fail(f"error: --format {fmt!r}: only 'jsonl' is supported", 2)
    cfg = _load(config)
    with _database(cfg, must_exist=True) as db:
        events = AuditLog(db).iter_all(since_id=since_id)
        if out is None:
            n = _write_jsonl(events, sys.stdout)
        else:
            n = _export_file(events, out)
            typer.echo(f"Exported {n} events to {out}.", err=True)


def _write_jsonl(events: Iterator[dict[str, Any]], stream: Any) -> int:
    n = 0
    for ev in events:
        stream.write(json.dumps(ev, sort_keys=True, ensure_ascii=False) + "\n")
        n += 1
    stream.flush()
    return n


def _export_file(events: Iterator[dict[str, Any]], out: Path) -> int:
    # Written aside and renamed, so that a SIEM collector never picks up half a file.
    with atomic_file(out, "w") as fh:
        return _write_jsonl(events, fh)


def _format_event(ev: dict[str, Any]) -> str:
    details = json.dumps(ev["details"], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return f"{ev['id']:>6}  {ev['ts']}  {ev['actor']}  {ev['action']}  {details}"


@audit_app.command("tail")
def audit_tail(
    config: Path = ConfigOption,
    n: int = typer.Option(20, "-n", "--lines", min=1, max=10_000, help="How many of the newest events."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events until Ctrl-C."),
    interval: float = typer.Option(1.0, "--interval", min=0.05, max=60.0, help="Seconds between polls."),
) -> None:
    """Print the newest events; with --follow, keep printing new ones as they are recorded."""
    cfg = _load(config)
    with _database(cfg, must_exist=True) as db:
        log = AuditLog(db)
        last = 0
        for ev in log.tail(n):
            typer.echo(_format_event(ev))
            last = ev["id"]
        if not follow:
            return
        try:
            while True:
                time.sleep(interval)
                for ev in log.events(since_id=last, limit=1000):
                    typer.echo(_format_event(ev))
                    last = ev["id"]
        except KeyboardInterrupt:
            return
