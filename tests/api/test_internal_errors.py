"""An unexpected error is a JSON 500 with a reference, logged once, on a connection that stays
usable: a real uvicorn server on 127.0.0.1 (no lifespan: the service is never started) and a
keep-alive httpx client, through a real route whose service call raises.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agent.api.app import create_app
from agent.config import load_config
from agent.service import SiteService
from tests.fixtures.agents import add_tokens, make_site
from tests.fixtures.servers import ThreadedServer


class Served:
    def __init__(self, service: SiteService, url: str, tokens: dict[str, str]) -> None:
        self.service = service
        self.url = url
        self.tokens = tokens


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    site = make_site(tmp_path_factory.mktemp("internal") / "fed", subjects=2, fmt="nifti", size=32)
    tokens = add_tokens(site.config_path, coordinator="coord")
    service = SiteService.open(load_config(site.config_path))
    # log_config=None: uvicorn's own records propagate to the root logger, where caplog sees them.
    try:
        with ThreadedServer(
            create_app(service), log_config=None, log_level=None, start_timeout_s=30
        ) as server:
            yield Served(service, f"http://127.0.0.1:{server.port}", tokens)
    finally:
        service.db.dispose()


def client_port(response: httpx.Response) -> Any:
    """The client side (address, port) of the TCP connection that carried RESPONSE; read
    while the connection is open; "closed" when the server has already closed it."""
    try:
        return response.extensions["network_stream"].get_extra_info("client_addr")
    except OSError:
        return "closed"


def test_a_500_keeps_the_connection_and_is_logged_once(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("secret internals of a bug")

    monkeypatch.setattr(served.service, "info", broken)
    caplog.set_level(logging.INFO)
    headers = {"Authorization": f"Bearer {served.tokens['coord']}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=30) as client:
        failed = client.get("/v1/info")
        ports = [client_port(failed)]
        after = client.get("/v1/health")
        ports.append(client_port(after))
        again = client.get("/v1/info")
        ports.append(client_port(again))

    assert failed.status_code == 500
    assert failed.headers["content-type"] == "application/json"
    assert failed.headers.get("connection", "").lower() != "close"
    detail = failed.json()["detail"]
    ref = failed.headers["x-request-id"]
    assert detail == f"internal error (reference {ref}); the agent's log has the details"
    assert "secret" not in failed.text
    # The same keep-alive connection serves the following requests.
    assert after.status_code == 200 and again.status_code == 500
    assert ports[0] == ports[1] == ports[2], ports

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, [f"{r.name}: {r.getMessage()}" for r in errors]  # one per failed request
    first = errors[0]
    assert first.name == "fedsite.api" and first.exc_info is not None
    assert first.getMessage() == f"internal error {ref} on GET /v1/info"
    assert again.headers["x-request-id"] in errors[1].getMessage()
