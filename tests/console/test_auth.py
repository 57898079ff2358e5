"""Console accounts and sessions (`agent.console.auth`), `fedsite admin-users`, and the login
throttle's look-ahead (`RefusalGuard.retry_after`)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select, update
from typer.testing import CliRunner

from agent.api.throttle import RefusalGuard
from agent.audit.chain import AuditLog
from agent.cli import app
from agent.config import RefusalsConfig
from agent.console.auth import (
    add_admin,
    create_session,
    csrf_matches,
    end_session,
    list_admins,
    remove_admin,
    session_of,
    set_password,
    verify_login,
)
from agent.console.models import AdminSession, AdminUser
from agent.db.base import utcnow
from agent.db.engine import Database
from agent.errors import AdminUserError

PASSWORD = "a long enough passphrase"
HOUR = timedelta(hours=1)


def test_an_account_keeps_an_argon2id_hash_and_its_changes_are_audited(db: Database) -> None:
    audit = AuditLog(db)
    add_admin(db, audit, "alice", PASSWORD, "cli:root")
    with db.session() as s:
        stored = s.scalar(select(AdminUser.password_hash))
    assert stored is not None and stored.startswith("$argon2id$") and PASSWORD not in stored
    assert verify_login(db, "alice", PASSWORD)
    assert not verify_login(db, "alice", PASSWORD + "x")
    assert not verify_login(db, "bob", PASSWORD)
    assert not verify_login(db, "", "")
    assert [a.name for a in list_admins(db)] == ["alice"]
    with pytest.raises(AdminUserError, match="exists already"):
        add_admin(db, audit, "alice", PASSWORD, "cli:root")
    set_password(db, audit, "alice", "another long passphrase", "cli:root")
    assert not verify_login(db, "alice", PASSWORD)
    assert verify_login(db, "alice", "another long passphrase")
    remove_admin(db, audit, "alice", "cli:root")
    assert not verify_login(db, "alice", "another long passphrase") and list_admins(db) == []
    # The name is free again once removed.
    add_admin(db, audit, "alice", PASSWORD, "cli:root")
    events = [
        (e["action"], e["actor"], e["details"]["admin"]) for e in audit.tail(10) if "admin" in e["details"]
    ]
    assert events == [
        ("console.admin_added", "cli:root", "alice"),
        ("console.admin_password_changed", "cli:root", "alice"),
        ("console.admin_removed", "cli:root", "alice"),
        ("console.admin_added", "cli:root", "alice"),
    ]
    assert all(PASSWORD not in str(e) for e in audit.tail(10))


@pytest.mark.parametrize(
    ("name", "password", "problem"),
    [
        ("alice", "short", "at least 12"),
        ("alice", "x" * 2000, "at most"),
        ("alice", "line one\nline two", "control characters"),
        ("-alice", PASSWORD, "admin name"),
        ("al ice", PASSWORD, "admin name"),
        ("", PASSWORD, "admin name"),
    ],
)
def test_a_bad_name_or_password_is_refused_with_the_reason(
    db: Database, name: str, password: str, problem: str
) -> None:
    with pytest.raises(AdminUserError, match=problem):
        add_admin(db, AuditLog(db), name, password, "cli:root")
    assert list_admins(db) == []


def test_a_session_ends_at_logout_when_idle_when_expired_and_with_its_account(db: Database) -> None:
    audit = AuditLog(db)
    add_admin(db, audit, "alice", PASSWORD, "cli:root")
    token, session = create_session(db, "alice", HOUR)
    with db.session() as s:
        stored = s.scalars(select(AdminSession)).one()
    assert stored.token_sha256 != token and token not in stored.token_sha256
    found = session_of(db, token, idle=HOUR)
    assert found is not None and found.user == "alice" and found.csrf_token == session.csrf_token
    assert session_of(db, token + "x", idle=HOUR) is None
    assert session_of(db, None, idle=HOUR) is None
    end_session(db, session)
    assert session_of(db, token, idle=HOUR) is None

    idle_token, _ = create_session(db, "alice", HOUR)
    with db.session() as s:
        s.execute(update(AdminSession).values(last_seen_at=utcnow() - timedelta(minutes=31)))
        s.commit()
    assert session_of(db, idle_token, idle=timedelta(minutes=30)) is None

    old_token, _ = create_session(db, "alice", timedelta(minutes=1))
    with db.session() as s:
        s.execute(
            update(AdminSession)
            .where(AdminSession.ended_at.is_(None))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        s.commit()
    assert session_of(db, old_token, idle=HOUR) is None

    kept, _ = create_session(db, "alice", HOUR)
    assert session_of(db, kept, idle=HOUR) is not None
    assert set_password(db, audit, "alice", "another long passphrase", "cli:root") == 1
    assert session_of(db, kept, idle=HOUR) is None
    again, _ = create_session(db, "alice", HOUR)
    assert remove_admin(db, audit, "alice", "cli:root") == 1
    assert session_of(db, again, idle=HOUR) is None
    with pytest.raises(AdminUserError):
        create_session(db, "alice", HOUR)


def test_csrf_tokens_must_match_exactly() -> None:
    assert csrf_matches("abc", "abc")
    assert not csrf_matches("abc", "abd")
    assert not csrf_matches("abc", "")
    assert not csrf_matches("abc", None)


def test_the_guard_tells_a_throttled_address_without_counting(audit_log: AuditLog) -> None:
    now = [100.0]
    guard = RefusalGuard(
        audit_log,
        RefusalsConfig(max_per_client=2, window_seconds=60),
        clock=lambda: now[0],
        action="console.login_refused",
    )
    assert guard.retry_after("10.0.0.1") is None
    assert guard.charge("10.0.0.1") is None
    assert guard.retry_after("10.0.0.1") is None
    assert guard.charge("10.0.0.1") is None
    assert guard.retry_after("10.0.0.1") == 60
    assert guard.retry_after("10.0.0.2") is None
    now[0] += 45
    assert guard.retry_after("10.0.0.1") == 15
    now[0] += 15
    assert guard.retry_after("10.0.0.1") is None
    guard.refused("10.0.0.1", actor="anonymous", reason="wrong name or password", details={"reason": "x"})
    assert [e["action"] for e in audit_log.tail(1)] == ["console.login_refused"]


# ---- fedsite admin-users ---------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"site": {"id": "site-1"}, "work_dir": "work", "database_url": db_url}))
    return path


def run(*args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), input=input)
    return result.exit_code, result.output


def test_admin_users_add_asks_twice_or_reads_a_file_and_list_and_remove(
    config: Path, db: Database, tmp_path: Path
) -> None:
    c = ("-c", str(config))
    code, out = run("admin-users", "add", "alice", *c, input=f"{PASSWORD}\n{PASSWORD}\n")
    assert code == 0, out
    assert "Created console admin 'alice'" in out and "console.enabled: true" in out and PASSWORD not in out
    assert verify_login(db, "alice", PASSWORD)
    code, out = run("admin-users", "add", "bob", *c, input=f"{PASSWORD}\nsomething else!!\n")
    assert code != 0 and not verify_login(db, "bob", PASSWORD)
    secret = tmp_path / "pw"
    secret.write_text("bob's passphrase here\nignored second line\n")
    code, out = run("admin-users", "add", "bob", "--password-file", str(secret), *c)
    assert code == 0, out
    assert verify_login(db, "bob", "bob's passphrase here")
    code, out = run("admin-users", "list", *c)
    assert code == 0 and "alice" in out and "bob" in out and "cli:" in out
    code, out = run("admin-users", "add", "alice", "--password-file", str(secret), *c)
    assert code == 1 and "exists already" in out
    code, out = run("admin-users", "add", "carol", "--password-file", str(tmp_path / "none"), *c)
    assert code == 2 and "cannot read" in out
    (tmp_path / "short").write_text("short\n")
    code, out = run("admin-users", "add", "carol", "--password-file", str(tmp_path / "short"), *c)
    assert code == 1 and "at least 12" in out
    code, out = run("admin-users", "password", "bob", "--password-file", str(tmp_path / "pw"), *c)
    assert code == 0 and "0 session(s) ended" in out
    code, out = run("admin-users", "remove", "bob", *c)
    assert code == 0 and "Removed console admin 'bob'" in out
    code, out = run("admin-users", "remove", "bob", *c)
    assert code == 1 and "no admin named 'bob'" in out
    assert [a.name for a in list_admins(db)] == ["alice"]
