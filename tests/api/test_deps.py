"""Bearer-token auth (agent.api.deps), in process: an expired token is a 401 that says so and is
audited under the token's name, while other tokens keep working."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from agent.access import tokens as tokens_mod
from agent.access.tokens import create_token
from agent.api.app import create_app
from agent.config import parse_config
from agent.service import SiteService


@pytest.fixture
def service(tmp_path: Path, db_url: str) -> Iterator[SiteService]:
    raw = {"site": {"id": "site-a"}, "work_dir": str(tmp_path), "database_url": db_url, "device": "cpu"}
    svc = SiteService.open(parse_config(raw, source=None, environ={}, check_paths=False))
    try:
        yield svc
    finally:
        svc.db.dispose()


def get(service: SiteService, path: str, token: str) -> httpx.Response:
    async def call() -> httpx.Response:
        # No lifespan runs (ASGITransport sends none): the service is never started.
        transport = httpx.ASGITransport(app=create_app(service), client=("10.0.0.7", 4321))
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            return await client.get(path, headers={"Authorization": f"Bearer {token}"})

    return asyncio.run(call())


def test_an_expired_token_is_refused_with_401_and_audited_by_name(
    service: SiteService, monkeypatch: pytest.MonkeyPatch
) -> None:
    expires = datetime.now(UTC) + timedelta(days=1)
    short = create_token(service.db, service.audit, "ops-short", "admin", "test", expires_at=expires)
    lasting = create_token(service.db, service.audit, "ops", "admin", "test")
    assert get(service, "/v1/audit/verify", short).status_code == 200

    monkeypatch.setattr(tokens_mod, "utcnow", lambda: expires + timedelta(seconds=1))
    answer = get(service, "/v1/audit/verify", short)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert "token 'ops-short' expired at" in answer.json()["detail"]
    assert get(service, "/v1/audit/verify", lasting).status_code == 200

    [refused] = service.audit.events(action="api.refused")
    assert refused["actor"] == "token:ops-short"
    assert refused["details"] == {
        "reason": "expired token",
        "method": "GET",
        "path": "/v1/audit/verify",
        "client": "10.0.0.7",
        "token_name": "ops-short",
    }
    assert short not in str(refused)
