"""Real agents for the coordinator tests: generated sites, one `fedsite serve` process each.

Tokens are static config tokens (only their SHA-256 in the config) so that no `fedsite
tokens add` process is needed per site; `fedsite demo` exercises the token command.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
import yaml

from coordinator.client import AgentClient
from coordinator.federation import Federation, parse_federation
from coordinator.local import LocalAgent, LocalFederation

TOKEN_PREFIX = "coord-token-"


def tiny_plan(size: int = 32, **overrides: Any) -> dict[str, Any]:
    """The generated data's default plan, made as cheap as possible to train."""
    from coordinator.demo_federation import default_plan

    plan = default_plan(size=size)
    plan["model"]["channels"] = [4, 8]
    plan["model"]["strides"] = [2]
    plan["model"]["num_res_units"] = 0
    plan["batch_size"] = 4
    plan["data"]["samples_per_subject"] = 2
    plan.update(overrides)
    return plan


def add_static_token(config: Path, token: str, name: str = "coordinator") -> None:
    doc = yaml.safe_load(config.read_text())
    doc.setdefault("api", {}).setdefault("tokens", []).append(
        {"name": name, "role": "coordinator", "sha256": hashlib.sha256(token.encode()).hexdigest()}
    )
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


@dataclass
class RealFederation:
    root: Path
    configs: dict[str, Path]
    agents: dict[str, LocalAgent]
    tokens: dict[str, str]
    local: LocalFederation

    @property
    def names(self) -> list[str]:
        return list(self.agents)

    def federation(
        self, *, urls: dict[str, str] | None = None, tokens: dict[str, str] | None = None, min_sites: int = 1
    ) -> Federation:
        urls = {**{n: a.url for n, a in self.agents.items()}, **(urls or {})}
        toks = {**self.tokens, **(tokens or {})}
        return parse_federation(
            {
                "agents": [{"name": n, "url": urls[n], "token": toks[n]} for n in self.agents],
                "min_sites": min_sites,
                "timeouts": {"connect": 5, "read": 60, "round": 300, "evaluation": 300},
                "retries": {"attempts": 3, "backoff": 0.2, "max_backoff": 1},
                "poll_interval": 0.2,
            }
        )

    def download_update(self, site: str, round_id: str) -> tuple[bytes, str]:
        """An update fetched straight from the agent (not through the coordinator), with its header hash."""
        resp = httpx.get(
            f"{self.agents[site].url}/v1/rounds/{round_id}/update",
            headers={"Authorization": f"Bearer {self.tokens[site]}"},
            timeout=30,
        )
        resp.raise_for_status()
        return resp.content, resp.headers["X-Content-SHA256"]


@contextmanager
def real_federation(root: Path, subjects: list[int], size: int = 32) -> Iterator[RealFederation]:
    from coordinator.demo_federation import generate_federation

    layout = generate_federation(
        root / "data", sites=len(subjects), subjects_per_site=subjects, size=size, seed=0
    )
    configs = {s.site_id: s.config_path for s in layout.sites}
    tokens = {name: TOKEN_PREFIX + name for name in configs}
    for name, path in configs.items():
        add_static_token(path, tokens[name])
    local = LocalFederation(root / "logs")
    try:
        agents = local.start_many(configs)
        yield RealFederation(root, configs, agents, tokens, local)
    finally:
        local.stop()


@dataclass
class TamperingProxy:
    """An HTTP proxy on 127.0.0.1 that flips one byte in the body of every update it forwards."""

    upstream: str
    tampered: int = 0
    forwarded: int = 0
    _server: http.server.ThreadingHTTPServer | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> TamperingProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length", "connection")
                }
                resp = httpx.request(
                    self.command, proxy.upstream + self.path, headers=headers, content=body, timeout=60
                )
                data = bytearray(resp.content)
                proxy.forwarded += 1
                if (
                    self.command == "GET"
                    and self.path.endswith("/update")
                    and resp.status_code == 200
                    and data
                ):
                    data[len(data) - len(data) // 3] ^= 0x01  # inside the tensor data, not the header
                    proxy.tampered += 1
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in (
                        "content-length",
                        "transfer-encoding",
                        "connection",
                        "content-encoding",
                    ):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(bytes(data))

            do_GET = _forward
            do_POST = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


# -- agents answered in this process --------------------------------------------------------


def toy_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny model state: two float tensors and an integer counter (as BatchNorm keeps)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(2, 1, 3, 3, generator=g),
        "conv.bias": torch.randn(2, generator=g),
        "bn.num_batches_tracked": torch.tensor(3, dtype=torch.int64),
    }


def _multipart(request: httpx.Request) -> dict[str, bytes]:
    """The parts of a multipart/form-data body by field name (byte-exact, binary parts included)."""
    boundary = request.headers["content-type"].split("boundary=", 1)[1].strip('"').encode()
    parts: dict[str, bytes] = {}
    for chunk in request.read().split(b"--" + boundary)[1:-1]:
        head, _, body = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        name = head.split(b'name="', 1)[1].split(b'"', 1)[0].decode()
        parts[name] = body.removesuffix(b"\r\n")
    return parts


