"""The hash-chained, append-only audit log.

Each event's `hash` is the SHA-256 of the canonical JSON (sorted keys, no spaces, UTF-8)
of the list `[id, ts, actor, action, details, prev_hash]`, where `prev_hash` is the previous
event's hash (64 zeros for event 1). Changing any stored field, deleting an event,
inserting one or swapping two breaks either an event's own hash, the id sequence or the
link to its predecessor; `verify` reports the first event where that happens.

What a hash chain without a secret cannot show by itself: someone with write access who
rewrites the whole tail consistently, or deletes the newest events and the chain-head row
together. Against that, keep the head that `verify` reports (`N events, head <hash>`)
outside the site — a SIEM fed by `fedsite audit export` does — and check it later with
`fedsite audit verify --anchor ID:HASH`.

What goes into `details` is decided by the callers and is exported to SIEMs: counts,
hashes, ids, names of configured datasets, metrics. Never pixel data, file paths, patient
or DICOM header values, tokens or weights.

Appends are serialised across processes (SQLite: `BEGIN IMMEDIATE`; PostgreSQL:
`pg_advisory_xact_lock`), so several agent processes and CLI commands can share one log.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.orm import Session

from agent.audit.models import GENESIS_HASH, AuditChainHead, AuditEvent
from agent.db.engine import Database
from agent.errors import AuditError

LOCK_NAME = "fedsite.audit_chain"
MAX_DETAILS_CHARS = 64 * 1024
MAX_LIMIT = 10_000
_ACTION = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEAD_ROW = 1
_EVENT_COLUMNS = (
    AuditEvent.id,
    AuditEvent.ts,
    AuditEvent.actor,
    AuditEvent.action,
    AuditEvent.details,
    AuditEvent.prev_hash,
    AuditEvent.hash,
)


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, no NaN/Infinity, UTF-8 kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def event_hash(event_id: int, ts: str, actor: str, action: str, details: Any, prev_hash: str) -> str:
    payload = canonical_json([event_id, ts, actor, action, details, prev_hash])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _check_value(value: Any, where: str) -> None:
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditError(f"audit details: {where} is {value}; only finite numbers can be recorded")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditError(f"audit details: key {key!r} in {where} is not a string")
            _check_value(item, f"{where}.{key}")
        return
    raise AuditError(
        f"audit details: {where} is a {type(value).__name__}; record only strings, numbers, "
        "booleans, null, lists and objects"
    )


def _details_text(details: dict[str, Any]) -> str:
    if not isinstance(details, dict):
        raise AuditError(f"audit details must be an object, got {type(details).__name__}")
    _check_value(details, "details")
    text = canonical_json(details)
    if len(text) > MAX_DETAILS_CHARS:
        raise AuditError(
            f"audit details are {len(text)} characters, more than {MAX_DETAILS_CHARS}; "
            "record counts, hashes and ids, not data"
        )
    return text


def _check_action_actor(action: str, actor: str) -> None:
    if not isinstance(action, str) or len(action) > 100 or not _ACTION.fullmatch(action):
        raise AuditError(f"audit action {action!r}: must be a dotted lower-case name like 'round.queued'")
    if not isinstance(actor, str) or not actor or len(actor) > 200 or not actor.isprintable():
        raise AuditError(f"audit actor {actor!r}: must be 1-200 printable characters")


def _now_ts() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class ChainReport:
    """The result of `AuditLog.verify`.

    `count` is the number of events checked, `last_id`/`head_hash` the newest event (what an
    admin keeps as an anchor), `first_bad_id` the first event that fails (None when ok).
    """

    ok: bool
    count: int
    first_bad_id: int | None = None
    reason: str = ""
    last_id: int = 0
    head_hash: str = GENESIS_HASH

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.ok:
            return f"OK: {self.count} events, head {self.head_hash}"
        where = f"event {self.first_bad_id}" if self.first_bad_id is not None else "chain head"
        return f"FAILED at {where}: {self.reason}"


def _row_dict(row: Any) -> dict[str, Any]:
    try:
        details = json.loads(row.details)
    except ValueError:
        details = {"unparseable": row.details}
    return {
        "id": row.id,
        "ts": row.ts,
        "actor": row.actor,
        "action": row.action,
        "details": details,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }


def parse_anchor(text: str) -> tuple[int, str]:
    """Parse `ID:HASH` (as printed by `verify`'s head) into (id, hash); ValueError names the problem."""
    event_id, sep, digest = text.strip().partition(":")
    if not sep or not event_id.isdigit() or not _HEX64.fullmatch(digest.lower()):
        raise ValueError(f"anchor {text!r}: expected EVENT_ID:SHA256 (e.g. 42:3fa9...), 64 hex digits")
    return int(event_id), digest.lower()


class AuditLog:
    """The audit log of one database. Cheap to create; safe to use from several processes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- writing -------------------------------------------------------------------------

    def append(self, action: str, *, actor: str, details: dict[str, Any]) -> int:
        """Record one event and return its id (its position in the chain).

        On SQLite, do not call this while the same thread holds an open write transaction
        on another connection (it would wait for itself); record the event inside
        `transaction()` instead.
        """
        text = _details_text(details)
        _check_action_actor(action, actor)
        with self.db.locked_connection(LOCK_NAME) as conn:
            return self._append_locked(conn, action, actor, text)

    @contextmanager
    def transaction(self) -> Iterator[AuditTransaction]:
        """A session holding the chain lock, so that a state change and its audit events commit
        together or not at all: `with audit.transaction() as tx: tx.session.add(...);
        tx.record("token.created", actor=..., details=...)`."""
        with self.db.locked_session(LOCK_NAME) as session:
            yield AuditTransaction(self, session)

    def _append_locked(self, conn: Connection, action: str, actor: str, details_text: str) -> int:
        head = conn.execute(select(AuditChainHead).where(AuditChainHead.id == _HEAD_ROW)).first()
        if head is None:
            # First event ever, or the head row was lost: continue from the newest event so
            # that a damaged log is not made worse; verify reports the damage.
            last = conn.execute(select(AuditEvent.id, AuditEvent.hash).order_by(AuditEvent.id.desc())).first()
            last_id, last_hash = (last.id, last.hash) if last is not None else (0, GENESIS_HASH)
        else:
            last_id, last_hash = head.last_id, head.last_hash
        event_id = last_id + 1
        ts = _now_ts()
        digest = event_hash(event_id, ts, actor, action, json.loads(details_text), last_hash)
        conn.execute(
            insert(AuditEvent).values(
                id=event_id,
                ts=ts,
                actor=actor,
                action=action,
                details=details_text,
                prev_hash=last_hash,
                hash=digest,
            )
        )
        if head is None:
            conn.execute(insert(AuditChainHead).values(id=_HEAD_ROW, last_id=event_id, last_hash=digest))
        else:
            conn.execute(
                update(AuditChainHead)
                .where(AuditChainHead.id == _HEAD_ROW)
                .values(last_id=event_id, last_hash=digest)
            )
        return event_id

    # -- reading -------------------------------------------------------------------------

    def events(
        self, *, since_id: int = 0, limit: int = 100, action: str | None = None
    ) -> list[dict[str, Any]]:
        """Events with id > since_id, oldest first, at most `limit` (1..10000)."""
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
        if since_id < 0:
            raise ValueError(f"since_id must be >= 0, got {since_id}")
        query = select(AuditEvent).where(AuditEvent.id > since_id)
        if action is not None:
            query = query.where(AuditEvent.action == action)
        query = query.order_by(AuditEvent.id).limit(limit)
        with self.db.session() as s:
            return [_row_dict(row) for row in s.scalars(query)]

    def tail(self, n: int = 20, *, action: str | None = None) -> list[dict[str, Any]]:
        """The newest `n` events (of `action` only, if given), oldest first."""
        if not 1 <= n <= MAX_LIMIT:
            raise ValueError(f"n must be between 1 and {MAX_LIMIT}, got {n}")
        query = select(AuditEvent)
        if action is not None:
            query = query.where(AuditEvent.action == action)
        with self.db.session() as s:
            rows = list(s.scalars(query.order_by(AuditEvent.id.desc()).limit(n)))
        return [_row_dict(row) for row in reversed(rows)]

    def iter_all(self, *, since_id: int = 0, batch: int = 1000) -> Iterator[dict[str, Any]]:
        """Every event with id > since_id, oldest first, from one consistent snapshot (for export)."""
        with self.db.read_snapshot() as conn:
            last = since_id
            while True:
                rows = conn.execute(
                    select(*_EVENT_COLUMNS).where(AuditEvent.id > last).order_by(AuditEvent.id).limit(batch)
                ).all()
                yield from (_row_dict(row) for row in rows)
                if len(rows) < batch:
                    return
                last = rows[-1].id

    def find(self, action: str, **match: Any) -> list[dict[str, Any]]:
        """Events of `action` whose details contain every `key=value` of `match`, oldest first."""
        query = select(AuditEvent).where(AuditEvent.action == action)
        for key, value in match.items():
            # A cheap pre-filter on the canonical text; the exact test is done on the parsed JSON.
            query = query.where(
                AuditEvent.details.contains(canonical_json({key: value})[1:-1], autoescape=True)
            )
        with self.db.session() as s:
            rows = [_row_dict(row) for row in s.scalars(query.order_by(AuditEvent.id))]
        return [r for r in rows if all(k in r["details"] and r["details"][k] == v for k, v in match.items())]

    def head(self) -> tuple[int, str]:
        """(id, hash) of the newest event as recorded in the chain head; (0, 64 zeros) when empty."""
        with self.db.session() as s:
            row = s.get(AuditChainHead, _HEAD_ROW)
            return (row.last_id, row.last_hash) if row is not None else (0, GENESIS_HASH)

    def actions(self) -> list[str]:
        """The distinct actions recorded so far, sorted (what an event filter can offer)."""
        with self.db.session() as s:
            return sorted(s.scalars(select(AuditEvent.action).distinct()))

    def count(self) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(AuditEvent)) or 0)

    # -- verification --------------------------------------------------------------------

    def verify(self, *, anchor: tuple[int, str] | None = None, batch: int = 2000) -> ChainReport:
        """Check every event's hash, the id sequence, each link and the chain head.

        `anchor` is an (id, hash) pair kept outside the database; the event with that id must
        still exist with that hash, which also catches a truncated log.
        """
        expected_id = 1
        prev_hash = GENESIS_HASH
        count = 0
        anchor_seen = False

        def bad(event_id: int | None, reason: str) -> ChainReport:
            return ChainReport(False, count, event_id, reason, expected_id - 1, prev_hash)

        with self.db.read_snapshot() as conn:
            # No lower bound on the first batch: a row forged with id 0 or below is invisible
            # to `events` and export but not to `find`, so verify must read and name it.
            last_seen: int | None = None
            while True:
                query = select(*_EVENT_COLUMNS)
                if last_seen is not None:
                    query = query.where(AuditEvent.id > last_seen)
                rows = conn.execute(query.order_by(AuditEvent.id).limit(batch)).all()
                for row in rows:
                    if row.id != expected_id:
                        if row.id < expected_id:
                            return bad(
                                row.id, f"event id {row.id} is out of sequence (expected {expected_id})"
                            )
                        missing = (
                            f"event {expected_id} is missing"
                            if row.id == expected_id + 1
                            else f"events {expected_id}-{row.id - 1} are missing"
                        )
                        return bad(expected_id, f"{missing} (deleted?); the next event is {row.id}")
                    problem = self._check_row(row, prev_hash)
                    if problem:
                        return bad(row.id, problem)
                    if anchor is not None and row.id == anchor[0]:
                        if row.hash != anchor[1]:
                            return bad(row.id, f"hash {row.hash} differs from the anchor {anchor[1]}")
                        anchor_seen = True
                    prev_hash = row.hash
                    expected_id += 1
                    count += 1
                if len(rows) < batch:
                    break
                last_seen = rows[-1].id
            head = conn.execute(
                select(AuditChainHead.last_id, AuditChainHead.last_hash).where(AuditChainHead.id == _HEAD_ROW)
            ).first()

        last_id = expected_id - 1
        if head is None:
            if count:
                return ChainReport(False, count, None, "the chain head row is missing", last_id, prev_hash)
        elif head.last_id != last_id or head.last_hash != prev_hash:
            if head.last_id > last_id:
                reason = (
                    f"the chain head records event {head.last_id}, but the log ends at event {last_id}: "
                    f"events {last_id + 1}-{head.last_id} were deleted"
                )
                return ChainReport(False, count, last_id + 1, reason, last_id, prev_hash)
            if head.last_id < last_id:
                reason = (
                    f"event {head.last_id + 1} and later were written after the chain head "
                    f"(event {head.last_id}) without the chain lock: forged?"
                )
                return ChainReport(False, count, head.last_id + 1, reason, last_id, prev_hash)
            return ChainReport(
                False,
                count,
                last_id,
                "the chain head's hash differs from the last event's",
                last_id,
                prev_hash,
            )
        if anchor is not None and not anchor_seen:
            return ChainReport(
                False,
                count,
                anchor[0],
                f"the anchor's event {anchor[0]} is not in the log (it ends at event {last_id}): truncated?",
                last_id,
                prev_hash,
            )
        return ChainReport(True, count, None, "", last_id, prev_hash)

    @staticmethod
    def _check_row(row: Any, prev_hash: str) -> str:
        try:
            details = json.loads(row.details)
        except ValueError:
            return "details are not valid JSON (edited?)"
        if canonical_json(details) != row.details:
            return "details are not in canonical form (edited?)"
        recomputed = event_hash(row.id, row.ts, row.actor, row.action, details, row.prev_hash)
        if recomputed != row.hash:
            return "content does not match its hash (edited, or moved from another position)"
        if row.prev_hash != prev_hash:
            return (
                f"its prev_hash does not match event {row.id - 1}'s hash "
                "(an event before it was replaced, inserted or reordered)"
                if row.id > 1
                else "its prev_hash is not the genesis value (events before it were removed?)"
            )
        return ""


class AuditTransaction:
    """A session that holds the chain lock; `record` appends an event in the same transaction."""

    def __init__(self, log: AuditLog, session: Session) -> None:
        self.log = log
        self.session = session

    def record(self, action: str, *, actor: str, details: dict[str, Any]) -> int:
        text = _details_text(details)
        _check_action_actor(action, actor)
        self.session.flush()
        return self.log._append_locked(self.session.connection(), action, actor, text)
