"""`fedsite plans`: the plan allow-list for approval policy 'manual' (approve, hash, list, pending,
revoke).

Each command opens the database named by the config (migrating it if needed) and records
what it changes in the audit log. The actor is the person named by `--by` (`admin:<name>`):
an audit log of a site run by several admins must say who decided, and the OS user of a
container (`cli:fedsite`) says nothing. Without `--by` it is the local OS user (`cli:<user>`).
Exit codes: 0 success, 1 an invalid plan or a refused operation, 2 a config, database or plan
file that cannot be used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from agent.access.approvals import (
    approve_plan,
    check_plan_hash,
    is_approved,
    list_approvals,
    parse_expiry,
    pending_plans,
    revoke_approval,
)
from agent.audit.chain import AuditLog
from agent.cli.common import ConfigOption, cli_actor, database, fail, load, print_table, when
from agent.errors import ApprovalError

plans_app = typer.Typer(help="Manage the plan allow-list (approval policy 'manual').", no_args_is_help=True)

MAX_NAME_CHARS = 100
BY_HELP = "Who decides (your name, as the audit log should show it); recorded as admin:NAME."


def _actor(by: str | None) -> str:
    """`admin:<by>`, or the OS user (`cli:<user>`) when no name is given; exit 1 on a bad name."""
    if by is None:
        return cli_actor()
    name = by.strip()
    if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        fail(f"error: --by {by!r}: expected a printable name of 1 to {MAX_NAME_CHARS} characters", 1)
    return f"admin:{name}"


@plans_app.command("approve")
def plans_approve(
    plan_hash: str = typer.Argument(
        ..., metavar="HASH", help="The plan's SHA-256, as shown in a 403 answer."
    ),
    expires: str | None = typer.Option(
        None, "--expires", help="YYYY-MM-DD (valid through that day, UTC) or an ISO date-time with offset."
    ),
    note: str = typer.Option("", "--note", help="Why, ticket number, ... (kept with the approval)."),
    by: str | None = typer.Option(None, "--by", metavar="NAME", help=BY_HELP),
    config: Path = ConfigOption,
) -> None:
    """Allow the plan with this hash to run under approval policy 'manual'."""
    actor = _actor(by)
    cfg = load(config)
    try:
        plan_hash = check_plan_hash(plan_hash)
        expires_at = parse_expiry(expires) if expires is not None else None
    except ApprovalError as exc:
        fail(f"error: {exc}", 1)
    with database(cfg) as db:
        try:
            record = approve_plan(db, AuditLog(db), plan_hash, actor, expires_at, note)
        except ApprovalError as exc:
            fail(f"error: {exc}", 1)
    if record.expires_at is None:
        until = "without expiry"
    elif expires is not None and len(expires.strip()) == 10:
        until = f"through {expires.strip()} (UTC; expires {when(record.expires_at)})"
    else:
        until = f"until {when(record.expires_at)}"
    typer.echo(f"Approved plan {record.plan_hash} {until}, by {record.approved_by}.")
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
    from agent.errors import PlanError
    from agent.training.plan import parse_plan, plan_hash

    try:
        plan = parse_plan(plan_file.read_bytes())
    except OSError as exc:
        fail(f"error: cannot read plan {plan_file}: {exc.strerror or exc}", 2)
    except PlanError as exc:
        fail(f"error: {plan_file}: invalid plan:\n{exc}", 1)
    digest = plan_hash(plan)
    typer.echo(f"plan: dataset {plan.dataset}, model {plan.model.name}, {plan.local_epochs} local epoch(s)")
    if config is not None:
        cfg = load(config)
        with database(cfg) as db:
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
    cfg = load(config)
    with database(cfg) as db:
        records = list_approvals(db, include_inactive=show_all)
    rows: list[dict[str, Any]] = [
        {
            "plan_hash": r.plan_hash,
            "status": r.status(),
            "approved_by": r.approved_by,
            "approved_at": when(r.approved_at),
            "expires_at": when(r.expires_at) if r.expires_at else None,
            "revoked_at": when(r.revoked_at) if r.revoked_at else None,
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
    print_table(
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


@plans_app.command("pending")
def plans_pending(
    config: Path = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List plans this site refused for want of an approval and not approved since (from the
    audit log's plan.refused events of the last 30 days)."""
    cfg = load(config)
    with database(cfg) as db:
        pending = pending_plans(db, AuditLog(db))
    rows: list[dict[str, Any]] = [
        {
            "plan_hash": p.plan_hash,
            "first_refused": when(p.first_refused),
            "last_refused": when(p.last_refused),
            "count": p.count,
            "requester": p.requester,
            "model": p.model,
            "dataset": p.dataset,
            "local_epochs": p.local_epochs,
        }
        for p in pending
    ]
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"approval policy: {cfg.approval.policy}")
    if not rows:
        typer.echo("no refused plans waiting for a decision")
        return
    print_table(
        ["PLAN HASH", "FIRST REFUSED", "LAST REFUSED", "COUNT", "REQUESTER", "MODEL", "DATASET", "EPOCHS"],
        [
            [
                r["plan_hash"],
                r["first_refused"],
                r["last_refused"],
                str(r["count"]),
                r["requester"],
                r["model"],
                r["dataset"],
                "" if r["local_epochs"] is None else str(r["local_epochs"]),
            ]
            for r in rows
        ],
    )
    typer.echo("to run one: fedsite plans approve HASH --by NAME (check it first with `fedsite plans hash`)")


@plans_app.command("revoke")
def plans_revoke(
    plan_hash: str = typer.Argument(..., metavar="HASH", help="The plan's SHA-256."),
    by: str | None = typer.Option(None, "--by", metavar="NAME", help=BY_HELP),
    config: Path = ConfigOption,
) -> None:
    """Withdraw the approval of a plan; queued rounds are not affected, new ones are refused."""
    actor = _actor(by)
    cfg = load(config)
    with database(cfg) as db:
        try:
            n = revoke_approval(db, AuditLog(db), plan_hash, actor)
        except ApprovalError as exc:
            fail(f"error: {exc}", 1)
    typer.echo(f"Revoked {n} approval(s) of plan {check_plan_hash(plan_hash)}.")
