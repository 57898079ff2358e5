"""HTTP client for one site agent (API v1).

Transport failures (connection refused, reset, timeouts) and 5xx answers are retried with
exponential backoff: rounds carry a `round_id`, so a repeated POST finds the existing round
instead of starting a second one. A 4xx is never retried: it means the request itself is
wrong (bad token, plan not approved, unknown dataset), and repeating it cannot help.

Every downloaded update is checked twice: its SHA-256 must equal the `X-Content-SHA256`
header of the download and the `update_sha256` the agent's status reported (which the
agent's egress gate recorded in its audit log). Bytes changed on the way are refused.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from coordinator.errors import (
    AgentAuthError,
    AgentError,
    AgentUnreachable,
    JobFailed,
    JobTimeout,
    UpdateIntegrityError,
)
from coordinator.federation import AgentEntry, Federation, Retries, Timeouts

TERMINAL = ("completed", "failed", "cancelled", "interrupted")


@dataclass
class Transfer:
    """Bytes moved between the coordinator and one agent (request and response bodies)."""

    sent: int = 0
    received: int = 0

    def snapshot(self) -> tuple[int, int]:
        return self.sent, self.received


@dataclass
class RemoteJobStatus:
    """A round or evaluation at one agent, as its status endpoint last answered (`status` is one
    of the agent's `JobStatus` values, as text)."""

    job_id: str
    status: str
    progress: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    num_samples: int | None = None
    update_sha256: str | None = None
    error: str | None = None
    # A completed round's signed audit head (the agent's `audit_anchor`), kept as it came: the
    # coordinator cannot check it against the site's log, it stores it for whoever can.
    audit_anchor: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _ssl_context(entry: AgentEntry) -> ssl.SSLContext | bool:
    if entry.ca_file is None and entry.client_cert is None:
        return True
    ctx = ssl.create_default_context(cafile=str(entry.ca_file) if entry.ca_file else None)
    if entry.client_cert is not None and entry.client_key is not None:
        ctx.load_cert_chain(str(entry.client_cert), str(entry.client_key))
    return ctx


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        text = resp.text.strip()
        return text[:300] if text else resp.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)[:500]
    return json.dumps(body)[:300]


