"""ASGI middleware of the agent's API: the answer to unexpected errors, the request-body
limit, the Date header and the mutual-TLS gate.

Why unexpected errors are answered here and not by an exception handler for `Exception`:
Starlette hands such a handler to its outermost middleware, which sends the handler's answer
and then re-raises, so that the server logs the same traceback a second time and, the answer
being already sent, drops the keep-alive connection without `Connection: close` (a client
that reuses it sees a reset). `InternalErrorAnswer` ends the error where it is caught.

Why the client-certificate subject check lives in the application and not in the TLS
handshake: a refused client must leave a trace in the audit log, and a handshake failure never
reaches the application. So with ``api.tls.client_ca_file`` set, the TLS layer *asks* for a
client certificate and rejects any certificate not signed by that CA during the handshake
(`agent.tls.contexts`); the gate below then refuses, with 403 and an ``api.refused`` audit
event, every request that came without a certificate or with a subject outside
``api.tls.allowed_client_subjects`` (refusals go through the app's `RefusalGuard`: bounded in
the audit log, and an address with too many of them is answered 429 with ``Retry-After``).
``/v1/health`` stays open (it says only "ok"), so that
container health probes need no key material. A certificate from a foreign CA fails the
handshake itself and is only visible in the server log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from email.utils import formatdate
from typing import Any

from cryptography import x509
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.api.metrics import AgentMetrics
from agent.api.throttle import RefusalGuard
from agent.audit.sink import AuditSink
from agent.config import TlsConfig
from agent.errors import BodyTooLarge
from agent.tls.files import parse_subject, subject_pairs

# The gate's refusals keep the logger name they had when TLS was one module.
log = logging.getLogger("fedsite.tls")
# Internal errors keep the logger name they had when the app's exception handler logged them.
api_log = logging.getLogger("fedsite.api")

# Paths reachable without a client certificate (and without a token): liveness only.
UNGATED_PATHS = frozenset({"/v1/health"})


async def json_answer(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer `{"detail": DETAIL}` with STATUS (and HEADERS) without the app's response classes."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- internal errors


class InternalErrorAnswer:
    """Answers any exception the app leaves unhandled with a JSON 500, logged once.

    The answer carries a reference (also in the ``X-Request-ID`` header) and no internals;
    the one log record carries the same reference, the request and the traceback. The
    exception ends here, so the server neither logs it again nor closes the connection: a
    keep-alive client goes on using it. Only when the app had already started its answer can
    none be given; the record then says so, and the server closes the connection (the one way
    left to tell the client that the answer is incomplete).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            ref = uuid.uuid4().hex[:12]
            after = " after the answer had started" if started else ""
            api_log.error(
                "internal error %s on %s %s%s",
                ref,
                scope.get("method"),
                scope.get("path"),
                after,
                exc_info=exc,
            )
            if not started:
                await json_answer(
                    send,
                    500,
                    f"internal error (reference {ref}); the agent's log has the details",
                    [(b"x-request-id", ref.encode())],
                )


# --------------------------------------------------------------------------- date header


