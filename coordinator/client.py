"""HTTP client for one site agent (API v1).

Transport failures (connection refused, reset, timeouts) and 5xx answers are retried with
exponential backoff: rounds carry a `round_id`, so a repeated POST finds the existing round
instead of starting a second one. A 4xx is never retried: it means the request itself is
wrong (bad token, plan not approved, unknown dataset), and repeating it cannot help; nor is a
certificate that cannot be trusted.

Each failure is reported by its cause, because each has another remedy and another person to
fix it: a plan the site has not approved (`AgentPlanRefused`, with the hash its admin
approves), a token the site refuses (`AgentAuthError`), an agent that does not answer
(`AgentUnreachable`: connection refused, timed out, or closed before an answer) and a
certificate that does not name the host of the URL or is not trusted (`AgentTlsError`).

Every downloaded update is checked twice: its SHA-256 must equal the `X-Content-SHA256`
header of the download and the `update_sha256` the agent's status reported (which the
agent's egress gate recorded in its audit log). Bytes changed on the way are refused.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from cryptography import x509

from agent.errors import PlanNotApproved
from coordinator.errors import (
    AgentAuthError,
    AgentError,
    AgentPlanRefused,
    AgentTlsError,
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


class TransferCounter(Protocol):
    """Bytes moved with one site so far: (sent to it, received from it)."""

    def snapshot(self) -> tuple[int, int]: ...


class SiteClient(Protocol):
    """What the runner asks of one site, whichever way it is reached: `AgentClient` posts to a
    push site's API, `coordinator.relay.client.RelaySiteClient` queues tasks that a pull site
    fetches from the relay. Both raise the same `AgentError` subclasses, naming the site."""

    @property
    def name(self) -> str: ...

    @property
    def transfer(self) -> TransferCounter: ...

    def info(self) -> dict[str, Any]: ...

    def start_round(self, plan: dict[str, Any], weights: bytes | None) -> str: ...

    def start_evaluation(self, plan: dict[str, Any], weights: bytes) -> str: ...

    def wait(
        self,
        kind: str,
        job_id: str,
        *,
        timeout: float,
        on_status: Callable[[RemoteJobStatus], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> RemoteJobStatus: ...

    def cancel_round(self, round_id: str) -> None: ...

    def download_update(self, round_id: str, expected_sha256: str | None) -> bytes: ...

    def secagg(self, round_id: str, step: str, message: dict[str, Any]) -> dict[str, Any]:
        """A secure-aggregation step (advertise, share, unmask) of ROUND_ID: the site's JSON answer."""
        ...

    def secagg_mask(self, round_id: str, message: dict[str, Any]) -> tuple[bytes, str]:
        """The mask step: the masked update's bytes and their SHA-256 (checked)."""
        ...

    def close(self) -> None: ...


def _wait_param(wait: float) -> dict[str, str] | None:
    """`?wait=` of a status request (none for 0: the plain request, as every agent knows it)."""
    # Whole milliseconds: the agent refuses more than its limit, and a float's repr could
    # round above it.
    return {"wait": f"{wait:.3f}"} if wait > 0 else None


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


# OpenSSL's verify codes for a certificate that does not carry the host's name or address.
_NAME_MISMATCH_CODES = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """EXC and what it was raised from (httpx wraps the socket's and ssl's exceptions)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def certificate_names(der: bytes) -> list[str]:
    """The DNS names and IP addresses a certificate carries (its CN when it has no SAN)."""
    cert = x509.load_der_x509_certificate(der)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return [*sans.get_values_for_type(x509.DNSName), *map(str, sans.get_values_for_type(x509.IPAddress))]


@dataclass(frozen=True)
class _Transport:
    """A transport failure by cause: `kind` is tls, refused, timeout, closed or other."""

    kind: str
    reason: str
    verify_code: int | None = None


def _transport_failure(exc: httpx.TransportError, timeouts: Timeouts) -> _Transport:
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return _Transport("tls", str(cause.verify_message or cause.reason), cause.verify_code)
        if isinstance(cause, ConnectionRefusedError):
            return _Transport("refused", "connection refused")
        if isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError):
            # What a port forwarder (docker's) does while nothing listens behind it: it takes
            # the connection and closes it, which TLS reports as an EOF in the handshake.
            return _Transport(
                "closed", "the connection was closed before an answer: nothing answers behind the port"
            )
        if isinstance(cause, ssl.SSLError):
            return _Transport("tls", f"TLS handshake failed: {cause.reason or cause}")
    if isinstance(exc, httpx.ConnectTimeout):
        return _Transport("timeout", f"no connection within {timeouts.connect:g} s")
    if isinstance(exc, httpx.TimeoutException):
        return _Transport("timeout", f"no answer within {timeouts.read:g} s")
    if isinstance(exc, httpx.RemoteProtocolError):
        return _Transport("closed", "the connection was closed before an answer")
    return _Transport("other", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def job_ended(site: str, kind: str, job_id: str, status: str, error: str | None) -> JobFailed:
    """The error for a round or evaluation that ended without completing (failed, cancelled...)."""
    reason = f": {error}" if error else ""
    return JobFailed(site, f"{kind} {job_id} ended as {status}{reason}")


def wait_left(
    site: str,
    kind: str,
    job_id: str,
    *,
    deadline: float,
    timeout: float,
    should_stop: Callable[[], bool] | None,
) -> float:
    """The seconds left to wait for a job; raises JobFailed when the coordinator abandoned it and
    JobTimeout once the deadline (`time.monotonic()`) has passed. Every site client's wait uses it."""
    if should_stop is not None and should_stop():
        raise JobFailed(site, f"{kind} {job_id} abandoned by the coordinator")
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise JobTimeout(site, f"{kind} {job_id} did not finish within {timeout:g} s")
    return remaining


