"""Transfers against a scripted relay (httpx.MockTransport): the chunked upload resumes with only
the missing chunks, a lease the relay no longer holds stops it, a 409 on the commit is reported,
bounded attempts give up; weights are refused unless size and hash match."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.audit.chain import AuditLog
from agent.config import ConnectConfig
from agent.connect.relay_client import RelayClient, WeightsRef
from agent.connect.transfer import Uploader, UploadOutcome, fetch_weights, split_chunks

TASK = "ab" * 16
LEASE = "cd" * 16
CHUNK = 1024


class ScriptedRelay:
    """The relay's chunk and commit endpoints, in memory; `fail_puts_after` breaks the connection."""

    def __init__(self) -> None:
        self.chunks: dict[str, bytes] = {}
        self.puts: list[str] = []
        self.commits: list[dict[str, Any]] = []
        self.fail_puts_after: int | None = None
        self.lease_ok = True
        self.commit_status = 200
        self.down = False
        self.blobs: dict[str, bytes] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        assert request.headers["authorization"] == "Bearer t0ken"
        if path.startswith("/v1/relay/blobs/"):
            data = self.blobs.get(path.rsplit("/", 1)[1])
            return httpx.Response(200, content=data) if data is not None else httpx.Response(404)
        if not self.lease_ok:
            return httpx.Response(409, json={"detail": f"lease {LEASE} expired"})
        if path.endswith("/chunks") and request.method == "GET":
            return httpx.Response(200, json={"have": sorted(self.chunks)})
        if "/chunks/" in path and request.method == "PUT":
            if self.fail_puts_after is not None and len(self.puts) >= self.fail_puts_after:
                self.fail_puts_after = None
                raise httpx.RemoteProtocolError("server disconnected", request=request)
            name = path.rsplit("/", 1)[1]
            body = request.content
            assert hashlib.sha256(body).hexdigest() == name
            self.chunks[name] = body
            self.puts.append(name)
            return httpx.Response(201, json={"sha256": name, "bytes": len(body)})
        if path.endswith("/commit"):
            body = json.loads(request.content)
            self.commits.append(body)
            if self.commit_status != 200:
                return httpx.Response(self.commit_status, json={"detail": "lease expired at 12:00"})
            if body["sha256"] is not None:
                whole = b"".join(self.chunks[c] for c in body["manifest"])
                assert hashlib.sha256(whole).hexdigest() == body["sha256"]
            return httpx.Response(200, json={"task_id": TASK, "sha256": body["sha256"]})
        return httpx.Response(404, json={"detail": "no such endpoint"})


@pytest.fixture
def relay() -> ScriptedRelay:
    return ScriptedRelay()


@pytest.fixture
def client(relay: ScriptedRelay, tmp_path: Path) -> RelayClient:
    token = tmp_path / "relay.token"
    token.write_text("t0ken\n")
    cfg = ConnectConfig(mode="outbound", coordinator_url="http://relay.test", token_file=token)
    return RelayClient(cfg, transport=httpx.MockTransport(relay))


def _uploader(client: RelayClient, audit_log: AuditLog, attempts: int = 3) -> Uploader:
    return Uploader(client, audit_log, "relay", attempts, 0.5, threading.Event())


def _attempts(audit_log: AuditLog) -> list[dict[str, Any]]:
    return [e["details"] for e in audit_log.events(action="connect.upload_attempt")]


def test_chunks_split_in_order_and_name_their_content() -> None:
    data = bytes(range(256)) * 10
    chunks = split_chunks(data, 1000)
    assert [(c.start, c.end) for c in chunks] == [(0, 1000), (1000, 2000), (2000, 2560)]
    assert all(c.sha256 == hashlib.sha256(data[c.start : c.end]).hexdigest() for c in chunks)


def test_upload_resumes_sending_only_the_missing_chunks(
    relay: ScriptedRelay, client: RelayClient, audit_log: AuditLog
) -> None:
    data = bytes(i % 251 for i in range(5 * CHUNK + 100))  # six chunks, all different
    digest = hashlib.sha256(data).hexdigest()
    relay.fail_puts_after = 2  # the connection breaks on the third chunk
    result = _uploader(client, audit_log).upload(TASK, LEASE, data, digest, CHUNK, {"num_samples": 4})
    assert result.outcome == UploadOutcome.COMMITTED and result.attempts == 2
    first, second = _attempts(audit_log)
    assert first["outcome"].startswith("error: RemoteProtocolError")
    assert (first["chunks_total"], first["chunks_present"], first["chunks_sent"]) == (6, 0, 2)
    assert (second["chunks_present"], second["chunks_sent"], second["outcome"]) == (2, 4, "committed")
    assert second["bytes_sent"] == len(data) - 2 * CHUNK
    assert len(relay.puts) == 6 and len(set(relay.puts)) == 6  # no chunk was sent twice
    assert relay.commits[-1]["sha256"] == digest and relay.commits[-1]["bytes"] == len(data)


