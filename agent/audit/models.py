"""Tables of the audit chain.

Timestamps of the audit chain are ISO-8601 UTC strings with microseconds, because they are
hashed: the text that was hashed must come back byte for byte from either database.
"""

from __future__ import annotations

from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from agent.db.base import Base

HASH_LEN = 64  # hex SHA-256
GENESIS_HASH = "0" * HASH_LEN


class AuditEvent(Base):
    """One event of the hash-chained audit log.

    `id` is the event's position in the chain (1, 2, 3, ...), assigned by the appender while
    it holds the chain lock, never by a database sequence: a sequence skips numbers on a
    rolled-back insert, and a gap must mean a deleted event.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ts: Mapped[str] = mapped_column(String(40))
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100), index=True)
    # Canonical JSON (sorted keys, no spaces): the exact text covered by `hash`.
    details: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(HASH_LEN))
    hash: Mapped[str] = mapped_column(String(HASH_LEN))


class AuditChainHead(Base):
    """The one row naming the newest event, updated in the same transaction as each append.

    It lets `verify` notice events deleted from the end of the log (which leave no gap) and
    forged events appended without the chain lock. Someone who can rewrite the database can
    rewrite this row too; against that, compare the head with one exported earlier
    (`fedsite audit verify --anchor ID:HASH`).
    """

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_id: Mapped[int] = mapped_column(Integer)
    last_hash: Mapped[str] = mapped_column(String(HASH_LEN))
