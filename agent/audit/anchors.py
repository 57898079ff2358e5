"""Signed audit anchors: the chain's head, signed by the site, kept by the coordinator.

A hash chain without a secret catches any edit except a consistent rewrite: someone with
write access to the database can change an event and recompute every later hash and the
chain head, and `verify` passes. Only a head recorded earlier *outside* the site shows it.
Keeping one used to be manual (`verify --anchor ID:HASH`); now every completed round's status
carries one by itself: the site's audit head (event id and hash) when the status was read,
signed with the site's Ed25519 key. The coordinator stores these anchors per site in its
`results.json`, and `fedsite audit verify --anchors FILE` checks the site's chain against
each of them. A rewrite of any event up to the last anchor the coordinator holds then fails,
naming the anchor.

The signature does not make the head harder to rewrite at the site (whoever rewrites the
database can read the key); it makes the anchors the coordinator holds the site's own words:
a coordinator, or anyone, cannot fabricate an anchor that accuses the site of a rewrite, and a
replaced key fails every earlier anchor.

The key is created once, in the work directory, owner-only (0600), its creation recorded in
the audit log (``audit.key_created`` with its public part and fingerprint); `fedsite audit
key` and `/v1/info` show the public part, which the privacy officer or the consortium keeps.
The signed message is the canonical JSON of ``["fedsite.audit_anchor.v1", site_id, round_id,
event_id, hash]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.audit.chain import AuditLog, canonical_json
from agent.audit.sink import AuditSink
from agent.errors import AuditError

KEY_FILE = "audit_signing.key"
ALGORITHM = "ed25519"
CONTEXT = "fedsite.audit_anchor.v1"
KEY_CREATED_ACTION = "audit.key_created"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def key_path(work_dir: Path) -> Path:
    return work_dir / KEY_FILE


def public_key_text(key: Ed25519PublicKey) -> str:
    """The public key as the hex of its 32 raw bytes (what /v1/info and `audit key` show):
    hex rather than base64, so that it holds no '/' and reads the same in a URL or a path."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex: a short way to compare keys by eye."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A public key from `public_key_text`'s form; AuditError names the problem."""
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.strip()))
    except ValueError:
        raise AuditError(
            f"public key {text[:60]!r}: expected 64 hex digits (32 bytes), as `fedsite audit key` prints"
        ) from None


def load_or_create_key(path: Path, audit: AuditSink | None = None) -> Ed25519PrivateKey:
    """The site's signing key at PATH, created there (0600) the first time; its creation is
    recorded in AUDIT. Concurrent creators agree on one key (the file is linked into place,
    which fails for all but the first)."""
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
        finally:
            tmp.unlink(missing_ok=True)
        if created and audit is not None:
            public = key.public_key()
            audit.append(
                KEY_CREATED_ACTION,
                actor="agent",
                details={
                    "algorithm": ALGORITHM,
                    "public_key": public_key_text(public),
                    "fingerprint": fingerprint(public),
                },
            )
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise AuditError(f"audit signing key {path} cannot be used: {exc}") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise AuditError(f"audit signing key {path} is not an Ed25519 key")
    return loaded


def anchor_message(site_id: str, round_id: str, event_id: int, event_hash: str) -> bytes:
    return canonical_json([CONTEXT, site_id, round_id, event_id, event_hash]).encode("utf-8")


def sign_anchor(
    key: Ed25519PrivateKey, *, site_id: str, round_id: str, event_id: int, event_hash: str
) -> dict[str, Any]:
    """The anchor of a round's status: the audit head (EVENT_ID, EVENT_HASH), signed."""
    signature = key.sign(anchor_message(site_id, round_id, event_id, event_hash))
    return {
        "site_id": site_id,
        "round_id": round_id,
        "event_id": event_id,
        "hash": event_hash,
        "algorithm": ALGORITHM,
        "key_fingerprint": fingerprint(key.public_key()),
        "signature": signature.hex(),
    }


def _describe(anchor: dict[str, Any]) -> str:
    return f"anchor of round {anchor.get('round_id')!r} (event {anchor.get('event_id')})"


