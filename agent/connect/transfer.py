"""Transfers with the relay: global weights by content hash, the update in resumable chunks.

Weights are fetched by their SHA-256 and checked before anything uses them: the size against
the task's declaration and `limits.max_weights_bytes` while reading (a relay that sends more is
cut off), then the hash. A mismatch is the relay's fault or an attack; the task is refused.

The update is cut into chunks named by their SHA-256. Each attempt first asks the relay which
chunks it already holds (it keeps them on disk across its own restarts), sends only the missing
ones, then commits the manifest with the hash that the egress gate recorded; the relay checks
the concatenation against it. A broken connection costs one attempt, and the next one resends
only what is missing. Attempts are bounded (`connect.upload_attempts`, exponential backoff with
full jitter between them) and each one is in the audit log (`connect.upload_attempt`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpx

from agent.audit.chain import AuditLog
from agent.connect.backoff import Backoff
from agent.connect.relay_client import RefusalCode, RelayClient, WeightsRef, detail_of, status_of

log = logging.getLogger("fedsite.connect")

READ_PIECE = 1024 * 1024


@dataclass(frozen=True)
class FetchedWeights:
    """The verified bytes, or the reason they cannot be used (`problem`, naming hash or size)
    and the refusal code it calls for: `weights_mismatch` when the bytes are not the ones the
    task names, `invalid_task` when the task asks for more than this site accepts."""

    data: bytes | None
    problem: str | None = None
    code: RefusalCode = "weights_mismatch"


def fetch_weights(
    client: RelayClient, ref: WeightsRef, max_bytes: int, stop: threading.Event | None = None
) -> FetchedWeights:
    """Download the blob REF names, reading at most min(REF.bytes, MAX_BYTES) + 1 bytes, and
    verify size and SHA-256. Transport errors propagate (the caller retries later). STOP set
    during the download abandons it: neither data nor problem comes back."""
    if ref.bytes > max_bytes:
        return FetchedWeights(
            None, f"weights: {ref.bytes} bytes exceeds limits.max_weights_bytes ({max_bytes})", "invalid_task"
        )
    digest = hashlib.sha256()
    parts: list[bytes] = []
    size = 0
    with client.blob(ref.sha256) as response:
        for piece in response.iter_bytes(READ_PIECE):
            if stop is not None and stop.is_set():
                return FetchedWeights(None)
            size += len(piece)
            if size > ref.bytes:
                return FetchedWeights(
                    None, f"weights {ref.sha256}: the relay sent more than the {ref.bytes} bytes declared"
                )
            digest.update(piece)
            parts.append(piece)
    if size != ref.bytes:
        return FetchedWeights(None, f"weights {ref.sha256}: {size} bytes received, {ref.bytes} declared")
    got = digest.hexdigest()
    if got != ref.sha256:
        return FetchedWeights(
            None, f"weights: SHA-256 of the received bytes is {got}, the task names {ref.sha256}"
        )
    return FetchedWeights(b"".join(parts))


@dataclass(frozen=True)
class Chunk:
    sha256: str
    start: int
    end: int


def split_chunks(data: bytes, chunk_bytes: int) -> list[Chunk]:
    """DATA cut into CHUNK_BYTES pieces (the last may be shorter), in order; empty DATA: one empty chunk."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    bounds = [(i, min(i + chunk_bytes, len(data))) for i in range(0, len(data), chunk_bytes)] or [(0, 0)]
    return [Chunk(hashlib.sha256(data[a:b]).hexdigest(), a, b) for a, b in bounds]


class UploadOutcome(StrEnum):
    COMMITTED = "committed"
    # The relay no longer holds our lease (409 before the commit): stop, the task is lost.
    LEASE_LOST = "lease_lost"
    # The commit itself was answered 409 (lease expired, task re-queued or ended).
    COMMIT_REFUSED = "commit_refused"
    # Every attempt failed; the task waits for the next pass.
    GAVE_UP = "gave_up"
    # The connector is stopping, or the lease was reported invalid meanwhile.
    STOPPED = "stopped"


@dataclass(frozen=True)
class UploadResult:
    outcome: UploadOutcome
    attempts: int
    detail: str = ""
    # The relay's answer to the commit (COMMITTED) or its refusal (COMMIT_REFUSED).
    answer: dict[str, Any] | None = None
    status: int | None = None


