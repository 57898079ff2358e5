"""Token and approval checks that a mutation run (`make mutation`) showed no test noticed.

Boundaries (an expiry exactly now, a token of exactly the longest length, a note of exactly
the longest length), which row a revocation touches, what is recorded and listed, and that
instants are converted to UTC even on a host whose local time is not UTC.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from agent.access import approvals as approvals_mod
from agent.access import tokens as tokens_mod
from agent.access.approvals import (
    MAX_NOTE_CHARS,
    ApprovalRecord,
    approve_plan,
    check_plan_hash,
    is_approved,
    list_approvals,
    parse_expiry,
    revoke_approval,
)
from agent.access.tokens import (
    MAX_TOKEN_CHARS,
    TokenRecord,
    authenticate,
    check_name,
    check_role,
    create_token,
    list_tokens,
    parse_token_expiry,
    revoke_token,
)
from agent.audit.chain import AuditLog
from agent.config import StaticToken
from agent.db.engine import Database
from agent.errors import ApprovalError, TokenError

H1 = "1" * 64
FIXED = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
PLUS_TWO = timezone(timedelta(hours=2))


@pytest.fixture
def local_time_not_utc() -> Iterator[None]:
    """Local time at UTC+05:30, so that a conversion to local time instead of UTC shows."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Kolkata"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


# -- tokens -----------------------------------------------------------------------------------


def test_token_record_status_names_revoked_expired_and_active() -> None:
    record = TokenRecord("a", "admin", FIXED, "me", None, None, FIXED)
    assert record.status(FIXED - timedelta(microseconds=1)) == "active"
    assert record.status(FIXED) == "expired"
    revoked = TokenRecord("a", "admin", FIXED, "me", FIXED, "me", FIXED)
    assert revoked.status(FIXED - timedelta(days=1)) == "revoked"
    assert not revoked.active


def test_name_and_role_refusals_say_what_is_allowed() -> None:
    with pytest.raises(TokenError) as err:
        check_name("-x")
    assert str(err.value) == (
        "token name '-x': use 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
    )
    with pytest.raises(TokenError) as err:
        check_role("root")
    assert str(err.value) == "role 'root': must be one of coordinator, admin"


def test_token_expiry_exactly_now_is_in_the_past() -> None:
    with pytest.raises(TokenError, match=r"^expiry '2031-05-06T07:08:09.123456\+00:00' is in the past$"):
        parse_token_expiry(FIXED.isoformat(), now=FIXED)
    later = FIXED + timedelta(microseconds=1)
    assert parse_token_expiry(later.isoformat(), now=FIXED) == later
    with pytest.raises(TokenError) as err:
        parse_token_expiry("soon", now=FIXED)
    assert str(err.value) == (
        "expiry 'soon': expected a lifetime (e.g. 90d, 12h, 30m, 2w), "
        "a date YYYY-MM-DD or an ISO-8601 date-time with an offset"
    )


def test_create_token_refuses_an_expiry_exactly_now_or_without_a_zone(
    db: Database, audit_log: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens_mod, "utcnow", lambda: FIXED)
    with pytest.raises(TokenError, match=r"^expiry 2031-05-06T07:08:09.123456\+00:00 is in the past$"):
        create_token(db, audit_log, "t1", "admin", "me", expires_at=FIXED)
    with pytest.raises(TokenError, match=r"^a token's expiry needs a time zone$"):
        create_token(db, audit_log, "t1", "admin", "me", expires_at=datetime(2040, 1, 1))
    assert audit_log.count() == 0


def test_create_token_records_the_expiry_in_utc(
    db: Database, audit_log: AuditLog, local_time_not_utc: None
) -> None:
    expires = datetime(2040, 1, 1, 12, 0, tzinfo=PLUS_TWO)
    token = create_token(db, audit_log, "t1", "admin", "me", expires_at=expires)
    assert len(token) == 43  # 32 random bytes, URL-safe base64
    (event,) = audit_log.find("token.created", name="t1")
    assert event["details"] == {"name": "t1", "role": "admin", "expires_at": "2040-01-01T10:00:00+00:00"}


