"""Real agents for the coordinator tests: generated sites, one `fedsite serve` process each.

Tokens are static config tokens (only their SHA-256 in the config) so that no `fedsite
tokens add` process is needed per site; `fedsite demo` exercises the token command.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

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
