"""A small client for ONE local fedsite agent's API, as the site's SuperNode reaches it.

It uses the same path a coordinator does (`POST /v1/rounds` or `/v1/evaluations` with a `plan`
JSON part and a `weights` safetensors part, poll the status, download the update), so each job
passes the agent's approval policy, worker, egress gate and audit log. It knows only the URL of
its own agent and a token for it (read from a file named in the SuperNode's node config).

Errors keep the agent's reason: a plan the site has not approved is a `PlanRefused` carrying the
plan's hash (the agent's 403 names it), a 4xx is an `AgentApiError` with the agent's `detail`,
and a downloaded update whose SHA-256 differs from the `X-Content-SHA256` header or from the
status's `update_sha256` is an `UpdateIntegrityError`. Transport failures and 5xx answers are
retried (jobs carry an id, so a repeated POST finds the existing job instead of a second one).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("completed", "failed", "cancelled", "interrupted")
# The wording of the agent's PlanNotApproved (agent.errors); this package cannot import the agent.
_PLAN_HASH = re.compile(r"\bplan ([0-9a-f]{64}) is not approved\b")


class AgentApiError(Exception):
    """The agent refused or failed a request; `reason` is its own explanation."""

    def __init__(self, reason: str, *, status_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code


class PlanRefused(AgentApiError):
    """The site has not approved the plan; `plan_hash` is what its admin approves."""

    def __init__(self, reason: str, *, plan_hash: str, status_code: int = 403) -> None:
        super().__init__(reason, status_code=status_code)
        self.plan_hash = plan_hash


class UpdateIntegrityError(AgentApiError):
    """Downloaded update bytes whose hash is not the one the agent announced."""


class JobEnded(AgentApiError):
    """A job that ended as failed, cancelled or interrupted, or did not end in time."""


@dataclass
class Transfer:
    """Request and response body bytes exchanged with the agent."""

    sent: int = 0
    received: int = 0


@dataclass
class JobStatus:
    job_id: str
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    num_samples: int | None = None
    update_sha256: str | None = None
    error: str | None = None
    # A completed round's signed audit head, kept as it came (the site's officer checks it).
    audit_anchor: dict[str, Any] | None = None


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:500] or resp.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)[:500]
    return json.dumps(body)[:500]


def read_token(path: Path) -> str:
    """The token in PATH (first non-empty line); the error names the file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise AgentApiError(f"cannot read the agent token file {path}: {exc}") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise AgentApiError(f"the agent token file {path} is empty")
    return token