@dataclass
class Uploader:
    """Uploads one update (or commits one evaluation) for one lease, with bounded attempts."""

    client: RelayClient
    audit: AuditLog
    actor: str
    attempts: int
    max_backoff_s: float
    stop: threading.Event
    # Polled between chunks: False once the lease is known to be gone (a heartbeat said so).
    lease_valid: Callable[[], bool] = lambda: True

    def upload(
        self,
        task_id: str,
        lease_id: str,
        data: bytes,
        sha256: str | None,
        chunk_bytes: int,
        result: dict[str, Any],
    ) -> UploadResult:
        """Send DATA's missing chunks and commit (train); DATA empty and SHA256 None: commit the
        RESULT alone (evaluate)."""
        chunks = split_chunks(data, chunk_bytes) if sha256 is not None else []
        backoff = Backoff(cap_s=self.max_backoff_s, max_attempts=self.attempts)
        attempt = 0
        while True:
            attempt += 1
            sent = sent_bytes = 0
            had = 0
            try:
                if not self._may_go_on():
                    self._done(task_id, lease_id, attempt, chunks, 0, 0, had, UploadOutcome.STOPPED)
                    return UploadResult(UploadOutcome.STOPPED, attempt, "stopped before the attempt")
                if chunks:
                    have = self.client.chunks_have(task_id, lease_id)
                    had = sum(1 for c in chunks if c.sha256 in have)
                    for chunk in chunks:
                        if chunk.sha256 in have:
                            continue
                        if not self._may_go_on():
                            self._done(
                                task_id,
                                lease_id,
                                attempt,
                                chunks,
                                sent,
                                sent_bytes,
                                had,
                                UploadOutcome.STOPPED,
                            )
                            return UploadResult(UploadOutcome.STOPPED, attempt, "stopped between chunks")
                        self.client.put_chunk(task_id, lease_id, chunk.sha256, data[chunk.start : chunk.end])
                        have.add(chunk.sha256)
                        sent += 1
                        sent_bytes += chunk.end - chunk.start
                body = {
                    "lease_id": lease_id,
                    "manifest": [c.sha256 for c in chunks],
                    "sha256": sha256,
                    "bytes": len(data) if sha256 is not None else 0,
                    "result": result,
                }
                try:
                    answer = self.client.commit(task_id, body)
                except httpx.HTTPStatusError as exc:
                    if status_of(exc) == 409:
                        self._done(
                            task_id,
                            lease_id,
                            attempt,
                            chunks,
                            sent,
                            sent_bytes,
                            had,
                            UploadOutcome.COMMIT_REFUSED,
                        )
                        return UploadResult(UploadOutcome.COMMIT_REFUSED, attempt, detail_of(exc), status=409)
                    raise
                self._done(task_id, lease_id, attempt, chunks, sent, sent_bytes, had, UploadOutcome.COMMITTED)
                return UploadResult(UploadOutcome.COMMITTED, attempt, answer=answer)
            except httpx.HTTPError as exc:
                why = detail_of(exc)
                if status_of(exc) == 409:
                    self._done(
                        task_id, lease_id, attempt, chunks, sent, sent_bytes, had, UploadOutcome.LEASE_LOST
                    )
                    return UploadResult(UploadOutcome.LEASE_LOST, attempt, why, status=409)
                self._done(task_id, lease_id, attempt, chunks, sent, sent_bytes, had, f"error: {why}")
                delay = backoff.next_delay()
                if delay is None:
                    log.warning("task %s: upload gave up after %d attempt(s): %s", task_id, attempt, why)
                    return UploadResult(UploadOutcome.GAVE_UP, attempt, why)
                log.warning(
                    "task %s: upload attempt %d failed (%s); next attempt in %.1f s",
                    task_id,
                    attempt,
                    why,
                    delay,
                )
                if self.stop.wait(delay):
                    return UploadResult(UploadOutcome.STOPPED, attempt, why)

    def _may_go_on(self) -> bool:
        return not self.stop.is_set() and self.lease_valid()

    def _done(
        self,
        task_id: str,
        lease_id: str,
        attempt: int,
        chunks: list[Chunk],
        sent: int,
        sent_bytes: int,
        had: int,
        outcome: str,
    ) -> None:
        """Audit one attempt: how many chunks the relay had, how many were sent, how it ended."""
        self.audit.append(
            "connect.upload_attempt",
            actor=self.actor,
            details={
                "task_id": task_id,
                "lease_id": lease_id,
                "attempt": attempt,
                "chunks_total": len(chunks),
                "chunks_present": had,
                "chunks_sent": sent,
                "bytes_sent": sent_bytes,
                "outcome": str(outcome)[:500],
            },
        )
