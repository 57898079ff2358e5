"""The HTTP client of the relay's wire protocol (`/v1/relay/...`), one method per endpoint.

httpx with `trust_env=True`: HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY are honoured,
because a hospital's one way out is often a proxy. HTTPS trusts `connect.ca_file` (the system
store when unset) and presents `connect.client_cert`/`client_key` for mutual TLS. The bearer
token is read from `connect.token_file`; it is never logged.

Failures are httpx's own exceptions, so that callers tell them apart without a parallel
hierarchy: `httpx.TransportError` (nothing answered: refused, reset, timed out, TLS) is worth a
retry; `httpx.HTTPStatusError` carries the relay's answer (`status_of`, `detail_of`), 409 meaning
that the lease is not current. Answers are validated by the models below.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field

from agent.config import ConnectConfig
from agent.tls.contexts import client_ssl_context
from agent.validation import StrictModel

HEX = r"^[0-9a-f]{8,128}$"
SHA256 = r"^[0-9a-f]{64}$"
# Round and evaluation ids as the push API accepts them in plan.round_id.
JOB_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
# Added to a long poll's wait: the relay answers 204 after `wait` seconds, not before.
POLL_GRACE_S = 15.0
REFUSAL_CODES = ("plan_not_approved", "invalid_task", "weights_mismatch", "not_runnable", "secagg_refused")
RefusalCode = Literal[
    "plan_not_approved", "invalid_task", "weights_mismatch", "not_runnable", "secagg_refused"
]


class WeightsRef(StrictModel):
    sha256: str = Field(pattern=SHA256)
    bytes: int = Field(ge=0)


class Task(StrictModel):
    """One task as the relay hands it out: exactly what the push API receives, plus its lease."""

    task_id: str = Field(pattern=HEX)
    lease_id: str = Field(pattern=HEX)
    lease_expires_at: datetime
    # secagg: one secure-aggregation step of a round; its plan is {round_id, step, message}.
    kind: Literal["train", "evaluate", "secagg"]
    job_id: str = Field(pattern=JOB_ID)
    plan: dict[str, Any]
    weights: WeightsRef | None = None


class Registration(BaseModel):
    """The relay's answer to a registration: its timings and sizes (later keys are ignored)."""

    site: str
    heartbeat_s: float = Field(gt=0)
    lease_s: float = Field(gt=0)
    chunk_bytes: int = Field(gt=0)
    max_wait_s: float = Field(ge=0)


class Lease(BaseModel):
    valid: bool
    lease_expires_at: datetime | None = None
    cancel: bool = False
    reason: str | None = None


class HeartbeatAnswer(BaseModel):
    heartbeat_s: float = Field(gt=0)
    leases: dict[str, Lease] = Field(default_factory=dict)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of a relay's refusal; None when nothing answered."""
    return exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None


def detail_of(exc: BaseException) -> str:
    """What went wrong, in words fit for a log line and an audit event (no token, no body dump)."""
    if isinstance(exc, httpx.HTTPStatusError):
        response = exc.response
        try:
            detail = response.json().get("detail")
        except (ValueError, AttributeError):
            detail = None
        text = detail if isinstance(detail, str) else (json.dumps(detail) if detail else response.text[:300])
        return f"HTTP {response.status_code}: {text}"
    if isinstance(exc, httpx.TransportError):
        cause = exc.__cause__ or exc.__context__
        extra = f" ({type(cause).__name__}: {cause})" if cause and str(cause) not in str(exc) else ""
        return f"{type(exc).__name__}: {exc}{extra}"
    return f"{type(exc).__name__}: {exc}"


def read_token(cfg: ConnectConfig) -> str:
    """The site's relay token from `connect.token_file` (the config check made sure it is there)."""
    if cfg.token_file is None:
        raise ValueError("connect.token_file: required when the connector runs")
    token = cfg.token_file.read_text().strip()
    if not token:
        raise ValueError(f"connect.token_file: the file is empty: {cfg.token_file}")
    return token


def ssl_verify(cfg: ConnectConfig) -> ssl.SSLContext | bool:
    """httpx's `verify` for the relay: the configured CA and client certificate, else the defaults."""
    url = cfg.coordinator_url or ""
    if not url.startswith("https://"):
        return True
    return client_ssl_context(cfg.ca_file, cfg.client_cert, cfg.client_key)


class RelayClient:
    """The relay's endpoints; thread-safe (one httpx connection pool shared by the connector's threads)."""

    def __init__(
        self,
        cfg: ConnectConfig,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        if cfg.coordinator_url is None:
            raise ValueError("connect.coordinator_url: required when the connector runs")
        self.base_url = cfg.coordinator_url
        self.timeout_s = timeout_s
        self._http = httpx.Client(
            base_url=f"{self.base_url}/v1/relay",
            headers={"Authorization": f"Bearer {read_token(cfg)}"},
            timeout=httpx.Timeout(timeout_s),
            verify=ssl_verify(cfg),
            trust_env=True,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        response.raise_for_status()
        return response

    def register(self, info: dict[str, Any], running: list[str]) -> Registration:
        answer = self._send("POST", "/register", json={"info": info, "running": running})
        return Registration.model_validate(answer.json())

    def next_task(self, wait_s: float) -> Any | None:
        """The raw TASK (validated by the caller, which refuses a malformed one), or None after WAIT_S."""
        answer = self._send(
            "GET",
            "/tasks/next",
            params={"wait": f"{wait_s:g}"},
            timeout=httpx.Timeout(self.timeout_s, read=wait_s + POLL_GRACE_S),
        )
        if answer.status_code == 204:
            return None
        body = answer.json()
        return body.get("task") if isinstance(body, dict) else body

    @contextlib.contextmanager
    def blob(self, sha256: str) -> Iterator[httpx.Response]:
        """The blob's response, streamed: the caller reads it in bounded pieces."""
        with self._http.stream("GET", f"/blobs/{sha256}") as response:
            if response.status_code >= 400:
                response.read()
                response.raise_for_status()
            yield response

    def heartbeat(self, tasks: list[dict[str, Any]]) -> HeartbeatAnswer:
        answer = self._send("POST", "/heartbeat", json={"tasks": tasks})
        return HeartbeatAnswer.model_validate(answer.json())

    def chunks_have(self, task_id: str, lease_id: str) -> set[str]:
        answer = self._send("GET", f"/tasks/{task_id}/chunks", params={"lease_id": lease_id})
        have = answer.json().get("have", [])
        return {h for h in have if isinstance(h, str)}

    def put_chunk(self, task_id: str, lease_id: str, sha256: str, data: bytes) -> None:
        self._send(
            "PUT",
            f"/tasks/{task_id}/chunks/{sha256}",
            params={"lease_id": lease_id},
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    def commit(self, task_id: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = self._send("POST", f"/tasks/{task_id}/commit", json=body)
        result: dict[str, Any] = answer.json()
        return result

    def refuse(
        self, task_id: str, lease_id: str, code: RefusalCode, reason: str, plan_hash: str | None
    ) -> None:
        self._send(
            "POST",
            f"/tasks/{task_id}/refuse",
            json={"lease_id": lease_id, "code": code, "reason": reason, "plan_hash": plan_hash},
        )
