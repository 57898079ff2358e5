"""`fedsite doctor`: is this site ready to train? One line per check, the fix when one fails.

The checks are in `agent.doctor`; this prints them (or `--json` for scripts) and exits 1 when one
failed, 2 when the config itself cannot be used. `fedsite config check` shows the same lines.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from agent.cli.common import ConfigOption, load
from agent.doctor import DoctorReport, run_doctor

doctor_app = typer.Typer(add_completion=False)

AsUidOption = typer.Option(
    None,
    "--as-uid",
    help="Check the data as this uid (root only; default: site.run_as_uid, else the caller's uid).",
)
HostOption = typer.Option(
    [], "--host", help="A name clients use to reach the agent; the certificate must name it (repeatable)."
)


def print_report(report: DoctorReport) -> None:
    """One line per check, then its details indented; warnings and failures on the same stream so
    that their order stays readable."""
    for check in report.checks:
        typer.echo(check.line())
        for detail in check.details:
            typer.echo(f"     {detail}")
    failed = sum(1 for c in report.checks if c.status == "fail")
    warned = sum(1 for c in report.checks if c.status == "warn")
    typer.echo(f"doctor: {failed} failed, {warned} warning(s), {len(report.checks)} check(s)")


@doctor_app.command("doctor")
def doctor(
    config: Path = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print the checks as JSON (for scripts)."),
    as_uid: int | None = AsUidOption,
    host: list[str] = HostOption,
) -> None:
    """Check the site as the agent will meet it: data readable by its uid and not shrunk, TLS files,
    the approval policy, the database, free disk, the clock. Exit 1 when a check fails."""
    cfg = load(config)
    report = run_doctor(cfg, as_uid=as_uid, hosts=host)
    if json_out:
        typer.echo(json.dumps(report.as_json(), indent=2))
    else:
        print_report(report)
    if not report.ok:
        raise typer.Exit(1)