class AgentClient:
    """One agent, reached over HTTP(S) with its own token; safe to use from one thread at a time."""

    def __init__(
        self,
        entry: AgentEntry,
        *,
        timeouts: Timeouts | None = None,
        retries: Retries | None = None,
        poll_interval: float = 1.0,
        status_wait: float = 0.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.name = entry.name
        if entry.url is None:
            raise AgentError(
                entry.name, "is a pull site (no url): it connects to the relay, see coordinator.relay"
            )
        self.url: str = entry.url
        self._entry = entry
        self.timeouts = timeouts or Timeouts()
        self.retries = retries or Retries()
        self.poll_interval = poll_interval
        self.status_wait = status_wait
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
                a,
                timeouts=fed.timeouts,
                retries=fed.retries,
                poll_interval=fed.poll_interval,
                status_wait=fed.status_wait,
                **kwargs,
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
        failure: _Transport | None = None
        for attempt in range(1, attempts + 1):
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                failure = _transport_failure(exc, self.timeouts)
                if failure.kind == "tls":
                    raise self._tls_error(what, failure) from None
                last = failure.reason
            else:
                failure = None
                self._count(resp)
                if resp.status_code < 400:
                    return resp
                if resp.status_code in (401, 403):
                    raise self._refusal(what, resp)
                if resp.status_code < 500:
                    raise AgentError(
                        self.name,
                        f"{what}: HTTP {resp.status_code}: {_detail(resp)}",
                        status_code=resp.status_code,
                    )
                last = f"HTTP {resp.status_code}: {_detail(resp)}"
            if attempt < attempts:
                self._sleep(min(self.retries.backoff * (2 ** (attempt - 1)), self.retries.max_backoff))
        if failure is not None:
            raise AgentUnreachable(
                self.name,
                f"{what}: agent {self.name} at {self.url} is not reachable ({last}; "
                f"{attempts} attempt(s)); is it running, and is this its address?",
            )
        raise AgentUnreachable(
            self.name, f"{what}: no good answer from {self.url} after {attempts} attempt(s): {last}"
        )

    def _refusal(self, what: str, resp: httpx.Response) -> AgentError:
        """What a 401 or 403 means: an unapproved plan (the 403 names its hash), a token the
        site does not accept (401), or a token or client certificate without the right (403)."""
        detail = _detail(resp)
        status = resp.status_code
        digest = PlanNotApproved.hash_in(detail) if status == 403 else None
        if digest is not None:
            return AgentPlanRefused(
                self.name,
                f"{what}: site {self.name} has not approved plan {digest}; its admin runs "
                f"`fedsite plans approve {digest} --by NAME` (and sees it in `fedsite plans pending`)",
                plan_hash=digest,
                status_code=status,
            )
        if status == 401:
            return AgentAuthError(
                self.name,
                f"{what}: site {self.name} refused the coordinator's token (HTTP 401: {detail}); "
                f"check the token for {self.name!r} in the federation file, or ask the site for a new one",
                status_code=status,
            )
        return AgentAuthError(
            self.name,
            f"{what}: site {self.name} refused the coordinator's credentials (HTTP 403: {detail}); "
            "the token's role or the client certificate is not one the site admits",
            status_code=status,
        )

    def _tls_error(self, what: str, failure: _Transport) -> AgentTlsError:
        host = urlsplit(self.url).hostname or self.url
        if failure.verify_code in _NAME_MISMATCH_CODES:
            names = self._certificate_names()
            named = f"it names {', '.join(names)}" if names else "its names could not be read"
            return AgentTlsError(
                self.name,
                f"{what}: the certificate of {self.name} does not name {host} ({named}); use one of "
                f"its names in the URL of {self.name!r} in the federation file, or have the site issue "
                f"a certificate that includes {host} (fedsite certs init --hosts)",
            )
        return AgentTlsError(
            self.name,
            f"{what}: the certificate of {self.name} at {self.url} cannot be trusted ({failure.reason}); "
            f"check ca_file (and client_cert) of {self.name!r} in the federation file",
        )

    def _certificate_names(self) -> list[str]:
        """The names in the certificate the agent presents, read without verifying it (only to
        say what it names; nothing is sent on this connection). Empty when it cannot be read."""
        parts = urlsplit(self.url)
        host, port = parts.hostname, parts.port or 443
        if host is None:
            return []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        entry = self._entry
        try:
            if entry.client_cert is not None and entry.client_key is not None:
                ctx.load_cert_chain(str(entry.client_cert), str(entry.client_key))
            try:
                ipaddress.ip_address(host)
                sni: str | None = None
            except ValueError:
                sni = host
            with (
                socket.create_connection((host, port), timeout=self.timeouts.connect) as sock,
                ctx.wrap_socket(sock, server_hostname=sni) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
            return certificate_names(der) if der else []
        except (OSError, ValueError):
            return []

    # -- API -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json(self.request("GET", "/v1/health", what="health check"), "health check")

    def info(self) -> dict[str, Any]:
        return self._json(self.request("GET", "/v1/info", what="site info"), "site info")

    def start_round(self, plan: dict[str, Any], weights: bytes | None) -> str:
        return self._start("/v1/rounds", "round_id", plan, weights, what="start round")

    def start_evaluation(self, plan: dict[str, Any], weights: bytes) -> str:
        return self._start("/v1/evaluations", "evaluation_id", plan, weights, what="start evaluation")

    def round_status(self, round_id: str, *, wait: float = 0.0) -> RemoteJobStatus:
        """The round's status; with WAIT, once it has stopped or WAIT seconds passed (a long
        poll: an agent without it answers at once, which `wait` below allows for)."""
        what = "round status"
        resp = self.request("GET", f"/v1/rounds/{round_id}", what=what, params=_wait_param(wait))
        return self._status(self._json(resp, what), "round_id", round_id)

    def evaluation_status(self, evaluation_id: str, *, wait: float = 0.0) -> RemoteJobStatus:
        what = "evaluation status"
        path = f"/v1/evaluations/{evaluation_id}"
        body = self._json(self.request("GET", path, what=what, params=_wait_param(wait)), what)
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

    def secagg(self, round_id: str, step: str, message: dict[str, Any]) -> dict[str, Any]:
        """POST a secure-aggregation step's message; a refusal is an AgentError with status 409
        whose message carries the site's reason."""
        what = f"secure aggregation {step}"
        path = f"/v1/rounds/{round_id}/secagg/{step}"
        return self._json(self.request("POST", path, what=what, json=message), what)

    def secagg_mask(self, round_id: str, message: dict[str, Any]) -> tuple[bytes, str]:
        """The masked update; refused unless its SHA-256 equals the X-Content-SHA256 header."""
        what = "secure aggregation mask"
        resp = self.request("POST", f"/v1/rounds/{round_id}/secagg/mask", what=what, json=message)
        data = resp.content
        actual = hashlib.sha256(data).hexdigest()
        header = (resp.headers.get("X-Content-SHA256") or "").strip().lower()
        if actual != header:
            raise UpdateIntegrityError(
                self.name,
                f"masked update of round {round_id} refused: its SHA-256 is {actual}, the header says "
                f"{header or 'nothing'}; the bytes were changed on the way",
            )
        return data, actual

    def wait(
        self,
        kind: str,
        job_id: str,
        *,
        timeout: float,
        on_status: Callable[[RemoteJobStatus], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> RemoteJobStatus:
        """Poll a round or evaluation until it ends; raise JobFailed / JobTimeout naming the site.

        Each request waits at the agent up to `status_wait` for the end (a long poll); requests
        to one site are at least `poll_interval` apart, so that an agent that answers at once
        (one that predates `?wait=`) is polled as before."""
        status_of = self.round_status if kind == "round" else self.evaluation_status
        deadline = time.monotonic() + timeout
        wait = self.status_wait
        while True:
            asked = time.monotonic()
            status = status_of(job_id, wait=wait)
            if on_status is not None:
                on_status(status)
            if status.status == "completed":
                return status
            if status.status in TERMINAL:
                raise job_ended(self.name, kind, job_id, status.status, status.error)
            left = wait_left(
                self.name, kind, job_id, deadline=deadline, timeout=timeout, should_stop=should_stop
            )
            wait = min(self.status_wait, left)
            pause = self.poll_interval - (time.monotonic() - asked)
            if pause > 0:
                self._sleep(min(pause, left))

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
