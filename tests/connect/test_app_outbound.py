"""The app in outbound mode, in process: no control route is mounted at all (only the local
probes), and what runs beside the API (the connector) starts after the service and stops
before the service closes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from agent.api.app import create_app
from agent.config import load_config
from agent.service import SiteService
from tests.fixtures.agents import make_site


class Recorder:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def start(self) -> None:
        self.calls.append("companion.start")

    def stop(self) -> None:
        self.calls.append("companion.stop")


def _service(tmp_path: Path, calls: list[str]) -> SiteService:
    site = make_site(tmp_path / "fed", subjects=2, fmt="nifti", size=32)
    service = SiteService.open(load_config(site.config_path))
    start, close = service.start, service.close

    def recorded_start(*, scan: bool = True) -> None:
        calls.append("service.start")
        start(scan=scan)

    def recorded_close() -> None:
        calls.append("service.close")
        close()

    service.start = recorded_start  # type: ignore[method-assign]
    service.close = recorded_close  # type: ignore[method-assign]
    return service


def test_outbound_app_mounts_only_the_probes_and_runs_companions_inside_the_service(tmp_path: Path) -> None:
    calls: list[str] = []
    service = _service(tmp_path, calls)
    app = create_app(service, scan_on_start=False, control_api=False, companions=[Recorder(calls)])
    assert set(app.openapi()["paths"]) == {"/v1/health", "/metrics"}

    async def life() -> None:
        async with app.router.lifespan_context(app):
            assert calls == ["service.start", "companion.start"]
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
                assert (await client.get("/v1/health")).status_code == 200
                assert (await client.post("/v1/rounds")).status_code == 404
                assert (await client.get("/v1/info")).status_code == 404
                assert (await client.get("/metrics")).status_code == 401

    asyncio.run(life())
    assert calls == ["service.start", "companion.start", "companion.stop", "service.close"]


def test_listen_mode_keeps_every_control_route(tmp_path: Path) -> None:
    service = _service(tmp_path, [])
    try:
        app = create_app(service, scan_on_start=False)
        paths = set(app.openapi()["paths"])
        assert {"/v1/rounds", "/v1/evaluations", "/v1/info", "/v1/audit", "/v1/health", "/metrics"} <= paths
    finally:
        service.db.dispose()
