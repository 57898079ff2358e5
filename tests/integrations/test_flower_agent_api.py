"""fedsite_flower.agent_api and .bridge against a scripted agent (httpx.MockTransport).

What a SuperNode's ClientApp must get right without a real agent: refusals keep the agent's
reason (a 403 for an unapproved plan carries its hash), an update whose hash differs from the
header or the status is refused, transport failures and 5xx are retried, and one Flower message
always maps to the same agent job id.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fedsite_flower import arrays, bridge
from fedsite_flower.agent_api import (
    AgentAPI,
    AgentApiError,
    JobEnded,
    PlanRefused,
    UpdateIntegrityError,
    read_token,
)

from agent.errors import PlanNotApproved
from agent.training.plan import ROUND_ID_PATTERN, job_plan

HASH = "ab" * 32
URL = "http://agent.test"
Handler = Callable[[httpx.Request], httpx.Response]


def _api(handler: Handler, **kwargs: object) -> AgentAPI:
    return AgentAPI(URL, "tok", transport=httpx.MockTransport(handler), sleep=lambda _: None, **kwargs)  # type: ignore[arg-type]


def _weights() -> dict[str, np.ndarray]:
    return {"w": np.arange(4, dtype=np.float32), "b": np.ones(2, dtype=np.float32)}


def test_unapproved_plan_is_a_plan_refusal_naming_the_hash() -> None:
    detail = str(PlanNotApproved(HASH))  # the agent's own wording

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"detail": detail})

    with pytest.raises(PlanRefused) as info:
        _api(handler).start_round({"dataset": "d"}, b"x")
    assert info.value.plan_hash == HASH
    assert HASH in str(info.value) and "approval policy: manual" in str(info.value)


def test_other_refusals_keep_the_agents_detail_and_are_not_retried() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1/info":
            return httpx.Response(403, json={"detail": "token role 'admin' cannot do this"})
        return httpx.Response(422, json={"detail": "dataset 'nope' is not at this site"})

    api = _api(handler)
    with pytest.raises(AgentApiError) as info:
        api.start_round({"dataset": "nope"}, b"x")
    assert not isinstance(info.value, PlanRefused)
    assert info.value.status_code == 422 and "dataset 'nope' is not at this site" in str(info.value)
    with pytest.raises(AgentApiError) as info403:
        api.info()
    assert not isinstance(info403.value, PlanRefused) and info403.value.status_code == 403
    assert calls == ["/v1/rounds", "/v1/info"]


def test_server_errors_and_transport_failures_are_retried() -> None:
    answers = iter([httpx.Response(503, text="busy"), httpx.Response(200, json={"site_id": "s"})])
    assert _api(lambda r: next(answers)).info() == {"site_id": "s"}

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(AgentApiError, match=r"http://agent.test after 3 attempt\(s\): ConnectError"):
        _api(refuse, attempts=3).info()


def test_job_request_is_a_multipart_plan_and_weights() -> None:
    seen: dict[str, bytes] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["type"] = request.headers["content-type"].encode()
        seen["body"] = request.read()
        seen["auth"] = request.headers["authorization"].encode()
        return httpx.Response(202, json={"round_id": "r1", "status": "queued"})

    weights = arrays.encode(_weights())
    assert _api(handler).start_round({"dataset": "d", "round_id": "r1"}, weights) == "r1"
    assert seen["type"].startswith(b"multipart/form-data")
    assert b'name="plan"' in seen["body"] and b'"round_id": "r1"' in seen["body"]
    assert b'name="weights"' in seen["body"] and weights in seen["body"]
    assert seen["auth"] == b"Bearer tok"


@pytest.mark.parametrize(
    ("header", "status_sha", "needle"),
    [
        (None, "good", "without an X-Content-SHA256 header"),
        ("0" * 64, "good", "the X-Content-SHA256 header says 000"),
        ("good", "1" * 64, "the round status says 111"),
        ("good", None, "without an update_sha256"),
    ],
)
def test_update_hash_is_checked_against_header_and_status(
    header: str | None, status_sha: str | None, needle: str
) -> None:
    data = arrays.encode(_weights())
    good = hashlib.sha256(data).hexdigest()
    headers = {} if header is None else {"X-Content-SHA256": good if header == "good" else header}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=data, headers=headers)

    expected = good if status_sha == "good" else status_sha
    with pytest.raises(UpdateIntegrityError, match=needle):
        _api(handler).download_update("r1", expected)


def _scripted_agent(final: str, data: bytes, cancelled: list[str]) -> Handler:
    digest = hashlib.sha256(data).hexdigest()
    polls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path == "/v1/rounds":
            plan = re.search(rb'"round_id": "([^"]+)"', request.read())
            assert plan is not None
            return httpx.Response(202, json={"round_id": plan.group(1).decode(), "status": "queued"})
        if request.method == "POST" and path.endswith("/cancel"):
            cancelled.append(path)
            return httpx.Response(200, json={"round_id": "x", "status": "cancelled"})
        if path.endswith("/update"):
            return httpx.Response(200, content=data, headers={"X-Content-SHA256": digest})
        polls["n"] += 1
        status = "running" if polls["n"] < 2 else final
        body: dict[str, Any] = {
            "round_id": path.rsplit("/", 1)[1],
            "status": status,
            "metrics": {"loss": 0.5, "note": "x"},
        }
        if status == "completed":
            body.update(num_samples=12, update_sha256=digest, audit_anchor={"event_id": 9, "hash": "h"})
        if status == "failed":
            body["error"] = "worker crashed: out of memory"
        return httpx.Response(200, json=body)

    return handler


def test_bridge_train_returns_the_released_update() -> None:
    update = {"w": np.full(4, 2.0, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
    data = arrays.encode(update)
    cancelled: list[str] = []
    api = _api(_scripted_agent("completed", data, cancelled), poll_interval=0)
    out = bridge.train(api, {"dataset": "d"}, _weights(), "flwr-1-r001-n7-train")
    assert out.round_id == "flwr-1-r001-n7-train"
    assert out.update == data and out.update_sha256 == hashlib.sha256(data).hexdigest()
    assert out.num_examples == 12 and out.metrics == {"loss": 0.5}
    assert out.audit_anchor == {"event_id": 9, "hash": "h"}
    assert all(np.array_equal(out.arrays[k], v) for k, v in update.items())
    assert out.bytes_to_agent > len(arrays.encode(_weights())) and out.bytes_from_agent >= len(data)
    assert cancelled == []


def test_bridge_names_the_run_as_the_coordinator_does() -> None:
    """run_id goes to the agent only with a plan that keeps optimizer state (an older agent
    refuses the key), with the job's plan as the fedsite coordinator would send it."""
    data = arrays.encode({"w": np.zeros(4, dtype=np.float32)})
    sent: list[dict[str, Any]] = []
    script = _scripted_agent("completed", data, [])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/v1/rounds":
            part = re.search(rb'name="plan"\r\n.*?\r\n\r\n(.*?)\r\n--', request.read(), re.S)
            assert part is not None
            sent.append(json.loads(part.group(1)))
        return script(request)

    run = bridge.run_name(3)
    assert re.fullmatch(ROUND_ID_PATTERN, run)
    keep = {"dataset": "d", "optimizer": {"name": "adam", "lr": 0.01, "keep_state": True}}
    for plan in ({"dataset": "d", "run_id": "theirs"}, keep):
        api = _api(handler, poll_interval=0)
        bridge.train(api, plan, _weights(), "flwr-3-r001-n7-train", run_id=run)
        assert sent[-1] == job_plan(plan, "flwr-3-r001-n7-train", run)
    assert "run_id" not in sent[0] and sent[1]["run_id"] == "flwr-3"


