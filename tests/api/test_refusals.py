"""Refused callers cannot fill the disk (agent.api.throttle, agent.audit.coalesce).

Every refused request used to write one audit row with its path, and rows of a hash chain
cannot be removed: 8 clients for 20 s added 54 MiB. Now an address that collects too many
refusals is answered 429 with Retry-After, the refusals of a window are audited as a bounded
number of events of bounded size, and a caller with a valid token is never throttled.

The flood runs against a real server on 127.0.0.1; the legitimate coordinator connects from
127.0.0.2 (another loopback address) and from the flooding address itself. Time is held still
(the guard's clock is a constant), so the whole flood falls in one window.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.access.tokens import create_token
from agent.api.app import create_app
from agent.api.middleware import ClientCertGate
from agent.api.throttle import THROTTLED_REASON, RefusalGuard
from agent.audit.chain import canonical_json
from agent.config import RefusalsConfig, parse_config
from agent.service import SiteService
from tests.fixtures.servers import ThreadedServer

FLOOD_CLIENTS = 8
FLOOD_PER_CLIENT = 40
LONG_PATH = "/v1/rounds/" + "x" * 5000
LIMITS = RefusalsConfig(max_per_client=30, window_seconds=60, audit_per_window=20)


@pytest.fixture
def service(tmp_path: Path, db_url: str) -> Iterator[SiteService]:
    raw = {"site": {"id": "site-a"}, "work_dir": str(tmp_path), "database_url": db_url, "device": "cpu"}
    svc = SiteService.open(parse_config(raw, source=None, environ={}, check_paths=False))
    try:
        yield svc
    finally:
        svc.db.dispose()


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Server(ThreadedServer):
    """The agent's app on 127.0.0.1 (no lifespan: the service is never started)."""

    def __init__(self, app: Any) -> None:
        super().__init__(app, server_header=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, local_address: str = "127.0.0.1", token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        transport = httpx.HTTPTransport(local_address=local_address)
        return httpx.Client(base_url=self.url, transport=transport, headers=headers, timeout=30)


def refusal_events(service: SiteService) -> list[dict[str, Any]]:
    return [e for e in service.audit.events(limit=10_000) if e["action"].startswith("api.refused")]


def accounted(events: list[dict[str, Any]]) -> int:
    """Refusals the events account for: one per detailed event, `count` per summary."""
    return sum(e["details"]["count"] if e["action"] == "api.refused.summary" else 1 for e in events)


def test_a_flood_of_refused_requests_adds_a_bounded_audit_and_never_locks_out_a_coordinator(
    service: SiteService,
) -> None:
    token = create_token(service.db, service.audit, "consortium", "coordinator", "test")
    app = create_app(service)
    guard = RefusalGuard(service.audit, LIMITS, clock=Clock())
    app.state.refusals = guard

    def flood(i: int) -> Counter[int]:
        codes: Counter[int] = Counter()
        with server.client() as c:
            for j in range(FLOOD_PER_CLIENT):
                # No token, a wrong token, and a path of 5,000 characters.
                headers = {"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"} if j % 2 else {}
                r = c.get(LONG_PATH if j % 3 == 0 else "/v1/info", headers=headers)
                codes[r.status_code] += 1
                if r.status_code == 429:
                    assert int(r.headers["Retry-After"]) >= 1
                    assert "too many refused requests" in r.json()["detail"]
        return codes

    with Server(app) as server, ThreadPoolExecutor(FLOOD_CLIENTS) as pool:
        with server.client(token=token) as c:
            assert c.get("/v1/info").status_code == 200  # whatever a first call records, before
        before = service.audit.count()
        flooding = [pool.submit(flood, i) for i in range(FLOOD_CLIENTS)]
        # A coordinator elsewhere, and one behind the flooding address itself, keep working.
        with server.client("127.0.0.2", token) as other, server.client("127.0.0.1", token) as same:
            for _ in range(5):
                assert other.get("/v1/info").status_code == 200
                assert same.get("/v1/info").status_code == 200
        codes = sum((f.result() for f in flooding), Counter[int]())
        # The flood's address stays throttled; the other address is refused but not throttled.
        with server.client() as c:
            assert c.get("/v1/info").status_code == 429
        with server.client("127.0.0.2") as c:
            assert c.get("/v1/info").status_code == 401

    total = FLOOD_CLIENTS * FLOOD_PER_CLIENT
    assert codes[401] == LIMITS.max_per_client
    assert codes[429] == total - LIMITS.max_per_client

    # Before the window ends, only the detailed events are written.
    assert len(refusal_events(service)) == LIMITS.audit_per_window
    guard.flush()
    events = refusal_events(service)
    refused_requests = total + 2
    # Every refused request is accounted for ...
    assert accounted(events) == refused_requests
    # ... in at most the window's detailed events plus one summary per actor and reason.
    summaries = [e for e in events if e["action"] == "api.refused.summary"]
    assert len(events) == LIMITS.audit_per_window + len(summaries)
    assert {e["details"]["reason"] for e in summaries} <= {
        "missing token",
        "unknown or revoked token",
        THROTTLED_REASON,
    }
    assert any(e["details"]["reason"] == THROTTLED_REASON for e in summaries)
    # Bounded in size too: paths are truncated, summaries list a few clients and paths.
    size = sum(len(canonical_json(e["details"])) for e in events)
    assert size < 600 * len(events), size
    assert all(len(e["details"].get("path", "")) <= 200 for e in events)
    assert service.audit.count() - before == len(events)
    assert service.audit.verify().ok


def test_the_throttle_and_the_audit_budget_start_again_with_the_next_window(service: SiteService) -> None:
    clock = Clock()
    app = create_app(service)
    limits = RefusalsConfig(max_per_client=3, window_seconds=60, audit_per_window=2)
    app.state.refusals = RefusalGuard(service.audit, limits, clock=clock)

    async def calls(n: int, path: str = "/v1/info") -> list[int]:
        transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            return [(await client.get(path)).status_code for _ in range(n)]

    assert asyncio.run(calls(5)) == [401, 401, 401, 429, 429]
    assert [e["action"] for e in refusal_events(service)] == ["api.refused", "api.refused"]
    clock.now += 60
    # The next refusal closes the old window: its summary first, then the new window's event.
    assert asyncio.run(calls(1, "/v1/audit")) == [401]
    events = refusal_events(service)
    assert [e["action"] for e in events] == [
        "api.refused",
        "api.refused",
        "api.refused.summary",
        "api.refused.summary",
        "api.refused",
    ]
    by_reason = {e["details"]["reason"]: e["details"] for e in events[2:4]}
    assert by_reason["missing token"]["count"] == 1
    assert by_reason["missing token"]["clients"] == {"10.0.0.9": 1}
    assert by_reason[THROTTLED_REASON]["count"] == 2
    assert by_reason[THROTTLED_REASON]["paths"] == {"/v1/info": 2}
    assert events[4]["details"]["path"] == "/v1/audit"


def test_the_client_certificate_gate_throttles_and_coalesces_through_the_same_guard(
    service: SiteService,
) -> None:
    limits = RefusalsConfig(max_per_client=2, window_seconds=60, audit_per_window=1)
    guard = RefusalGuard(service.audit, limits, clock=Clock())
    gate = ClientCertGate(create_app(service), None, enforce=True, allowed=[], guard=guard)

    async def calls(n: int) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=gate, client=("10.0.0.5", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            return [await client.get("/v1/info") for _ in range(n)]

    answers = asyncio.run(calls(4))
    assert [r.status_code for r in answers] == [403, 403, 429, 429]
    assert int(answers[2].headers["Retry-After"]) >= 1
    guard.flush()
    events = refusal_events(service)
    assert [e["action"] for e in events] == ["api.refused", "api.refused.summary", "api.refused.summary"]
    assert events[0]["details"]["reason"] == "no client certificate"
    assert accounted(events) == 4