class AgentAPI:
    """The local agent at URL with TOKEN (a `coordinator`-role token of that site)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 60.0,
        poll_interval: float = 0.5,
        status_wait: float = 5.0,
        attempts: int = 4,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise AgentApiError(f"agent-url {url!r} is not an http(s) URL")
        self.url = url.rstrip("/")
        if not 0 <= status_wait < timeout:
            raise AgentApiError(
                f"status_wait ({status_wait:g} s) must be at least 0 and shorter than the timeout "
                f"({timeout:g} s): a status request waits that long for its answer"
            )
        self.poll_interval = poll_interval
        # Each status request asks the agent to answer when the job stops, or after this many
        # seconds (the agent's long poll, `?wait=`); 0 polls plainly.
        self.status_wait = min(status_wait, 30.0)
        self.attempts = max(1, attempts)
        self.transfer = Transfer()
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "fedsite-flower"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
            follow_redirects=False,
        )

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], **kwargs: Any) -> AgentAPI:
        """From the SuperNode's node config: `agent-url` and `token-file` (both required)."""
        missing = [k for k in ("agent-url", "token-file") if not node_config.get(k)]
        if missing:
            raise AgentApiError(
                f"the SuperNode's node config lacks {', '.join(missing)}; start it with "
                "--node-config \"agent-url='http://127.0.0.1:8443' token-file='/path/to/token'\""
            )
        token = read_token(Path(str(node_config["token-file"])))
        return cls(str(node_config["agent-url"]), token, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -------------------------------------------------------------------------

    def request(self, method: str, path: str, *, what: str, **kwargs: Any) -> httpx.Response:
        """One request, retried on transport errors and 5xx; a 4xx raises at once."""
        last = ""
        for attempt in range(1, self.attempts + 1):
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                self.transfer.sent += int(resp.request.headers.get("content-length", "0") or 0)
                self.transfer.received += len(resp.content)
                if resp.status_code < 400:
                    return resp
                detail = _detail(resp)
                if resp.status_code < 500:
                    raise self._refusal(what, resp.status_code, detail)
                last = f"HTTP {resp.status_code}: {detail}"
            if attempt < self.attempts:
                self._sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
        raise AgentApiError(
            f"{what}: no good answer from the agent at {self.url} after {self.attempts} attempt(s): {last}"
        )

    def _refusal(self, what: str, status: int, detail: str) -> AgentApiError:
        found = _PLAN_HASH.search(detail) if status == 403 else None
        if found is not None:
            digest = found.group(1)
            return PlanRefused(
                f"{what}: the site has not approved plan {digest} ({detail})",
                plan_hash=digest,
                status_code=status,
            )
        return AgentApiError(f"{what}: HTTP {status}: {detail}", status_code=status)

    def _json(self, resp: httpx.Response, what: str) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            raise AgentApiError(f"{what}: the agent's answer is not JSON (HTTP {resp.status_code})") from None
        if not isinstance(body, dict):
            raise AgentApiError(f"{what}: the agent's answer is not a JSON object")
        return body

    # -- API -------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return self._json(self.request("GET", "/v1/info", what="site info"), "site info")

    def start_round(self, plan: Mapping[str, Any], weights: bytes) -> str:
        return self._start("/v1/rounds", "round_id", plan, weights, what="start round")

    def start_evaluation(self, plan: Mapping[str, Any], weights: bytes) -> str:
        return self._start("/v1/evaluations", "evaluation_id", plan, weights, what="start evaluation")

    def _start(self, path: str, id_key: str, plan: Mapping[str, Any], weights: bytes, *, what: str) -> str:
        files = {
            "plan": (None, json.dumps(dict(plan)), "application/json"),
            "weights": ("weights.safetensors", weights, "application/octet-stream"),
        }
        body = self._json(self.request("POST", path, what=what, files=files), what)
        job_id = body.get(id_key)
        if not isinstance(job_id, str) or not job_id:
            raise AgentApiError(f"{what}: the agent's answer has no {id_key!r}: {json.dumps(body)[:200]}")
        return job_id

    def status(self, kind: str, job_id: str, *, wait: float = 0.0) -> JobStatus:
        """The job's status; with WAIT, once it has stopped or WAIT seconds passed (an agent
        that predates `?wait=` answers at once)."""
        if kind not in ("round", "evaluation"):
            raise ValueError(f"kind must be 'round' or 'evaluation', got {kind!r}")
        what = f"{kind} status"
        path = f"/v1/rounds/{job_id}" if kind == "round" else f"/v1/evaluations/{job_id}"
        params = {"wait": f"{wait:.3f}"} if wait > 0 else None
        body = self._json(self.request("GET", path, what=what, params=params), what)
        status = body.get("status")
        if not isinstance(status, str):
            raise AgentApiError(f"{what} of {job_id}: the answer has no 'status'")
        num = body.get("num_samples")
        anchor = body.get("audit_anchor")
        return JobStatus(
            job_id=job_id,
            status=status,
            metrics=body.get("metrics") or {},
            num_samples=int(num) if isinstance(num, int | float) else None,
            update_sha256=body.get("update_sha256"),
            error=body.get("error"),
            audit_anchor=anchor if isinstance(anchor, dict) else None,
        )

    def wait(self, kind: str, job_id: str, *, timeout: float) -> JobStatus:
        """Poll until the job ends; a job that does not complete raises JobEnded with its reason.
        Requests are at least `poll_interval` apart, each waiting up to `status_wait` at the agent."""
        deadline = time.monotonic() + timeout
        while True:
            asked = time.monotonic()
            status = self.status(kind, job_id, wait=min(self.status_wait, max(0.0, deadline - asked)))
            if status.status == "completed":
                return status
            if status.status in TERMINAL:
                reason = f": {status.error}" if status.error else ""
                raise JobEnded(f"{kind} {job_id} ended as {status.status}{reason}")
            if time.monotonic() >= deadline:
                raise JobEnded(
                    f"{kind} {job_id} did not finish within {timeout:g} s (last status {status.status})"
                )
            pause = self.poll_interval - (time.monotonic() - asked)
            if pause > 0:
                self._sleep(pause)

    def cancel(self, kind: str, job_id: str) -> None:
        path = f"/v1/rounds/{job_id}/cancel" if kind == "round" else f"/v1/evaluations/{job_id}/cancel"
        self.request("POST", path, what=f"cancel {kind}")

    def download_update(self, round_id: str, expected_sha256: str | None) -> bytes:
        """The round's update; refused unless its SHA-256 equals both the header and the status's hash."""
        resp = self.request("GET", f"/v1/rounds/{round_id}/update", what="download update")
        data = resp.content
        actual = hashlib.sha256(data).hexdigest()
        header = (resp.headers.get("X-Content-SHA256") or "").strip().lower()
        if not header:
            raise UpdateIntegrityError(
                f"the update of round {round_id} came without an X-Content-SHA256 header"
            )
        if not expected_sha256:
            raise UpdateIntegrityError(f"round {round_id} completed without an update_sha256 in its status")
        if actual != header or actual != expected_sha256.lower():
            raise UpdateIntegrityError(
                f"the update of round {round_id} is refused: its SHA-256 is {actual}, but the "
                f"X-Content-SHA256 header says {header} and the round status says {expected_sha256}"
            )
        return data
