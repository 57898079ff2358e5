"""Refused callers: throttled per client address, and audited in bounded, coalesced events.

Anyone who can reach the port can send requests without a token (or with a wrong one, or
without a client certificate). Each refusal used to be one audit row, and rows of a hash chain
cannot be removed: a flood filled the disk. `RefusalGuard` is the one place the API's
refusals go through (the token check in `agent.api.deps` and the mutual-TLS gate in
`agent.api.middleware`):

- it counts refusals per client address in fixed windows (`api.refusals.window_seconds`);
  past `api.refusals.max_per_client` an address is answered 429 with ``Retry-After`` until
  its window ends, without an audit row or log line of its own. A request with a valid token
  is never throttled (the token is checked first, one indexed read), so a coordinator is not
  locked out by a flood, even one from its own address (a shared NAT);
- it records refusals through `agent.audit.coalesce.CoalescingRecorder`: the first
  `api.refusals.audit_per_window` of each window as one ``api.refused`` event each, every
  further one (throttled ones included) counted in one ``api.refused.summary`` event per
  actor and reason when the window closes. A window adds a bounded number of events of
  bounded size, whatever the traffic.

The address table is bounded too (`max_clients`): when full, expired entries are dropped,
then the oldest.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.audit.coalesce import CoalescingRecorder
from agent.audit.sink import AuditSink
from agent.config import RefusalsConfig

REFUSED_ACTION = "api.refused"
THROTTLED_REASON = "too many refused requests"


@dataclass
class _Window:
    start: float
    count: int = 0


class RefusalGuard:
    """Per-address throttle of refused callers plus the coalesced audit of their refusals."""

    def __init__(
        self,
        audit: AuditSink,
        config: RefusalsConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        action: str = REFUSED_ACTION,
    ) -> None:
        self.config = config or RefusalsConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        # ACTION names the events (the admin console's failed logins use a name of their own).
        self.recorder = CoalescingRecorder(
            audit,
            action,
            window_s=self.config.window_seconds,
            detailed_per_window=self.config.audit_per_window,
            clock=clock,
            wall=wall,
        )

    def charge(self, client: str) -> int | None:
        """Count one refusal against CLIENT, unless it is throttled already: then return the
        seconds until its window ends (its answer is 429 with that Retry-After) and count
        nothing. One step under one lock, so that concurrent requests cannot slip past the
        limit together."""
        now = self._clock()
        with self._lock:
            window = self._windows.get(client)
            if window is None or now - window.start >= self.config.window_seconds:
                if window is None and len(self._windows) >= self.config.max_clients:
                    self._evict(now)
                window = self._windows[client] = _Window(now)
            if window.count >= self.config.max_per_client:
                return max(1, math.ceil(window.start + self.config.window_seconds - now))
            window.count += 1
            return None

    def retry_after(self, client: str) -> int | None:
        """The seconds until CLIENT's window ends if it is throttled now, else None; counts
        nothing. For a caller that must refuse a throttled address before checking what it sent
        (a login must not tell a throttled guesser that a password was right)."""
        now = self._clock()
        with self._lock:
            window = self._windows.get(client)
            if window is None or now - window.start >= self.config.window_seconds:
                return None
            if window.count < self.config.max_per_client:
                return None
            return max(1, math.ceil(window.start + self.config.window_seconds - now))

    def refused(self, client: str, *, actor: str, reason: str, details: dict[str, Any]) -> None:
        """Record a refusal of CLIENT (charged already) in full or in the window's summary."""
        self.recorder.record(actor=actor, reason=reason, client=client, details=details)

    def throttled(self, client: str, *, method: str, path: str) -> None:
        """Record that CLIENT was answered 429 (not counted against it again)."""
        self.recorder.record(
            actor="anonymous",
            reason=THROTTLED_REASON,
            client=client,
            details={"reason": THROTTLED_REASON, "method": method, "path": path, "client": client},
        )

    def flush_due(self) -> int:
        """Record the summaries of a window that ended (called periodically by the app)."""
        return self.recorder.flush_due()

    def flush(self) -> int:
        """Record the pending summaries now (on shutdown)."""
        return self.recorder.flush()

    def _evict(self, now: float) -> None:
        expired = [c for c, w in self._windows.items() if now - w.start >= self.config.window_seconds]
        for c in expired:
            del self._windows[c]
        while len(self._windows) >= self.config.max_clients:
            del self._windows[next(iter(self._windows))]

    def too_many(self, retry_after: int) -> tuple[str, dict[str, str]]:
        """The detail and headers of a 429 for a throttled address."""
        return (
            f"too many refused requests from this address; retry after {retry_after} s",
            {"Retry-After": str(retry_after)},
        )
