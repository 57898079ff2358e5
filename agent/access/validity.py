"""When a grant (an API token, a plan approval) is in force: not revoked and not past its expiry.

Both kinds of grant are revoked by a person and may carry an expiry; one rule says which of the
two ends a grant first, so that `tokens list` and `plans list` can never disagree on it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

GrantStatus = Literal["active", "revoked", "expired"]


def grant_status(revoked_at: datetime | None, expires_at: datetime | None, now: datetime) -> GrantStatus:
    """'revoked' once revoked (whatever its expiry), else 'expired' from its expiry on, else 'active'.

    NOW is the caller's clock, so that each module keeps the one clock its tests control.
    """
    if revoked_at is not None:
        return "revoked"
    if expires_at is not None and expires_at <= now:
        return "expired"
    return "active"
