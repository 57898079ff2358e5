"""Coalesced audit events: many repetitions of one kind of event recorded as a bounded few.

Refused API requests come from whoever can reach the port, with or without a token. Recorded
one row each, a flood fills the disk (8 clients for 20 s once added 54 MiB), and rows of a
hash chain cannot be deleted afterwards. `CoalescingRecorder` bounds what such traffic can
write: per window (a minute by default) the first `detailed_per_window` occurrences are
recorded one event each, as before, so that a lone mistake is visible at once with its
details; every further one is only counted, per (actor, reason), and each key's count is
recorded as one summary event when the window closes, with the busiest clients and paths
(bounded, truncated). So a window adds at most `detailed_per_window + max_keys` events, each
of bounded size, whatever the traffic, and every occurrence is still accounted for: the
detailed events plus the summaries' counts add up to the occurrences.

The events go through the chain's one writer (`AuditSink.append`); this module only decides
how many.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.audit.sink import AuditSink

# Longest text kept of a caller-chosen string (a request path, a method): a path of megabytes
# would otherwise be copied into every event that names it.
MAX_TEXT_CHARS = 200
# Distinct clients and paths kept per summary; the rest are counted together.
TOP_N = 10
# Distinct (actor, reason) keys counted per window; the rest share one key.
MAX_KEYS = 32
OVERFLOW_KEY = ("anonymous", "other")


def truncate(value: Any, limit: int = MAX_TEXT_CHARS) -> Any:
    """VALUE cut to LIMIT characters (marked with '...'), when it is a longer string."""
    if isinstance(value, str) and len(value) > limit:
        return value[: limit - 3] + "..."
    return value


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


@dataclass
class _Tally:
    count: int = 0
    clients: Counter[str] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)


def _top(counter: Counter[str]) -> dict[str, int]:
    """The TOP_N most frequent entries, the rest summed under 'others'."""
    top = dict(counter.most_common(TOP_N))
    rest = sum(counter.values()) - sum(top.values())
    if rest:
        top["others"] = rest
    return top


class CoalescingRecorder:
    """Records occurrences of ACTION in SINK, at most `detailed_per_window` in full plus one
    summary (ACTION + '.summary') per (actor, reason) per window. Thread-safe.

    `clock` returns seconds (monotonic); `wall` the wall-clock time for the summaries' window
    bounds. Both are parameters so that a test can hold time still.
    """

    def __init__(
        self,
        sink: AuditSink,
        action: str,
        *,
        window_s: float = 60.0,
        detailed_per_window: int = 20,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if window_s <= 0 or detailed_per_window < 0 or max_keys < 1:
            raise ValueError("window_s must be positive, detailed_per_window >= 0, max_keys >= 1")
        self.sink = sink
        self.action = action
        self.window_s = window_s
        self.detailed_per_window = detailed_per_window
        self.max_keys = max_keys
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._window_start = clock()
        self._window_wall = wall()
        self._detailed = 0
        self._tallies: dict[tuple[str, str], _Tally] = {}

    def record(self, *, actor: str, reason: str, client: str | None, details: dict[str, Any]) -> None:
        """One occurrence: recorded in full while the window's budget lasts, else counted.

        DETAILS are the full event's details (caller-chosen strings in them are truncated);
        `reason` and `client` are also what a summary groups and counts by.
        """
        full = {key: truncate(value) for key, value in details.items()}
        with self._lock:
            self._close_window_if_due()
            if self._detailed < self.detailed_per_window:
                self._detailed += 1
                self.sink.append(self.action, actor=actor, details=full)
                return
            key = (actor, reason)
            if key not in self._tallies and len(self._tallies) >= self.max_keys:
                key = OVERFLOW_KEY
            tally = self._tallies.setdefault(key, _Tally())
            tally.count += 1
            tally.clients[str(truncate(client or "unknown", 64))] += 1
            path = full.get("path")
            if isinstance(path, str):
                tally.paths[path] += 1
            if key != OVERFLOW_KEY:
                # Fields that are the same for every occurrence of a key (a token's name).
                for name in ("token_name", "subject"):
                    if name in full:
                        tally.extra[name] = full[name]

    def flush_due(self) -> int:
        """Record the summaries of a window that has ended; returns how many were recorded."""
        with self._lock:
            return self._close_window_if_due()

    def flush(self) -> int:
        """Record the current window's summaries now (on shutdown) and start a new window."""
        with self._lock:
            return self._close_window()

    def _close_window_if_due(self) -> int:
        if self._clock() - self._window_start < self.window_s:
            return 0
        return self._close_window()

    def _close_window(self) -> int:
        tallies, self._tallies = self._tallies, {}
        started, ended = self._window_wall, self._wall()
        self._window_start, self._window_wall, self._detailed = self._clock(), ended, 0
        for (actor, reason), tally in tallies.items():
            self.sink.append(
                f"{self.action}.summary",
                actor=actor,
                details={
                    "reason": reason,
                    "count": tally.count,
                    "window_start": _iso(started),
                    "window_end": _iso(ended),
                    "clients": _top(tally.clients),
                    "paths": _top(tally.paths),
                    **tally.extra,
                },
            )
        return len(tallies)
