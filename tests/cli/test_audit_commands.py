"""`fedsite audit export` and `fedsite audit tail`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import agent.cli.audit as audit_cli
from agent.audit.chain import AuditLog, event_hash
from agent.cli import app


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"site": {"id": "site-1"}, "work_dir": "work", "database_url": db_url}))
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_export_jsonl_to_stdout_and_file(config: Path, audit_log: AuditLog, tmp_path: Path) -> None:
    for i in range(5):
        audit_log.append(
            "round.completed", actor="worker", details={"round_id": f"r{i}", "dice": 0.5 + i / 10}
        )
    code, out = run("audit", "export", "--format", "jsonl", "--config", str(config))
    assert code == 0, out
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["id"] for e in lines] == [1, 2, 3, 4, 5]
    for e in lines:
        assert set(e) == {"id", "ts", "actor", "action", "details", "prev_hash", "hash"}
        # A SIEM can re-check every exported event on its own.
        assert (
            event_hash(e["id"], e["ts"], e["actor"], e["action"], e["details"], e["prev_hash"]) == e["hash"]
        )

    target = tmp_path / "siem" / "audit.jsonl"
    code, out = run("audit", "export", "--format", "jsonl", "--out", str(target), "--config", str(config))
    assert code == 0, out
    assert [json.loads(line)["id"] for line in target.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert not [p for p in target.parent.iterdir() if p.name != "audit.jsonl"]

    code, out = run("audit", "export", "--since-id", "3", "--config", str(config))
    assert [json.loads(line)["id"] for line in out.splitlines()] == [4, 5]

    code, out = run("audit", "export", "--format", "csv", "--config", str(config))
    assert code == 2 and "jsonl" in out


def test_tail_prints_the_newest_events(config: Path, audit_log: AuditLog) -> None:
    for i in range(30):
        audit_log.append("api.refused", actor="anonymous", details={"status": 401, "i": i})
    code, out = run("audit", "tail", "-n", "3", "--config", str(config))
    assert code == 0, out
    lines = out.splitlines()
    assert len(lines) == 3
    assert [int(line.split()[0]) for line in lines] == [28, 29, 30]
    assert "api.refused" in lines[0] and '"status":401' in lines[0]
    code, out = run("audit", "tail", "--config", str(config))
    assert len(out.splitlines()) == 20


def test_tail_follow_prints_new_events_until_interrupted(
    config: Path, audit_log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit_log.append("agent.started", actor="agent", details={})
    polls = {"n": 0}

    def fake_sleep(_seconds: float) -> None:
        polls["n"] += 1
        if polls["n"] == 1:
            audit_log.append("round.queued", actor="token:c", details={"round_id": "r1"})
            audit_log.append("round.running", actor="worker", details={"round_id": "r1"})
        elif polls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(audit_cli.time, "sleep", fake_sleep)
    code, out = run("audit", "tail", "--follow", "--config", str(config))
    assert code == 0, out
    actions = [line.split()[3] for line in out.splitlines()]
    assert actions == ["agent.started", "round.queued", "round.running"]
    assert polls["n"] == 3


def test_empty_log(config: Path) -> None:
    code, out = run("audit", "verify", "--config", str(config))
    assert code == 0 and "OK: 0 events" in out
    code, out = run("audit", "tail", "--config", str(config))
    assert code == 0 and out == ""
    code, out = run("audit", "export", "--config", str(config))
    assert code == 0 and out == ""


def test_bad_anchor_is_a_usage_error(config: Path) -> None:
    code, out = run("audit", "verify", "--anchor", "nonsense", "--config", str(config))
    assert code == 2 and "anchor" in out


def test_audit_commands_refuse_a_missing_sqlite_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "fedsite.db"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"site": {"id": "s1"}, "database_url": f"sqlite:///{missing}"}))
    for command in (["audit", "verify"], ["audit", "export"], ["audit", "tail"]):
        code, out = run(*command, "--config", str(path))
        assert code == 2 and str(missing) in out and "does not exist" in out
    assert not missing.exists()