def signature_problem(public: Ed25519PublicKey, anchor: dict[str, Any]) -> str:
    """Why ANCHOR is malformed or not signed by PUBLIC's key; '' when it is sound."""
    site_id, round_id = anchor.get("site_id"), anchor.get("round_id")
    event_id, digest = anchor.get("event_id"), anchor.get("hash")
    if not isinstance(site_id, str) or not isinstance(round_id, str):
        return "site_id and round_id must be strings"
    if isinstance(event_id, bool) or not isinstance(event_id, int) or event_id < 1:
        return f"event_id {event_id!r} is not a positive integer"
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        return "hash is not 64 lower-case hex digits"
    try:
        signature = bytes.fromhex(str(anchor.get("signature", "")))
        public.verify(signature, anchor_message(site_id, round_id, event_id, digest))
    except (ValueError, InvalidSignature):
        return f"its signature does not verify with the site's key (fingerprint {fingerprint(public)})"
    return ""


def load_anchors(path: Path, site_id: str) -> list[dict[str, Any]]:
    """The anchors of SITE_ID in PATH, oldest event first.

    PATH is the coordinator's `results.json` (anchors under ``audit_anchors``, per site) or an
    anchors file: a JSON list of anchors, or an object with an ``anchors`` list. Anchors of
    other sites are left out (they carry their site id, signed). ValueError names the problem.
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read anchors: {exc}") from None
    found: list[Any]
    if isinstance(doc, list):
        found = doc
    elif isinstance(doc, dict) and isinstance(doc.get("anchors"), list):
        found = doc["anchors"]
    elif isinstance(doc, dict) and isinstance(doc.get("audit_anchors"), dict):
        found = [
            a for per_site in doc["audit_anchors"].values() if isinstance(per_site, list) for a in per_site
        ]
    else:
        raise ValueError(
            f"{path}: no anchors: expected a coordinator's results.json (audit_anchors), "
            "a JSON list of anchors or an object with an 'anchors' list"
        )
    if not all(isinstance(a, dict) for a in found):
        raise ValueError(f"{path}: every anchor must be a JSON object")
    mine = [a for a in found if a.get("site_id") == site_id]
    if not mine:
        others = sorted({str(a.get("site_id")) for a in found})
        have = f" (it has anchors of: {', '.join(others)})" if others else ""
        raise ValueError(f"{path}: no anchors of site {site_id!r}{have}")
    return sorted(mine, key=lambda a: a["event_id"] if isinstance(a.get("event_id"), int) else 0)


@dataclass
class AnchorsReport:
    """The result of `check_anchors`: how many anchors held, and what failed, one line each."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"OK: {self.checked} signed anchor(s) match the log"
        return f"FAILED: {len(self.problems)} of {self.checked} anchor(s): " + "; ".join(self.problems)


def check_anchors(log: AuditLog, anchors: list[dict[str, Any]], public: Ed25519PublicKey) -> AnchorsReport:
    """Check every anchor: signed by PUBLIC's key, and its event still in LOG with its hash.

    A chain rewritten consistently at or before an anchor's event gives that event another
    hash; a log cut before it has no such event. Every failing anchor is named.
    """
    report = AnchorsReport()
    last_id, _ = log.head()
    for anchor in anchors:
        report.checked += 1
        problem = signature_problem(public, anchor)
        if problem:
            report.problems.append(f"{_describe(anchor)}: {problem}")
            continue
        event_id, digest = anchor["event_id"], anchor["hash"]
        found = log.events(since_id=event_id - 1, limit=1)
        if not found or found[0]["id"] != event_id:
            report.problems.append(
                f"{_describe(anchor)}: event {event_id} is not in the log "
                f"(it ends at event {last_id}): truncated?"
            )
        elif found[0]["hash"] != digest:
            report.problems.append(
                f"{_describe(anchor)}: event {event_id} has hash {found[0]['hash']}, the signed anchor "
                f"says {digest}: the log was rewritten at or before event {event_id}"
            )
    return report
