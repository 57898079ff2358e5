"""The OpenAPI document is as strict as the server: the job form is closed, its `plan` part is
JSON described by the plan model's own schema, and every reference in the document resolves.
A schema-driven client or fuzzer that follows the document sends what the server takes.

In process, through the ASGI app (no lifespan: the service is never started, no job runs).
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
from agent.training.plan import Plan
from tests.fixtures.agents import add_tokens, make_site, tiny_plan

JOB_PATHS = ["/v1/rounds", "/v1/evaluations"]


@pytest.fixture(scope="module")
def app_and_tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, dict[str, str]]]:
    site = make_site(tmp_path_factory.mktemp("openapi") / "fed", subjects=2, fmt="nifti", size=32)
    tokens = add_tokens(site.config_path, coordinator="coord")
    service = SiteService.open(load_config(site.config_path))
    try:
        yield create_app(service), tokens
    finally:
        service.db.dispose()


@pytest.fixture(scope="module")
def document(app_and_tokens: tuple[FastAPI, dict[str, str]]) -> dict[str, Any]:
    app, _ = app_and_tokens

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            return await client.get("/openapi.json")

    answer = asyncio.run(get())
    assert answer.status_code == 200
    return answer.json()


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def form(document: dict[str, Any], path: str) -> dict[str, Any]:
    body: dict[str, Any] = document["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    return body["content"]["multipart/form-data"]


@pytest.mark.parametrize("path", JOB_PATHS)
def test_the_job_form_is_closed_and_its_plan_is_json(document: dict[str, Any], path: str) -> None:
    multipart = form(document, path)
    schema = multipart["schema"]
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["plan"]
    assert set(schema["properties"]) == {"plan", "weights"}
    assert schema["properties"]["plan"]["$ref"] == "#/components/schemas/Plan"
    assert schema["properties"]["weights"]["type"] == "string"
    assert multipart["encoding"]["plan"]["contentType"] == "application/json"
    assert multipart["encoding"]["weights"]["contentType"] == "application/octet-stream"


def test_the_plan_schema_is_the_plan_models_own(document: dict[str, Any]) -> None:
    components = document["components"]["schemas"]
    expected = Plan.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, schema in expected.pop("$defs").items():
        assert components[name] == schema, name
    assert components["Plan"] == expected
    # Unknown keys are refused at every level but the model's arguments (checked by the registry).
    assert components["Plan"]["additionalProperties"] is False
    for name in ("OptimizerSpec", "PrivacySpec", "EarlyStopping", "DataSettings"):
        assert components[name]["additionalProperties"] is False, name


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    found = set(refs(document))
    assert "#/components/schemas/Plan" in found
    for ref in found:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in document["components"]["schemas"], ref


def post_form(app: FastAPI, token: str, files: dict[str, Any]) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            return await client.post("/v1/rounds", headers={"Authorization": f"Bearer {token}"}, files=files)

    return asyncio.run(go())


def test_the_server_takes_the_plan_as_the_document_describes_it(
    app_and_tokens: tuple[FastAPI, dict[str, str]],
) -> None:
    app, tokens = app_and_tokens
    # A JSON part, as the encoding says: the plan is read and validated (it lacks only weights).
    plan = json.dumps(tiny_plan())
    r = post_form(app, tokens["coord"], {"plan": (None, plan, "application/json")})
    assert r.status_code == 422 and r.json()["detail"].startswith("weights: missing"), r.text
    # A key outside the plan's schema, and a field outside the form's: both refused, as documented.
    bad = json.dumps(tiny_plan(colour="red"))
    r = post_form(app, tokens["coord"], {"plan": (None, bad, "application/json")})
    assert r.status_code == 422 and r.json()["detail"] == "plan.colour: unknown key", r.text
    r = post_form(app, tokens["coord"], {"plan": (None, plan, "application/json"), "extra": (None, "1")})
    assert r.status_code == 422 and "unknown form field(s) ['extra']" in r.json()["detail"], r.text
