"""`fedsite privacy`: the site's differential-privacy ledger (status) and the membership-inference
report on what a round released (audit-mia).

Exit codes: 0 success, 1 a round that cannot be audited, 2 a config or database that cannot be used.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from agent.audit.chain import AuditLog
from agent.cli.common import ConfigOption, cli_actor, database, fail, load, print_table
from agent.errors import EgressError, UnknownDataset, WeightError

privacy_app = typer.Typer(
    help="The differential-privacy ledger and the membership-inference report.", no_args_is_help=True
)


def _eps(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@privacy_app.command("status")
def privacy_status(
    config: Path = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Budget, spent, reserved (rounds in progress) and remaining ε per dataset, and the last rounds."""
    # Imported here, not with the CLI: the ledger's accountants bring torch, MONAI and Opacus,
    # which every other `fedsite` command (and a read-only container) can do without.
    from agent.privacy.ledger import PrivacyLedger

    cfg = load(config)
    with database(cfg, must_exist=True) as db:
        status = PrivacyLedger(cfg, db, AuditLog(db)).status()
    if json_out:
        typer.echo(json.dumps({"accountant": cfg.privacy.accountant, "datasets": status}, indent=2))
        return
    typer.echo(f"accountant: {cfg.privacy.accountant}")
    print_table(
        ["dataset", "dp required", "budget ε", "δ", "spent ε", "reserved ε", "remaining ε", "rounds"],
        [
            [
                d["dataset"],
                "yes" if d["dp_required"] else "no",
                _eps(d["budget_epsilon"]),
                f"{d['delta']:g}",
                _eps(d["spent_epsilon"]),
                _eps(d["reserved_epsilon"]),
                _eps(d["remaining_epsilon"]),
                str(d["rounds"]),
            ]
            for d in status
        ],
    )
    for d in status:
        if not d["last_rounds"]:
            continue
        typer.echo(f"\nlast rounds of {d['dataset']}:")
        print_table(
            ["round", "requester", "status", "noise", "sample rate", "steps", "ε after", "at"],
            [
                [
                    r["round_id"],
                    r["requester"],
                    r["status"],
                    f"{r['noise_multiplier']:.4g}",
                    f"{r['sample_rate']:.4g}",
                    str(r["steps"]),
                    _eps(r["epsilon_after"]),
                    r["at"],
                ]
                for r in d["last_rounds"]
            ],
        )


@privacy_app.command("audit-mia")
def privacy_audit_mia(
    round_id: str = typer.Option(..., "--round", help="The completed round whose released update to attack."),
    config: Path = ConfigOption,
    out: Path | None = typer.Option(
        None, "--out", help="Where to write the ROC plot (PNG); default: work_dir/reports/mia-ROUND.png."
    ),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, max=100_000, help="Bootstrap resamples."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Membership inference on what the site released for ROUND: its training subjects against its
    held-out (validation) subjects, loss-threshold and calibrated attacks, AUC with a bootstrap
    interval and TPR at 5% / 10% FPR. Run it before trusting a configuration."""
    from agent.data.catalog import dataset_items
    from agent.exchange.compression import decode_update
    from agent.exchange.egress import EgressGate
    from agent.jobs.states import JobKind, JobStatus
    from agent.jobs.store import JobStore
    from agent.privacy.mia import membership_report, released_weights, write_roc
    from agent.training.plan import load_stored_plan
    from agent.training.registry import expected_shapes

    cfg = load(config)
    with database(cfg, must_exist=True) as db:
        audit = AuditLog(db)
        job = JobStore(db, audit).get(JobKind.TRAIN, round_id)
        if job is None:
            fail(f"error: no round with id {round_id!r}", 1)
        if job.status != JobStatus.COMPLETED:
            fail(f"error: round {round_id} is {job.status}; only a completed round released an update", 1)
        plan = load_stored_plan(job.plan_json)
        shapes = expected_shapes(plan)
        try:
            data = EgressGate(audit, cfg.work_dir / "outbox", cfg.egress).read_released(round_id)
            update = decode_update(data, expected=shapes, max_bytes=len(data))
            global_weights = None
            if job.weights_path and Path(job.weights_path).is_file():
                raw = Path(job.weights_path).read_bytes()
                global_weights = decode_update(raw, expected=shapes, max_bytes=len(raw))
            released = released_weights(plan, update, global_weights)
        except (EgressError, WeightError, ValueError) as exc:
            fail(f"error: round {round_id}: cannot rebuild the released model: {exc}", 1)
        try:
            items = dataset_items(db, plan.dataset)
        except UnknownDataset as exc:
            fail(f"error: {exc}", 1)
        members = [i for i in items if i.split == "train"]
        nonmembers = [i for i in items if i.split == "val"]
        if not members or not nonmembers:
            fail(
                f"error: dataset {plan.dataset!r} needs training and validation subjects "
                f"(has {len(members)} and {len(nonmembers)})",
                1,
            )
        results = membership_report(
            plan,
            released,
            members,
            nonmembers,
            cache_dir=cfg.work_dir / "cache",
            reference=global_weights,
            device="cpu" if cfg.device == "auto" else cfg.device,
            bootstrap=bootstrap,
        )
        png = out or cfg.work_dir / "reports" / f"mia-{round_id}.png"
        write_roc(results, png, f"membership inference, round {round_id}")
        summaries = [r.summary() for r in results]
        audit.append(
            "privacy.mia_report",
            actor=cli_actor(),
            details={"round_id": round_id, "dataset": plan.dataset, "attacks": summaries},
        )
    if json_out:
        typer.echo(json.dumps({"round_id": round_id, "roc_png": str(png), "attacks": summaries}, indent=2))
        return
    typer.echo(f"round {round_id}: {len(members)} training subjects (members) vs {len(nonmembers)} held out")
    print_table(
        ["attack", "AUC", "95% interval", "TPR @ 5% FPR", "TPR @ 10% FPR"],
        [
            [
                r.attack,
                f"{r.auc:.3f}",
                f"[{r.auc_low:.3f}, {r.auc_high:.3f}]",
                f"{r.tpr_at_5_fpr:.3f}",
                f"{r.tpr_at_10_fpr:.3f}",
            ]
            for r in results
        ],
    )
    typer.echo(f"ROC: {png}")
