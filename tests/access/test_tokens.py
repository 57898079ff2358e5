"""API tokens: the CLI round trip, hashes only at rest, constant-time authentication, roles."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from agent.access import tokens as tokens_mod
from agent.access.tokens import (
    TokenInfo,
    authenticate,
    create_token,
    has_role,
    list_tokens,
    parse_token_expiry,
    revoke_token,
    token_sha256,
)
from agent.audit.chain import AuditLog
from agent.cli import app
from agent.config import StaticToken
from agent.db.engine import Database, open_database
from agent.errors import TokenError, TokenExpired


def _config(tmp_path: Path, db_url: str, **extra: object) -> Path:
    path = tmp_path / "config.yaml"
    doc = {"site": {"id": "site-1"}, "work_dir": "work", "database_url": db_url, **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_cli_round_trip(tmp_path: Path, db_url: str) -> None:
    config = _config(tmp_path, db_url)
    result = CliRunner().invoke(
        app, ["tokens", "add", "coord-eu", "--role", "coordinator", "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]  # the last line of standard output
    assert len(token) >= 40 and " " not in token

    code, out = run("tokens", "add", "coord-eu", "--role", "admin", "--config", str(config))
    assert code == 1 and "active token named 'coord-eu'" in out

    code, out = run("tokens", "add", "x", "--role", "root", "--config", str(config))
    assert code == 1 and "role 'root'" in out

    code, out = run("tokens", "list", "--config", str(config))
    assert code == 0 and "coord-eu" in out and "coordinator" in out and "active" in out
    assert token not in out and token_sha256(token) not in out

    db = open_database(db_url)
    try:
        assert authenticate(db, [], token) == TokenInfo("coord-eu", "coordinator", "database")
        code, out = run("tokens", "revoke", "coord-eu", "--config", str(config))
        assert code == 0, out
        assert authenticate(db, [], token) is None
        code, out = run("tokens", "revoke", "coord-eu", "--config", str(config))
        assert code == 1 and "no active token named 'coord-eu'" in out
        code, out = run("tokens", "list", "--config", str(config))
        assert "revoked" in out

        # The name is free again once revoked; the new token differs.
        code, out = run("tokens", "add", "coord-eu", "--role", "coordinator", "--config", str(config))
        assert code == 0, out
        second = out.strip().splitlines()[-1]
        assert second != token
        assert authenticate(db, [], second) is not None and authenticate(db, [], token) is None

        events = AuditLog(db).events()
        assert [e["action"] for e in events] == ["token.created", "token.revoked", "token.created"]
        assert all(e["actor"].startswith("cli:") for e in events)
        assert all(e["details"] == {"name": "coord-eu", "role": "coordinator"} for e in events)
        assert AuditLog(db).verify().ok
    finally:
        db.dispose()


def test_token_is_never_stored_in_clear(tmp_path: Path, db: Database, audit_log: AuditLog) -> None:
    token = create_token(db, audit_log, "c1", "coordinator", "test")
    assert db.url.startswith(("sqlite", "postgresql"))
    if db.is_sqlite:
        db.dispose()  # checkpoints the WAL into the main file
        path = Path(db.url.split("///", 1)[1])
        blob = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        assert token.encode() not in blob
        assert token_sha256(token).encode() in blob  # the check can see stored values at all
    else:
        with db.engine.connect() as conn:
            from sqlalchemy import text

            for table in ("api_tokens", "audit_events"):
                dump = str(conn.execute(text(f"SELECT * FROM {table}")).all())
                assert token not in dump
    assert all(token not in str(e) for e in audit_log.events())


def test_cli_output_with_config_tokens(tmp_path: Path, db_url: str) -> None:
    static = {"name": "ops", "role": "admin", "sha256": token_sha256("static-secret")}
    config = _config(tmp_path, db_url, api={"tokens": [static]})
    code, out = run("tokens", "add", "ops", "--role", "admin", "--config", str(config))
    assert code == 1 and "config" in out
    code, out = run("tokens", "revoke", "ops", "--config", str(config))
    assert code == 1 and "config" in out
    code, out = run("tokens", "list", "--config", str(config))
    assert code == 0 and "ops" in out and "config" in out
    assert static["sha256"] not in out


def test_bad_config_exits_2_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("site: {id: s1}\nunknown_key: 1\n")
    code, out = run("tokens", "list", "--config", str(bad))
    assert code == 2 and "unknown_key" in out and str(bad) in out
    code, out = run("tokens", "list", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "does not exist" in out


def test_authenticate_static_and_database_tokens(db: Database, audit_log: AuditLog) -> None:
    static = [StaticToken(name="ops", role="admin", sha256=token_sha256("static-secret"))]
    token = create_token(db, audit_log, "c1", "coordinator", "test")
    assert authenticate(db, static, "static-secret") == TokenInfo("ops", "admin", "config")
    assert authenticate(db, static, token) == TokenInfo("c1", "coordinator", "database")
    for bad in (None, "", "static-secre", token + "x", token[:-1], "x" * 10_000):
        assert authenticate(db, static, bad) is None


def test_authenticate_compares_every_candidate_in_constant_time(
    db: Database, audit_log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(3):
        create_token(db, audit_log, f"c{i}", "coordinator", "test")
    static = [StaticToken(name="ops", role="admin", sha256=token_sha256("static-secret"))]
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens_mod.hmac, "compare_digest", spy)
    assert authenticate(db, static, "static-secret") is not None
    assert len(calls) == 4  # no early exit after the match
    calls.clear()
    assert authenticate(db, static, "wrong") is None
    assert len(calls) == 4
    assert all(a == hashlib.sha256(b"wrong").hexdigest().encode() for a, _ in calls)


def test_revoked_token_fails_and_names_are_checked(db: Database, audit_log: AuditLog) -> None:
    token = create_token(db, audit_log, "c1", "coordinator", "test")
    revoke_token(db, audit_log, "c1", "admin:x")
    assert authenticate(db, [], token) is None
    [record] = list_tokens(db)
    assert record.revoked_by == "admin:x" and not record.active
    assert record.created_at.tzinfo is not None and record.revoked_at is not None
    assert list_tokens(db, include_revoked=False) == []
    for bad in ("", "has space", "x" * 65, "-lead", "naïve"):
        with pytest.raises(TokenError, match="token name"):
            create_token(db, audit_log, bad, "coordinator", "test")
    with pytest.raises(TokenError, match="no active token"):
        revoke_token(db, audit_log, "nobody", "test")
    assert [e["action"] for e in audit_log.events()] == ["token.created", "token.revoked"]


def test_roles_do_not_include_each_other() -> None:
    coord = TokenInfo("c", "coordinator", "database")
    admin = TokenInfo("a", "admin", "config")
    assert has_role(coord, "coordinator") and not has_role(coord, "admin")
    assert has_role(admin, "admin") and not has_role(admin, "coordinator")
    assert not has_role(None, "coordinator")
    with pytest.raises(TokenError, match="role 'root'"):
        has_role(admin, "root")


def _later(monkeypatch: pytest.MonkeyPatch, moment: datetime) -> None:
    """Move the tokens module's clock to MOMENT."""
    monkeypatch.setattr(tokens_mod, "utcnow", lambda: moment)


