"""The privacy ledger's table: one row per round that trained (or may train) with DP.

Rows live in the audit database and are covered by the audit hash chain: the canonical
hash of every row is recorded in an audit event when the row is written (`privacy.reserved`)
and again when the round's cost is settled (`privacy.spent`), and `fedsite audit verify`
recomputes each row's hash against those events (`agent.privacy.ledger.verify_ledger`).
"""

from __future__ import annotations

from sqlalchemy import Float, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from agent.db.base import Base


class PrivacyLedgerRow(Base):
    """One DP round's draw on a dataset's budget.

    Keyed by the dataset's fingerprint (not its configured name, the coordinator or the run):
    every coordinator training on the same data draws on one budget. ``status`` is
    ``reserved`` from the moment the site accepts the round (the planned ``planned_steps``
    count against the budget) until the round ends, then ``spent`` with ``steps`` the noisy
    steps it actually took and ``epsilon_after`` the dataset's ε with this row included.
    """

    __tablename__ = "privacy_ledger"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    dataset: Mapped[str] = mapped_column(String(64))
    round_id: Mapped[str] = mapped_column(String(128), unique=True)
    requester: Mapped[str] = mapped_column(String(200))
    plan_hash: Mapped[str] = mapped_column(String(64))
    noise_multiplier: Mapped[float] = mapped_column(Float)
    sample_rate: Mapped[float] = mapped_column(Float)
    max_grad_norm: Mapped[float] = mapped_column(Float)
    planned_steps: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    delta: Mapped[float] = mapped_column(Float)
    accountant: Mapped[str] = mapped_column(String(8))
    epsilon_after: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    # ISO-8601 UTC text, as hashed.
    reserved_at: Mapped[str] = mapped_column(String(40))
    settled_at: Mapped[str | None] = mapped_column(String(40), nullable=True)