@dataclass
class FakeAgent:
    """The agent API (v1) answered in this process, for coordinator tests that need no real agent.

    "Training" is deterministic: the update moves every float tensor by noise drawn from a seed
    that hashes the site and the plan (so a reseeded or otherwise changed plan gives another
    update, the same plan the same one). Evaluation derives a Dice from the weights. Every job
    completes on its first status request, so nothing sleeps.
    """

    name: str
    num_samples: int
    dataset: str = "brain"
    fail_rounds: bool = False
    unreachable: bool = False
    trained: list[dict[str, Any]] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    _jobs: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def train(self, plan: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        basis = {k: v for k, v in plan.items() if k != "round_id"}
        digest = hashlib.sha256(f"{self.name}:{json.dumps(basis, sort_keys=True)}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
        out: dict[str, torch.Tensor] = {}
        for key in sorted(weights):  # decoded key order is not fixed; the noise drawn must be
            value = weights[key]
            if value.is_floating_point():
                new = value + 0.1 * torch.randn(value.shape, generator=g)
                out[key] = new - value if plan.get("send") == "diff" else new
            else:
                out[key] = torch.zeros_like(value) if plan.get("send") == "diff" else value + 1
        return out

    def dice(self, weights: dict[str, torch.Tensor]) -> float:
        floats = [weights[k].flatten() for k in sorted(weights) if weights[k].is_floating_point()]
        mean = float(torch.cat(floats).mean())
        return 0.5 + 0.4 * math.tanh(mean + len(self.name) / 100)

    def handle(self, request: httpx.Request) -> httpx.Response:
        from coordinator.weights import decode, encode

        if self.unreachable:
            raise httpx.ConnectError("refused", request=request)
        path = request.url.path
        if path == "/v1/info":
            return httpx.Response(200, json={"site_id": self.name, "datasets": [{"name": self.dataset}]})
        if request.method == "POST" and path in ("/v1/rounds", "/v1/evaluations"):
            parts = _multipart(request)
            plan = json.loads(parts["plan"])
            weights = decode(parts["weights"])
            job_id = str(plan["round_id"])
            with self._lock:
                if path == "/v1/rounds":
                    self.trained.append(plan)
                    update = encode(self.train(plan, weights))
                    self._jobs[job_id] = {"update": update, "plan": plan}
                    return httpx.Response(202, json={"round_id": job_id, "status": "queued"})
                self.evaluated.append(job_id)
                self._jobs[job_id] = {"dice": self.dice(weights)}
                return httpx.Response(202, json={"evaluation_id": job_id, "status": "queued"})
        if request.method == "GET" and path.startswith("/v1/rounds/"):
            job_id = path.split("/")[3]
            job = self._jobs[job_id]
            if path.endswith("/update"):
                sha = hashlib.sha256(job["update"]).hexdigest()
                return httpx.Response(200, content=job["update"], headers={"X-Content-SHA256": sha})
            if self.fail_rounds:
                failed = {"round_id": job_id, "status": "failed", "error": "out of memory"}
                return httpx.Response(200, json=failed)
            early = job["plan"].get("early_stopping")
            metrics: dict[str, Any] = {"loss": 0.25}
            if early:
                metrics.update(epochs_run=min(2, early["max_epochs"]), best_epoch=1)
            return httpx.Response(
                200,
                json={
                    "round_id": job_id,
                    "status": "completed",
                    "num_samples": self.num_samples,
                    "update_sha256": hashlib.sha256(job["update"]).hexdigest(),
                    "metrics": metrics,
                },
            )
        if request.method == "GET" and path.startswith("/v1/evaluations/"):
            job_id = path.split("/")[3]
            dice = self._jobs[job_id]["dice"]
            return httpx.Response(
                200,
                json={
                    "evaluation_id": job_id,
                    "status": "completed",
                    "num_samples": self.num_samples,
                    "metrics": {"dice": dice},
                },
            )
        return httpx.Response(404, json={"detail": f"no route {request.method} {path}"})


@dataclass
class FakeFederation:
    """Fake agents with a federation file that names them and clients wired to them."""

    agents: dict[str, FakeAgent]
    outside: dict[str, FakeAgent] = field(default_factory=dict)
    min_sites: int = 1

    def federation(self) -> Federation:
        def entry(name: str) -> dict[str, str]:
            return {"name": name, "url": f"http://{name}.test", "token": f"tok-{name}"}

        return parse_federation(
            {
                "agents": [entry(n) for n in self.agents],
                "outside": [entry(n) for n in self.outside],
                "min_sites": self.min_sites,
                "retries": {"attempts": 1},
            }
        )

    def clients(self, fed: Federation) -> dict[str, AgentClient]:
        everyone = {**self.agents, **self.outside}
        return {
            a.name: AgentClient(
                a,
                timeouts=fed.timeouts,
                retries=fed.retries,
                poll_interval=fed.poll_interval,
                transport=httpx.MockTransport(everyone[a.name].handle),
                sleep=lambda _s: None,
            )
            for a in [*fed.agents, *fed.outside]
        }


def fake_federation(
    samples: dict[str, int], *, outside: dict[str, int] | None = None, min_sites: int = 1
) -> FakeFederation:
    return FakeFederation(
        {n: FakeAgent(n, k) for n, k in samples.items()},
        {n: FakeAgent(n, k) for n, k in (outside or {}).items()},
        min_sites,
    )