def test_parse_token_expiry_takes_lifetimes_dates_and_date_times() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert parse_token_expiry("90d", now) == now + timedelta(days=90)
    assert parse_token_expiry("12h", now) == now + timedelta(hours=12)
    assert parse_token_expiry(" 30m ", now) == now + timedelta(minutes=30)
    assert parse_token_expiry("2W", now) == now + timedelta(weeks=2)
    # A date: valid through that day (UTC), as for plan approvals.
    assert parse_token_expiry("2027-01-31", now) == datetime(2027, 2, 1, tzinfo=UTC)
    assert parse_token_expiry("2027-01-31T10:00+01:00", now) == datetime(2027, 1, 31, 9, tzinfo=UTC)
    for bad in ("soon", "0d", "-3d", "5y", "2027-01-31T10:00", ""):
        with pytest.raises(TokenError, match="expiry"):
            parse_token_expiry(bad, now)
    with pytest.raises(TokenError, match="in the past"):
        parse_token_expiry("2026-11-01", now)


def test_an_expired_token_is_refused_naming_it_until_revoked(
    db: Database, audit_log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    token = create_token(db, audit_log, "c1", "coordinator", "test", expires_at=expires)
    forever = create_token(db, audit_log, "c2", "coordinator", "test")
    assert authenticate(db, [], token) == TokenInfo("c1", "coordinator", "database")
    [record, _] = list_tokens(db)
    assert record.expires_at == expires and record.status() == "active"

    _later(monkeypatch, expires)
    with pytest.raises(TokenExpired) as info:
        authenticate(db, [], token)
    assert info.value.name == "c1" and info.value.expires_at == expires
    assert "token 'c1' expired at" in str(info.value)
    assert authenticate(db, [], forever) == TokenInfo("c2", "coordinator", "database")
    assert [r.status(expires) for r in list_tokens(db)] == ["expired", "active"]
    # The name stays taken until the expired token is revoked.
    with pytest.raises(TokenError, match=r"expired at .* but is not revoked"):
        create_token(db, audit_log, "c1", "coordinator", "test")
    revoke_token(db, audit_log, "c1", "test")
    assert authenticate(db, [], token) is None
    events = audit_log.events(action="token.created")
    assert events[0]["details"] == {"name": "c1", "role": "coordinator", "expires_at": expires.isoformat()}


def test_a_token_cannot_be_created_already_expired(db: Database, audit_log: AuditLog) -> None:
    with pytest.raises(TokenError, match="in the past"):
        create_token(db, audit_log, "c1", "coordinator", "test", expires_at=datetime.now(UTC))
    with pytest.raises(TokenError, match="time zone"):
        create_token(db, audit_log, "c1", "coordinator", "test", expires_at=datetime(2099, 1, 1))
    assert list_tokens(db) == [] and audit_log.events() == []


def test_cli_adds_tokens_with_an_expiry_and_lists_it(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, db_url)
    code, out = run(
        "tokens", "add", "c1", "--role", "coordinator", "--expires", "7d", "--config", str(config)
    )
    assert code == 0 and "valid until" in out, out
    token = out.strip().splitlines()[-1]
    code, out = run(
        "tokens", "add", "c2", "--role", "admin", "--expires", "2027-01-31", "--config", str(config)
    )
    assert code == 0, out
    code, out = run("tokens", "add", "c3", "--role", "admin", "--expires", "later", "--config", str(config))
    assert code == 1 and "expiry 'later'" in out

    code, out = run("tokens", "list", "--config", str(config))
    assert code == 0 and "EXPIRES" in out and "2027-02-01T00:00:00+00:00" in out
    code, out = run("tokens", "list", "--json", "--config", str(config))
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["c2"]["expires_at"] == "2027-02-01T00:00:00+00:00" and rows["c1"]["status"] == "active"
    assert "c3" not in rows

    _later(monkeypatch, datetime.now(UTC) + timedelta(days=8))
    code, out = run("tokens", "list", "--json", "--config", str(config))
    assert {r["name"]: r["status"] for r in json.loads(out)} == {"c1": "expired", "c2": "active"}
    db = open_database(db_url)
    try:
        with pytest.raises(TokenExpired):
            authenticate(db, [], token)
    finally:
        db.dispose()
