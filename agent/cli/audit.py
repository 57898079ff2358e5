"""`fedsite audit`: verify, export and follow the hash-chained audit log; show the key that
signs its anchors.

The commands read an existing database only: a missing SQLite file is an error (exit 2),
never an empty log that "verifies". Exit codes: 0 success, 1 a verification failure,
2 a config or database that cannot be used.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.audit.anchors import (
    check_anchors,
    fingerprint,
    key_path,
    load_anchors,
    load_or_create_key,
    parse_public_key,
    public_key_text,
)
from agent.audit.chain import AuditLog, ChainReport, parse_anchor
from agent.cli.common import ConfigOption, database, fail, load
from agent.errors import AuditError
from agent.fileio import atomic_file

audit_app = typer.Typer(help="Verify, export and follow the hash-chained audit log.", no_args_is_help=True)


@audit_app.command("verify")
def audit_verify(
    config: Path = ConfigOption,
    anchor: str | None = typer.Option(
        None,
        "--anchor",
        help="ID:HASH of an event recorded earlier outside the site; it must still be there.",
    ),
    anchors_file: Path | None = typer.Option(
        None,
        "--anchors",
        help="The coordinator's results.json, or a JSON file of anchors: every signed anchor of "
        "this site in it must match the log.",
    ),
    public_key: str | None = typer.Option(
        None,
        "--public-key",
        help="The site's public key (hex, as `fedsite audit key` printed it when recorded "
        "elsewhere); default: the key in the work directory.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check the whole chain; exit 1 naming the first bad event, else print the head to keep.

    With --anchors, also check the chain against every signed anchor the coordinator holds:
    a rewrite of the log up to the newest anchor fails, naming the anchor."""
    cfg = load(config)
    try:
        expected = parse_anchor(anchor) if anchor is not None else None
        anchors = load_anchors(anchors_file, cfg.site.id) if anchors_file is not None else None
    except ValueError as exc:
        fail(f"error: {exc}", 2)
    with database(cfg, must_exist=True) as db:
        log = AuditLog(db)
        report = log.verify(anchor=expected)
        if report.ok:
            # The privacy ledger's rows against the hashes the chain recorded for them (imported
            # here: the ledger's accountants bring MONAI, which the other commands do without).
            from agent.privacy.ledger import verify_ledger

            bad_id, problem = verify_ledger(db, log)
            if problem:
                report = ChainReport(False, report.count, bad_id, problem, report.last_id, report.head_hash)
        anchored = None
        if anchors is not None:
            public = _site_public_key(cfg.work_dir, public_key)
            anchored = check_anchors(log, anchors, public)
    ok = report.ok and (anchored is None or anchored.ok)
    if json_out:
        doc = report.to_dict()
        if anchored is not None:
            doc["anchors"] = {"ok": anchored.ok, "checked": anchored.checked, "problems": anchored.problems}
        typer.echo(json.dumps(doc, indent=2))
        raise typer.Exit(0 if ok else 1)
    if report.ok:
        typer.echo(report.summary())
        if report.count:
            typer.echo(f"anchor: {report.last_id}:{report.head_hash}")
    else:
        typer.echo(report.summary(), err=True)
    if anchored is not None:
        typer.echo(f"anchors: {anchored.summary()}", err=not anchored.ok)
    raise typer.Exit(0 if ok else 1)


def _site_public_key(work_dir: Path, text: str | None) -> Ed25519PublicKey:
    """The public key anchors are checked with: TEXT when given, else the work directory's key."""
    path = key_path(work_dir)
    try:
        if text is not None:
            return parse_public_key(text)
        if path.exists():
            return load_or_create_key(path).public_key()
    except AuditError as exc:
        fail(f"error: {exc}", 2)
    fail(f"error: no audit signing key at {path}; give the site's public key with --public-key", 2)


@audit_app.command("key")
def audit_key(
    config: Path = ConfigOption,
    json_out: bool = typer.Option(False, "--json", help="Print the key as JSON."),
) -> None:
    """Print the public key that signs this site's audit anchors (created if it does not exist
    yet, its creation audited): give it to whoever will check anchors later."""
    cfg = load(config)
    with database(cfg) as db:
        try:
            public = load_or_create_key(key_path(cfg.work_dir), AuditLog(db)).public_key()
        except AuditError as exc:
            fail(f"error: {exc}", 2)
    text, digest = public_key_text(public), fingerprint(public)
    if json_out:
        typer.echo(
            json.dumps(
                {"site_id": cfg.site.id, "algorithm": "ed25519", "public_key": text, "fingerprint": digest}
            )
        )
    else:
        typer.echo(f"site {cfg.site.id}: ed25519 public key {text}")
        typer.echo(f"fingerprint (sha256): {digest}")


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
        fail(f"error: --format {fmt!r}: only 'jsonl' is supported", 2)
    cfg = load(config)
    with database(cfg, must_exist=True) as db:
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
    cfg = load(config)
    with database(cfg, must_exist=True) as db:
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
