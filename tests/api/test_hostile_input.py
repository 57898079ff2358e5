"""Hostile input from a coordinator is a 4xx naming the problem, never a 500.

In process, through the ASGI app (no lifespan: the service is never started, no job runs).
Python's JSON parser raises errors of its own on hostile documents (`RecursionError` for deep
nesting, `ValueError` past the int-string limit), and a database driver cannot bind an
integer past 64 bits; each must reach the caller as a refusal, not as an internal error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from agent.api.app import create_app
from agent.config import load_config
from agent.service import SiteService
from tests.fixtures.agents import add_tokens, make_site, tiny_plan

DEEP = 5_000  # past the recursion limit, within limits.max_plan_bytes


@pytest.fixture(scope="module")
def app_and_tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, dict[str, str]]]:
    site = make_site(tmp_path_factory.mktemp("hostile") / "fed", subjects=2, fmt="nifti", size=32)
    tokens = add_tokens(site.config_path, coordinator="coord", admin="admin")
    service = SiteService.open(load_config(site.config_path))
    try:
        yield create_app(service), tokens
    finally:
        service.db.dispose()


def call(app: FastAPI, method: str, path: str, token: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            headers = {"Authorization": f"Bearer {token}"}
            return await client.request(method, path, headers=headers, **kwargs)

    return asyncio.run(go())


def safetensors_with_header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


def plan_with_model_argument(value: str) -> str:
    """The tiny plan's text with one model argument spliced in as raw JSON."""
    text = json.dumps(tiny_plan(init="random"))
    return text.replace('"name": "unet"', f'"name": "unet", "dropout": {value}', 1)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ("[" * DEEP + "]" * DEEP, "nested more than"),
        (plan_with_model_argument("[" * DEEP + "]" * DEEP), "nested more than"),
        (plan_with_model_argument("[" * 200 + "]" * 200), "nested more than"),
        (plan_with_model_argument("1" * 5000), "a number has more than"),
        ('{"dataset": ' + "9" * 5000 + "}", "a number has more than"),
    ],
    ids=["deep-top", "deep-argument", "deep-parseable", "long-int-argument", "long-int-top"],
)
@pytest.mark.parametrize("path", ["/v1/rounds", "/v1/evaluations"])
def test_hostile_plan_is_a_422(
    app_and_tokens: tuple[FastAPI, dict[str, str]], path: str, plan: str, message: str
) -> None:
    app, tokens = app_and_tokens
    r = call(app, "POST", path, tokens["coord"], files={"plan": (None, plan)})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("plan:") and message in detail, detail


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b'{"w": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nested too deeply"),
        (b'{"w": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 4]}}', "digits"),
    ],
    ids=["deep", "long-int"],
)
def test_hostile_safetensors_header_is_a_422(
    app_and_tokens: tuple[FastAPI, dict[str, str]], header: bytes, message: str
) -> None:
    app, tokens = app_and_tokens
    files = {
        "plan": (None, json.dumps(tiny_plan())),
        "weights": ("w.safetensors", safetensors_with_header(header), "application/octet-stream"),
    }
    r = call(app, "POST", "/v1/rounds", tokens["coord"], files=files)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("weights: not a safetensors file") and message in detail, detail


@pytest.mark.parametrize("since_id", [2**63, 2**64, 10**30, -1])
def test_audit_since_id_out_of_range_is_a_422(
    app_and_tokens: tuple[FastAPI, dict[str, str]], since_id: int
) -> None:
    app, tokens = app_and_tokens
    r = call(app, "GET", "/v1/audit", tokens["admin"], params={"since_id": since_id})
    assert r.status_code == 422, r.text
    [problem] = r.json()["detail"]
    assert problem["loc"] == ["query", "since_id"]


def test_audit_since_id_at_the_bound_is_served(app_and_tokens: tuple[FastAPI, dict[str, str]]) -> None:
    app, tokens = app_and_tokens
    r = call(app, "GET", "/v1/audit", tokens["admin"], params={"since_id": 2**63 - 1})
    assert r.status_code == 200, r.text
    assert r.json() == {"events": [], "next_since_id": 2**63 - 1}


def test_the_bounds_are_in_the_schema(app_and_tokens: tuple[FastAPI, dict[str, str]]) -> None:
    app, _ = app_and_tokens
    params = {p["name"]: p["schema"] for p in app.openapi()["paths"]["/v1/audit"]["get"]["parameters"]}
    assert params["since_id"]["minimum"] == 0 and params["since_id"]["maximum"] == 2**63 - 1
    assert params["limit"]["minimum"] == 1 and params["limit"]["maximum"] == 1000
