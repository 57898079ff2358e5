"""The routers' assembly, in process: an upload endpoint checks the caller's token before it
reads the job form, so a refused upload is never parsed (the caller dependency comes first in
each route's signature, and FastAPI solves dependencies in that order).

The HTTP contract itself is tested over a real server in test_api_contract.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from agent.api.app import create_app
from agent.config import load_config
from agent.service import SiteService
from tests.fixtures.agents import add_tokens, make_site


@pytest.fixture(scope="module")
def app_and_tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, dict[str, str]]]:
    site = make_site(tmp_path_factory.mktemp("routers") / "fed", subjects=2, fmt="nifti", size=32)
    tokens = add_tokens(site.config_path, coordinator="coord", admin="admin")
    service = SiteService.open(load_config(site.config_path))
    try:
        # No lifespan runs (ASGITransport sends none): the service is never started, no job runs.
        yield create_app(service), tokens
    finally:
        service.db.dispose()


def post(app: FastAPI, path: str, token: str | None, content_type: str) -> httpx.Response:
    async def call() -> httpx.Response:
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            return await client.post(path, headers=headers, content=b"--y\r\nbroken")

    return asyncio.run(call())


@pytest.mark.parametrize("path", ["/v1/rounds", "/v1/evaluations"])
def test_a_refused_upload_is_not_parsed(app_and_tokens: tuple[FastAPI, dict[str, str]], path: str) -> None:
    app, tokens = app_and_tokens
    # A body that is not multipart (415 once the token passes), then one that is broken multipart (400).
    for content_type, accepted_code in (("text/plain", 415), ("multipart/form-data; boundary=x", 400)):
        assert post(app, path, None, content_type).status_code == 401
        assert post(app, path, tokens["admin"], content_type).status_code == 403
        assert post(app, path, tokens["coord"], content_type).status_code == accepted_code