class DateHeader:
    """Gives every answer that has none a Date header (RFC 9110), formatted once per second.

    uvicorn adds one from a value that its main loop refreshes every second, and so keeps an
    idle agent waking once a second; on a virtual machine each wake-up of a sleeping process
    costs milliseconds of CPU, which dozens of agents sharing a few cores add up
    (benchmarks/fanout.py). `fedsite serve` turns uvicorn's off and puts this outermost, and
    also around the mutual-TLS gate, whose refusals do not pass through the app; an answer
    that already has the header keeps it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._second = -1
        self._value = b""

    def _now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._value = formatdate(second, usegmt=True).encode("ascii")
            self._second = second
        return self._value

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def dated_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"date" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"date", self._now())]}
            await send(message)

        await self.app(scope, receive, dated_send)


# --------------------------------------------------------------------------- body limit


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes`: by Content-Length up front, and by counting the stream
    (chunked uploads, or a Content-Length that lies). Also counts answers for the metrics and
    adds a Server-Timing header with the agent's own time."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: AgentMetrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = str(scope.get("method", ""))
        started = time.perf_counter()

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(method=method, code=str(message["status"])).inc()
                # Server-Timing: how long the agent itself took, for operators and latency probes.
                took = (time.perf_counter() - started) * 1000.0
                message = dict(message)
                message["headers"] = [
                    *message.get("headers", []),
                    (b"server-timing", f"app;dur={took:.2f}".encode()),
                ]
            await send(message)

        length = None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                length = value
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await json_answer(counted_send, 400, "invalid Content-Length header")
                return
            if declared > self.max_bytes:
                await json_answer(counted_send, 413, str(BodyTooLarge(self.max_bytes)))
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, counted_send)


# --------------------------------------------------------------------------- mutual TLS


def subject_allowed(subject: x509.Name, allowed: list[str]) -> bool:
    """True when SUBJECT equals one of ALLOWED (an empty list allows any subject)."""
    if not allowed:
        return True
    pairs = subject_pairs(subject)
    return any(pairs == parse_subject(entry) for entry in allowed)


class ClientCertGate:
    """ASGI wrapper for one TLS connection: exposes the peer certificate in the scope's
    ``tls`` extension and, when mutual TLS is on, refuses requests without an allowed one."""

    def __init__(
        self,
        app: ASGIApp,
        peer_der: bytes | None,
        *,
        enforce: bool,
        allowed: list[str],
        guard: RefusalGuard | None,
    ) -> None:
        self.app = app
        self.enforce = enforce
        self.allowed = allowed
        self.guard = guard
        self.peer_der = peer_der
        self.subject: x509.Name | None = None
        self.subject_text: str | None = None
        if peer_der is not None:
            self.subject = x509.load_der_x509_certificate(peer_der).subject
            self.subject_text = self.subject.rfc4514_string()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        extensions = scope.setdefault("extensions", {})
        extensions["tls"] = {
            "client_cert_name": self.subject_text,
            "client_cert_der": self.peer_der,
            "client_cert_error": None,
        }
        if not self.enforce or scope.get("path") in UNGATED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.subject is None:
            await self._refuse(scope, send, "no client certificate", "client certificate required")
            return
        if not subject_allowed(self.subject, self.allowed):
            await self._refuse(
                scope,
                send,
                "client certificate subject not allowed",
                f"client certificate subject not allowed: {self.subject_text}",
            )
            return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Send, reason: str, detail: str) -> None:
        client = scope.get("client")
        address = str(client[0]) if client else "unknown"
        method, path = str(scope.get("method")), str(scope.get("path"))
        retry_after = self.guard.charge(address) if self.guard is not None else None
        if retry_after is not None:
            # A flood is answered without a log line or an audit row per request.
            assert self.guard is not None
            await self._record(self.guard.throttled, address, method=method, path=path)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            too_many, headers = self.guard.too_many(retry_after)
            await json_answer(
                send, 429, too_many, [(k.lower().encode(), v.encode()) for k, v in headers.items()]
            )
            return
        details = {
            "reason": reason,
            "subject": self.subject_text,
            "method": method,
            "path": path,
            "client": address,
        }
        log.warning("refused %s %.200s from %s: %s", method, path, address, detail)
        if self.guard is not None:
            actor = f"tls:{self.subject_text}" if self.subject_text else "anonymous"
            await self._record(self.guard.refused, address, actor=actor, reason=reason, details=details)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await json_answer(send, 403, detail)

    @staticmethod
    async def _record(record: Any, address: str, **kwargs: Any) -> None:
        try:
            await asyncio.to_thread(record, address, **kwargs)
        except Exception:
            # The refusal stands even when the audit database is unavailable.
            log.exception("could not audit a refused client certificate")


def _peer_der(transport: Any) -> bytes | None:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return bytes(der) if der else None


def gated_protocol_class(tls: TlsConfig, audit: AuditSink | None, guard: RefusalGuard | None = None) -> type:
    """A uvicorn HTTP protocol class that wraps the app in a ClientCertGate per connection
    (the peer certificate is fixed for a connection's lifetime, so it is read once).

    Refusals go through GUARD (the app's, shared with the token check); without one, through
    a guard of its own on AUDIT with the default limits (or nowhere, without AUDIT)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    enforce = tls.client_ca_file is not None
    allowed = list(tls.allowed_client_subjects)
    if guard is None and audit is not None:
        guard = RefusalGuard(audit)

    class GatedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[valid-type,misc]
        app: Any

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.app = DateHeader(
                ClientCertGate(self.app, _peer_der(transport), enforce=enforce, allowed=allowed, guard=guard)
            )

    return GatedHTTPProtocol