def test_revoke_touches_only_the_named_token_and_lists_say_who_created(
    db: Database, audit_log: AuditLog
) -> None:
    create_token(db, audit_log, "a", "admin", "admin:one")
    create_token(db, audit_log, "b", "coordinator", "admin:two")
    revoke_token(db, audit_log, "b", "admin:three")
    listed = {r.name: r for r in list_tokens(db)}
    assert listed["a"].revoked_at is None and listed["b"].revoked_by == "admin:three"
    assert (listed["a"].created_by, listed["b"].created_by) == ("admin:one", "admin:two")
    assert [r.name for r in list_tokens(db, include_revoked=False)] == ["a"]


def test_a_token_of_exactly_the_longest_length_is_checked(db: Database) -> None:
    longest = "t" * MAX_TOKEN_CHARS
    static = [StaticToken(name="long", role="admin", sha256=hashlib.sha256(longest.encode()).hexdigest())]
    info = authenticate(db, static, longest)
    assert info is not None and info.name == "long"
    static = [StaticToken(name="longer", role="admin", sha256=hashlib.sha256(b"t" * 513).hexdigest())]
    assert authenticate(db, static, "t" * (MAX_TOKEN_CHARS + 1)) is None


# -- approvals --------------------------------------------------------------------------------


def test_approval_record_expired_exactly_at_its_expiry() -> None:
    record = ApprovalRecord(H1, "me", FIXED, FIXED, None, None, "")
    assert record.status(FIXED - timedelta(microseconds=1)) == "active"
    assert record.status(FIXED) == "expired"


@pytest.mark.parametrize("value", [None, 42, b"1" * 64])
def test_a_plan_hash_that_is_not_text_is_an_approval_error(value: object) -> None:
    with pytest.raises(ApprovalError, match=r"expected 64 hex digits"):
        check_plan_hash(value)  # type: ignore[arg-type]


def test_parse_expiry_gives_utc_on_a_host_whose_local_time_is_not_utc(local_time_not_utc: None) -> None:
    moment = parse_expiry("2040-01-01T12:00:00+02:00")
    assert moment.isoformat() == "2040-01-01T10:00:00+00:00"


def test_an_approval_is_no_longer_active_exactly_at_its_expiry(db: Database, audit_log: AuditLog) -> None:
    expires = datetime.now(UTC) + timedelta(days=1)
    approve_plan(db, audit_log, H1, "admin:a", expires)
    assert is_approved(db, H1, expires - timedelta(microseconds=1))
    assert not is_approved(db, H1, expires)
    assert list_approvals(db, include_inactive=False, now=expires) == []


def test_approve_plan_boundaries_and_what_it_records(
    db: Database, audit_log: AuditLog, monkeypatch: pytest.MonkeyPatch, local_time_not_utc: None
) -> None:
    record = approve_plan(db, audit_log, H1, "admin:a", note="x" * MAX_NOTE_CHARS)
    assert record.note == "x" * MAX_NOTE_CHARS
    plain = approve_plan(db, audit_log, H1, "admin:a", datetime(2040, 1, 1, 12, tzinfo=PLUS_TWO))
    assert plain.note == ""
    assert plain.approved_at is not None and plain.approved_at.tzinfo is not None
    assert [a.approved_at for a in list_approvals(db)] == [record.approved_at, plain.approved_at]
    (_, event) = audit_log.find("plan.approved", plan_hash=H1)
    assert event["details"] == {"plan_hash": H1, "expires_at": "2040-01-01T10:00:00+00:00"}
    with pytest.raises(ApprovalError, match=r"^expiry must carry a time zone$"):
        approve_plan(db, audit_log, H1, "admin:a", datetime(2040, 1, 1))
    monkeypatch.setattr(approvals_mod, "utcnow", lambda: FIXED)
    with pytest.raises(ApprovalError, match=r"^expiry 2031-05-06T07:08:09.123456\+00:00 is in the past$"):
        approve_plan(db, audit_log, H1, "admin:a", FIXED)


def test_revoke_records_the_hash_and_how_many_approvals_it_ended(db: Database, audit_log: AuditLog) -> None:
    approve_plan(db, audit_log, H1, "admin:a")
    approve_plan(db, audit_log, H1, "admin:b")
    assert revoke_approval(db, audit_log, H1, "admin:c") == 2
    (event,) = audit_log.find("plan.revoked")
    assert event["details"] == {"plan_hash": H1, "approvals": 2}
    assert event["actor"] == "admin:c"