class AgentClient:
    """One agent, reached over HTTP(S) with its own token; safe to use from one thread at a time."""

    def __init__(
        self,
        entry: AgentEntry,
        *,
        timeouts: Timeouts | None = None,
        retries: Retries | None = None,
        poll_interval: float = 1.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = entry.name
        self.url = entry.url
        self.timeouts = timeouts or Timeouts()
        self.retries = retries or Retries()
        self.poll_interval = poll_interval
        self.transfer = Transfer()
        self._sleep = sleep
        self._lock = threading.Lock()
        try:
            token = entry.bearer_token()
        except OSError as exc:
            raise AgentError(self.name, f"cannot read token_file {entry.token_file}: {exc}") from None
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "fedsite-coordinator"},
            timeout=httpx.Timeout(self.timeouts.read, connect=self.timeouts.connect),
            verify=_ssl_context(entry),
            transport=transport,
            follow_redirects=False,
        )

    @classmethod
    def for_federation(cls, fed: Federation, **kwargs: Any) -> dict[str, AgentClient]:
        return {
            a.name: cls(
                a, timeouts=fed.timeouts, retries=fed.retries, poll_interval=fed.poll_interval, **kwargs
            )
            for a in [*fed.agents, *fed.outside]
        }

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------

    def _count(self, resp: httpx.Response) -> None:
        with self._lock:
            self.transfer.sent += int(resp.request.headers.get("content-length", "0") or 0)
            self.transfer.received += len(resp.content)

    def request(self, method: str, path: str, *, what: str, **kwargs: Any) -> httpx.Response:
        """Send one request with retries; return a 2xx response or raise an AgentError naming the site."""
        attempts = self.retries.attempts
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                self._count(resp)
                if resp.status_code < 400:
                    return resp
                if resp.status_code in (401, 403):
                    raise AgentAuthError(
                        self.name,
                        f"{what}: the agent at {self.url} refused the coordinator's credentials "
                        f"(HTTP {resp.status_code}: {_detail(resp)}); check the token for {self.name!r} "
                        "in the federation file",
                        status_code=resp.status_code,
                    )
                if resp.status_code < 500:
                    raise AgentError(
                        self.name,
                        f"{what}: HTTP {resp.status_code}: {_detail(resp)}",
                        status_code=resp.status_code,
                    )
                last = f"HTTP {resp.status_code}: {_detail(resp)}"
            if attempt < attempts:
                self._sleep(min(self.retries.backoff * (2 ** (attempt - 1)), self.retries.max_backoff))
        raise AgentUnreachable(
            self.name, f"{what}: no answer from {self.url} after {attempts} attempt(s): {last}"
        )

    # -- API -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json(self.request("GET", "/v1/health", what="health check"), "health check")

    def info(self) -> dict[str, Any]:
        return self._json(self.request("GET", "/v1/info", what="site info"), "site info")

    def start_round(self, plan: dict[str, Any], weights: bytes | None) -> str:
        return self._start("/v1/rounds", "round_id", plan, weights, what="start round")

    def start_evaluation(self, plan: dict[str, Any], weights: bytes) -> str:
        return self._start("/v1/evaluations", "evaluation_id", plan, weights, what="start evaluation")

    def round_status(self, round_id: str) -> RemoteJobStatus:
        body = self._json(self.request("GET", f"/v1/rounds/{round_id}", what="round status"), "round status")
        return self._status(body, "round_id", round_id)

    def evaluation_status(self, evaluation_id: str) -> RemoteJobStatus:
        what = "evaluation status"
        body = self._json(self.request("GET", f"/v1/evaluations/{evaluation_id}", what=what), what)
        return self._status(body, "evaluation_id", evaluation_id)

    def cancel_round(self, round_id: str) -> None:
        self.request("POST", f"/v1/rounds/{round_id}/cancel", what="cancel round")

    def cancel_evaluation(self, evaluation_id: str) -> None:
        self.request("POST", f"/v1/evaluations/{evaluation_id}/cancel", what="cancel evaluation")

    def download_update(self, round_id: str, expected_sha256: str | None) -> bytes:
        """The round's update; refused unless its hash equals both the header and the status's hash."""
        resp = self.request("GET", f"/v1/rounds/{round_id}/update", what="download update")
        data = resp.content
        actual = hashlib.sha256(data).hexdigest()
        header = (resp.headers.get("X-Content-SHA256") or "").strip().lower()
        if not header:
            raise UpdateIntegrityError(
                self.name, f"update of round {round_id} came without an X-Content-SHA256 header"
            )
        if not expected_sha256:
            raise UpdateIntegrityError(
                self.name, f"round {round_id} completed without an update_sha256 in its status"
            )
        if actual != header or actual != expected_sha256.lower():
            raise UpdateIntegrityError(
                self.name,
                f"update of round {round_id} refused: its SHA-256 is {actual}, but the X-Content-SHA256 "
                f"header says {header} and the round status says {expected_sha256}; "
                "the bytes were changed on the way",
            )
        return data

    def wait(
        self,
        kind: str,
        job_id: str,
        *,
        timeout: float,
        on_status: Callable[[RemoteJobStatus], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> RemoteJobStatus:
        """Poll a round or evaluation until it ends; raise JobFailed / JobTimeout naming the site."""
        status_of = self.round_status if kind == "round" else self.evaluation_status
        deadline = time.monotonic() + timeout
        while True:
            status = status_of(job_id)
            if on_status is not None:
                on_status(status)
            if status.status == "completed":
                return status
            if status.status in TERMINAL:
                reason = f": {status.error}" if status.error else ""
                raise JobFailed(self.name, f"{kind} {job_id} ended as {status.status}{reason}")
            if should_stop is not None and should_stop():
                raise JobFailed(self.name, f"{kind} {job_id} abandoned by the coordinator")
            if time.monotonic() >= deadline:
                raise JobTimeout(self.name, f"{kind} {job_id} did not finish within {timeout:g} s")
            self._sleep(self.poll_interval)

    # -- helpers ---------------------------------------------------------------------------

    def _start(
        self, path: str, id_key: str, plan: dict[str, Any], weights: bytes | None, *, what: str
    ) -> str:
        files: dict[str, Any] = {"plan": (None, json.dumps(plan), "application/json")}
        if weights is not None:
            files["weights"] = ("weights.safetensors", weights, "application/octet-stream")
        body = self._json(self.request("POST", path, what=what, files=files), what)
        job_id = body.get(id_key)
        if not isinstance(job_id, str) or not job_id:
            raise AgentError(self.name, f"{what}: answer has no {id_key!r}: {json.dumps(body)[:200]}")
        return job_id

    def _json(self, resp: httpx.Response, what: str) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            raise AgentError(self.name, f"{what}: answer is not JSON (HTTP {resp.status_code})") from None
        if not isinstance(body, dict):
            raise AgentError(self.name, f"{what}: answer is not a JSON object")
        return body

    def _status(self, body: dict[str, Any], id_key: str, job_id: str) -> RemoteJobStatus:
        status = body.get("status")
        if not isinstance(status, str):
            raise AgentError(self.name, f"status of {job_id}: answer has no 'status'")
        num = body.get("num_samples")
        anchor = body.get("audit_anchor")
        return RemoteJobStatus(
            job_id=str(body.get(id_key, job_id)),
            status=status,
            progress=body.get("progress"),
            metrics=body.get("metrics") or {},
            num_samples=int(num) if isinstance(num, int | float) else None,
            update_sha256=body.get("update_sha256"),
            error=body.get("error"),
            audit_anchor=anchor if isinstance(anchor, dict) else None,
            raw=body,
        )
