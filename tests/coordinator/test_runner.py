"""Coordinator pieces that need no running agent: aggregation, the federation file, the HTTP client."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from coordinator.aggregate import SiteUpdate, apply_update, fedavg, weighted_mean
from coordinator.client import AgentClient
from coordinator.errors import (
    AgentAuthError,
    AgentError,
    AgentUnreachable,
    AggregationError,
    FederationError,
    UpdateIntegrityError,
)
from coordinator.federation import Retries, load_federation, parse_federation
from coordinator.options import RunOptions
from coordinator.report import progress_fraction
from coordinator.runner import Coordinator, weighted_dice

# -- aggregation ---------------------------------------------------------------------------


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g)}


def test_weighted_mean_matches_hand_computation() -> None:
    a, b, c = _state(1), _state(2), _state(3)
    out = weighted_mean([SiteUpdate("a", a, 6), SiteUpdate("b", b, 3), SiteUpdate("c", c, 1)])
    for name in a:
        expected = (6 * a[name] + 3 * b[name] + 1 * c[name]) / 10
        torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-6)
        assert out[name].dtype == torch.float32


def test_diff_and_full_modes_give_the_same_model() -> None:
    g = _state(0)
    locals_ = [_state(1), _state(2)]
    counts = [5, 2]
    full = fedavg(
        g,
        [SiteUpdate(f"s{i}", w, n) for i, (w, n) in enumerate(zip(locals_, counts, strict=True))],
        "weights",
    )
    diffs = [{k: w[k] - g[k] for k in g} for w in locals_]
    via_diff = fedavg(
        g, [SiteUpdate(f"s{i}", d, n) for i, (d, n) in enumerate(zip(diffs, counts, strict=True))], "diff"
    )
    for name in g:
        torch.testing.assert_close(full[name], via_diff[name], rtol=1e-5, atol=1e-6)


def test_aggregation_errors_name_site_and_tensor() -> None:
    a, b = _state(1), _state(2)
    b_bad = {**b, "conv.bias": torch.zeros(5)}
    with pytest.raises(AggregationError, match=r"site-b: tensor 'conv.bias' has shape \(5,\)"):
        weighted_mean([SiteUpdate("site-a", a, 1), SiteUpdate("site-b", b_bad, 1)])
    b_missing = {"conv.weight": b["conv.weight"]}
    with pytest.raises(AggregationError, match=r"site-b: .*missing conv.bias"):
        weighted_mean([SiteUpdate("site-a", a, 1), SiteUpdate("site-b", b_missing, 1)])
    b_nan = {**b, "conv.bias": torch.full((4,), float("nan"))}
    with pytest.raises(AggregationError, match=r"site-b: tensor 'conv.bias' holds NaN"):
        weighted_mean([SiteUpdate("site-a", a, 1), SiteUpdate("site-b", b_nan, 1)])
    with pytest.raises(AggregationError, match="site-a: reported 0 training samples"):
        weighted_mean([SiteUpdate("site-a", a, 0)])
    with pytest.raises(AggregationError, match="needs the global weights"):
        apply_update(None, a, "diff")


def test_weighted_dice_skips_failed_sites() -> None:
    res: dict[str, dict[str, Any]] = {
        "a": {"dice": 0.8, "num_samples": 3},
        "b": {"dice": 0.5, "num_samples": 1},
        "c": {"error": "down"},
    }
    assert weighted_dice(res) == pytest.approx((0.8 * 3 + 0.5) / 4)
    assert weighted_dice({"c": {"error": "down"}}) is None


def test_progress_fraction_shapes() -> None:
    assert progress_fraction({"epoch": 2, "epochs": 4, "step": 5, "steps": 10}) == pytest.approx(0.375)
    assert progress_fraction(0.5) == 0.5
    assert progress_fraction(None) is None


# -- federation file -----------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "federation.yaml"
    path.write_text(text)
    return path


def test_federation_file_loads_and_resolves_token_files(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("secret-2\n")
    path = _write(
        tmp_path,
        "agents:\n"
        "  - {name: site-1, url: 'http://127.0.0.1:8101/', token: secret-1}\n"
        "  - {name: site-2, url: 'https://h.example:8443', token_file: tok}\n"
        "outside:\n"
        "  - {name: site-3, url: 'http://127.0.0.1:8103', token: s3}\n"
        "min_sites: 2\n"
        "timeouts: {connect: 2, read: 10, round: 60}\n",
    )
    fed = load_federation(path)
    assert fed.names == ["site-1", "site-2"]
    assert fed.outside_names == ["site-3"]
    assert fed.agents[0].url == "http://127.0.0.1:8101"
    assert fed.agents[1].token_file == (tmp_path / "tok").resolve()
    assert fed.agents[1].bearer_token() == "secret-2"
    assert fed.timeouts.round == 60 and fed.timeouts.evaluation == 1800


def test_reseeded_rounds_draw_new_samples_and_keep_the_plan_otherwise(tmp_path: Path) -> None:
    fed = load_federation(
        _write(tmp_path, "agents:\n  - {name: site-1, url: 'http://127.0.0.1:8101', token: t}\n")
    )
    plan = {"dataset": "brain", "seed": 7, "local_epochs": 2}

    def round_plan(reseed: bool, index: int) -> dict[str, object]:
        opts = RunOptions(reseed_rounds=reseed)
        coord = Coordinator(fed, plan, tmp_path / "out", opts, initial_weights={}, clients={})
        return coord.strategy.round_plan(coord.plan, index)

    assert [round_plan(True, i)["seed"] for i in (1, 2, 5)] == [7, 8, 11]
    assert round_plan(True, 3) == {**plan, "seed": 9}
    assert round_plan(False, 3) == plan


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("agents:\n  - {name: a, url: 'http://x', token: t, tokne: u}\n", r"agents\[0\]\.tokne: unknown key"),
        ("agents:\n  - {name: a, url: 'ftp://x', token: t}\n", r"agents\[0\]\.url: .*http:// or https://"),
        (
            "agents:\n  - {name: a, url: 'http://x'}\n",
            r"agents\[0\]: .*exactly one of 'token' and 'token_file'",
        ),
        (
            "agents:\n  - {name: a, url: 'http://x', token_file: nope.txt}\n",
            r"agents\[0\]\.token_file: file does not exist",
        ),
        (
            "agents:\n  - {name: a, url: 'http://x', token: t}\n  - {name: a, url: 'http://y', token: t}\n",
            "agent name 'a' appears twice",
        ),
        (
            "agents:\n  - {name: a, url: 'http://x', token: t}\nmin_sites: 2\n",
            "min_sites is 2 but only 1 agent",
        ),
        ("agents: []\n", "agents: List should have at least 1 item"),
        ("- a\n", "top level must be a mapping"),
        ("agents:\n  - {name: a, url: 'http://x', token: t}\ntimeouts: {round: -1}\n", r"timeouts\.round"),
    ],
)
def test_federation_file_errors_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(FederationError, match=message) as info:
        load_federation(path)
    assert str(path) in str(info.value)


def test_missing_federation_file(tmp_path: Path) -> None:
    with pytest.raises(FederationError, match="federation file does not exist"):
        load_federation(tmp_path / "none.yaml")


# -- client against a scripted transport ---------------------------------------------------


def _client(
    handler: httpx.MockTransport, *, attempts: int = 4, sleeps: list[float] | None = None
) -> AgentClient:
    fed = parse_federation({"agents": [{"name": "site-7", "url": "http://agent.test", "token": "tok-7"}]})
    record = sleeps if sleeps is not None else []
    return AgentClient(
        fed.agents[0],
        retries=Retries(attempts=attempts, backoff=0.1, max_backoff=0.3),
        transport=handler,
        sleep=record.append,
    )


def test_client_retries_5xx_and_connection_errors_with_backoff() -> None:
    calls: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers["authorization"])
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) <= 3:
            return httpx.Response(503, json={"detail": "busy"})
        return httpx.Response(200, json={"site_id": "site-7", "datasets": []})

    sleeps: list[float] = []
    client = _client(httpx.MockTransport(handle), sleeps=sleeps)
    assert client.info()["site_id"] == "site-7"
    assert calls == ["Bearer tok-7"] * 4
    assert sleeps == [0.1, 0.2, 0.3]


def test_client_gives_up_after_attempts_naming_the_site() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(
        AgentUnreachable,
        match=r"site-7: site info: agent site-7 at http://agent.test is not reachable .*3 attempt",
    ):
        _client(httpx.MockTransport(handle), attempts=3).info()


def test_client_never_retries_4xx() -> None:
    calls = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(422, json={"detail": "optimizer.lr: must be > 0"})

    with pytest.raises(AgentError, match=r"site-7: start round: HTTP 422: optimizer.lr") as info:
        _client(httpx.MockTransport(handle)).start_round({"dataset": "brain"}, b"x")
    assert info.value.status_code == 422
    assert calls == [1]


def test_client_wrong_token_is_an_auth_error_naming_the_site() -> None:
    calls = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(401, json={"detail": "invalid token"})

    with pytest.raises(AgentAuthError, match=r"site-7: .*refused the coordinator's token.*'site-7'"):
        _client(httpx.MockTransport(handle)).info()
    assert calls == [1]


def test_client_sends_plan_and_weights_as_multipart() -> None:
    seen: dict[str, bytes] = {}

    def handle(request: httpx.Request) -> httpx.Response:
        body = request.read()
        seen["body"] = body
        seen["type"] = request.headers["content-type"].encode()
        return httpx.Response(202, json={"round_id": "r1", "status": "queued"})

    client = _client(httpx.MockTransport(handle))
    assert client.start_round({"dataset": "brain"}, b"WEIGHTS") == "r1"
    assert b'name="plan"' in seen["body"] and b'"dataset": "brain"' in seen["body"]
    assert b'name="weights"' in seen["body"] and b"WEIGHTS" in seen["body"]
    assert seen["type"].startswith(b"multipart/form-data")
    assert client.transfer.sent == len(seen["body"])


@pytest.mark.parametrize("where", ["header", "status", "both-agree-but-body-changed"])
def test_client_refuses_update_whose_hash_does_not_match(where: str) -> None:
    good = b"safetensors-bytes"
    good_sha = hashlib.sha256(good).hexdigest()
    body = good
    header = good_sha
    status_sha = good_sha
    if where == "header":
        header = hashlib.sha256(b"other").hexdigest()
    elif where == "status":
        status_sha = hashlib.sha256(b"other").hexdigest()
    else:
        body = b"safetensors-bytez"

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"X-Content-SHA256": header})

    with pytest.raises(UpdateIntegrityError, match=r"site-7: update of round r1 refused: its SHA-256 is"):
        _client(httpx.MockTransport(handle)).download_update("r1", status_sha)


def test_client_accepts_matching_update_and_polls_until_done() -> None:
    data = b"update"
    sha = hashlib.sha256(data).hexdigest()
    states = iter(["queued", "running", "completed"])

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/update"):
            return httpx.Response(200, content=data, headers={"X-Content-SHA256": sha})
        return httpx.Response(
            200,
            json={
                "round_id": "r1",
                "status": next(states),
                "num_samples": 4,
                "update_sha256": sha,
                "metrics": {},
            },
        )

    client = _client(httpx.MockTransport(handle))
    status = client.wait("round", "r1", timeout=10)
    assert status.status == "completed" and status.num_samples == 4
    assert client.download_update("r1", status.update_sha256) == data


def test_client_reports_failed_round_with_its_error() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json=json.loads('{"round_id": "r1", "status": "failed", "error": "out of memory"}')
        )

    with pytest.raises(AgentError, match="site-7: round r1 ended as failed: out of memory"):
        _client(httpx.MockTransport(handle)).wait("round", "r1", timeout=10)


# -- local agents --------------------------------------------------------------------------

# A stand-in agent: on SIGTERM it marks itself stopping, then exits 0 only once every agent
# of the federation is stopping (exit 1 if that does not happen within 10 s).
_STOPPING_AGENT = """
import pathlib, signal, sys, time
marks, me, n = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def on_term(signum, frame):
    (marks / me).touch()
    deadline = time.monotonic() + 10
    while len(list(marks.iterdir())) < n:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.05)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
(marks.parent / ("ready-" + me)).touch()
while True:
    time.sleep(0.1)
"""


def test_local_federation_stops_all_agents_at_once(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from coordinator.local import LocalAgent, LocalFederation

    marks = tmp_path / "marks"
    marks.mkdir()
    fed = LocalFederation(tmp_path / "logs")
    names = ["a", "b", "c"]
    for name in names:
        proc = subprocess.Popen(
            [sys.executable, "-c", _STOPPING_AGENT, str(marks), name, str(len(names))],
            start_new_session=True,
        )
        fed.agents[name] = LocalAgent(name, tmp_path / "config.yaml", 0, proc, tmp_path / f"{name}.log")
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready-{n}").exists() for n in names):
        assert time.monotonic() < deadline, "stand-in agents did not start"
        time.sleep(0.05)
    fed.stop(timeout=20)
    # Each stand-in exits cleanly only if all were asked to stop before any was waited for.
    assert {n: a.process.returncode for n, a in fed.agents.items()} == dict.fromkeys(names, 0)