def test_an_upload_the_relay_already_holds_sends_nothing(
    relay: ScriptedRelay, client: RelayClient, audit_log: AuditLog
) -> None:
    data = b"x" * (3 * CHUNK)  # three identical chunks: one name, sent once
    relay.chunks[hashlib.sha256(b"x" * CHUNK).hexdigest()] = b"x" * CHUNK
    result = _uploader(client, audit_log).upload(
        TASK, LEASE, data, hashlib.sha256(data).hexdigest(), CHUNK, {}
    )
    assert result.outcome == UploadOutcome.COMMITTED
    assert relay.puts == []
    assert _attempts(audit_log)[0]["chunks_sent"] == 0


def test_a_lease_the_relay_no_longer_holds_stops_the_upload(
    relay: ScriptedRelay, client: RelayClient, audit_log: AuditLog
) -> None:
    relay.lease_ok = False
    result = _uploader(client, audit_log).upload(
        TASK, LEASE, b"y" * 10, hashlib.sha256(b"y" * 10).hexdigest(), CHUNK, {}
    )
    assert result.outcome == UploadOutcome.LEASE_LOST and result.status == 409
    assert "expired" in result.detail
    assert [a["outcome"] for a in _attempts(audit_log)] == ["lease_lost"]


def test_a_commit_answered_409_is_reported_as_refused(
    relay: ScriptedRelay, client: RelayClient, audit_log: AuditLog
) -> None:
    relay.commit_status = 409
    result = _uploader(client, audit_log).upload(
        TASK, LEASE, b"z" * 10, hashlib.sha256(b"z" * 10).hexdigest(), CHUNK, {}
    )
    assert result.outcome == UploadOutcome.COMMIT_REFUSED and "lease expired" in result.detail
    assert len(relay.commits) == 1  # not retried


def test_evaluation_commits_metrics_without_chunks(
    relay: ScriptedRelay, client: RelayClient, audit_log: AuditLog
) -> None:
    result = _uploader(client, audit_log).upload(TASK, LEASE, b"", None, CHUNK, {"metrics": {"dice": 0.5}})
    assert result.outcome == UploadOutcome.COMMITTED
    assert relay.commits[0]["manifest"] == [] and relay.commits[0]["sha256"] is None
    assert relay.commits[0]["result"] == {"metrics": {"dice": 0.5}}


def test_attempts_are_bounded_when_the_relay_stays_down(
    relay: ScriptedRelay, client: RelayClient, audit_log: AuditLog
) -> None:
    relay.down = True
    result = _uploader(client, audit_log, attempts=3).upload(
        TASK, LEASE, b"q", hashlib.sha256(b"q").hexdigest(), CHUNK, {}
    )
    assert result.outcome == UploadOutcome.GAVE_UP and result.attempts == 3
    assert [a["attempt"] for a in _attempts(audit_log)] == [1, 2, 3]
    assert all(a["outcome"].startswith("error: ConnectError") for a in _attempts(audit_log))


def test_weights_are_used_only_when_size_and_hash_match(relay: ScriptedRelay, client: RelayClient) -> None:
    good = b"weights" * 100
    digest = hashlib.sha256(good).hexdigest()
    relay.blobs[digest] = good
    assert fetch_weights(client, WeightsRef(sha256=digest, bytes=len(good)), 10_000).data == good
    relay.blobs[digest] = good[:-1] + b"X"  # tampered on the relay's disk
    tampered = fetch_weights(client, WeightsRef(sha256=digest, bytes=len(good)), 10_000)
    assert tampered.data is None and "SHA-256 of the received bytes" in (tampered.problem or "")
    relay.blobs[digest] = good + b"more"
    longer = fetch_weights(client, WeightsRef(sha256=digest, bytes=len(good)), 10_000)
    assert longer.data is None and "more than the 700 bytes declared" in (longer.problem or "")
    big = fetch_weights(client, WeightsRef(sha256=digest, bytes=len(good)), 100)
    assert big.data is None and "limits.max_weights_bytes (100)" in (big.problem or "")
    assert (tampered.code, longer.code, big.code) == ("weights_mismatch", "weights_mismatch", "invalid_task")