def test_bridge_train_of_a_failed_job_keeps_the_agents_reason() -> None:
    cancelled: list[str] = []
    api = _api(_scripted_agent("failed", b"", cancelled), poll_interval=0)
    with pytest.raises(JobEnded, match="ended as failed: worker crashed: out of memory"):
        bridge.train(api, {"dataset": "d"}, _weights(), "flwr-1-r001-n7-train")
    assert cancelled == ["/v1/rounds/flwr-1-r001-n7-train/cancel"]


def test_job_ids_are_stable_distinct_and_valid_agent_round_ids() -> None:
    ids = {
        bridge.job_id_for(kind, run, rnd, node)
        for kind in ("train", "eval")
        for run in (1, 2**63 - 1)
        for rnd in (1, 2)
        for node in (5, 2**64 - 1)
    }
    assert len(ids) == 16
    assert all(re.match(ROUND_ID_PATTERN, i) for i in ids)
    assert bridge.job_id_for("train", 9, 1, 3) == bridge.job_id_for("train", 9, 1, 3)
    with pytest.raises(ValueError, match="kind"):
        bridge.job_id_for("fit", 1, 1, 1)


def test_plan_from_config() -> None:
    plan = bridge.plan_from_config({"plan": json.dumps({"dataset": "d", "round_id": "old"})})
    assert plan == {"dataset": "d"}
    bad_configs = [
        ({}, "no 'plan'"),
        ({"plan": "{"}, "not valid JSON"),
        ({"plan": "[1]"}, "not a JSON object"),
    ]
    for bad, needle in bad_configs:
        with pytest.raises(AgentApiError, match=needle):
            bridge.plan_from_config(bad)


def test_node_config_and_token_file(tmp_path: Path) -> None:
    with pytest.raises(AgentApiError, match="lacks agent-url, token-file"):
        AgentAPI.from_node_config({})
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    with pytest.raises(AgentApiError, match="is empty"):
        read_token(empty)
    with pytest.raises(AgentApiError, match="cannot read the agent token file"):
        read_token(tmp_path / "missing.token")
    good = tmp_path / "t.token"
    good.write_text("secret-token\n")
    assert read_token(good) == "secret-token"
    with pytest.raises(AgentApiError, match="not an http"):
        AgentAPI.from_node_config({"agent-url": "ftp://x", "token-file": str(good)})


def test_status_requests_ask_the_agent_to_wait_and_an_agent_that_does_not_is_polled() -> None:
    """Each status request carries `?wait=`; an agent that answers at once anyway (one that
    predates it) is asked again after poll_interval, not in a tight loop."""
    seen: list[httpx.Request] = []
    sleeps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status = "running" if len(seen) < 3 else "completed"
        return httpx.Response(200, json={"round_id": "r", "status": status, "metrics": {}})

    transport = httpx.MockTransport(handler)
    api = AgentAPI(URL, "tok", transport=transport, sleep=sleeps.append, poll_interval=0.5, status_wait=4)
    assert api.wait("round", "r", timeout=60).status == "completed"
    assert [r.url.params.get("wait") for r in seen] == ["4.000"] * 3
    assert len(sleeps) == 2 and all(0 < s <= 0.5 for s in sleeps), sleeps


@pytest.mark.parametrize("status_wait", [-1.0, 60.0])
def test_a_status_wait_that_cannot_work_is_refused(status_wait: float) -> None:
    with pytest.raises(AgentApiError, match="status_wait"):
        AgentAPI(URL, "tok", timeout=60.0, status_wait=status_wait)
