"""The wire messages of secure aggregation: frozen dataclasses, each with `to_dict`/`from_dict`
(JSON-ready: ids as strings, binary fields as base64) and `to_json`/`from_json`.

Every message can come from a hostile or broken peer or coordinator, so `from_dict` checks
everything before anything is used: exactly the known keys, ids in the shape the federation
uses for names, base64 fields of their exact sizes, no duplicate sites, at most `MAX_SITES`
entries. A message that fails any check raises `SecAggError` naming the field; whether a
well-formed message is *acceptable* (signatures, thresholds, sets) is the state machines'
business (`client.SiteSecAgg`, `server.CoordinatorSecAgg`).

The masked vector itself is not JSON: it is uint32 little-endian bytes (`vector_to_bytes`),
which the agent releases through its egress gate like any update.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from agent.errors import SecAggError
from agent.exchange.secagg.primitives import KEY_BYTES, NONCE_BYTES, SIGNATURE_BYTES, TAG_BYTES, b64d, b64e
from agent.exchange.secagg.shamir import SHARE_BYTES

# Site ids: the shape of the federation's site and agent names (`agent.config.check_name`).
SITE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Run and round ids: the shape of a plan's round_id.
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_SITES = 1000
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the largest JSON message: 1000 ciphertexts or bundles
# What a share ciphertext seals: the b-share and the s-share of the recipient, 68 bytes each.
SHARE_PLAINTEXT_BYTES = 2 * SHARE_BYTES
CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + TAG_BYTES

_DOMAIN = b"fedsite-secagg-v1"


def context(purpose: str, run_id: str, round_id: str, *site_ids: str) -> bytes:
    """The bytes that bind a key, a ciphertext or a signature to its purpose, run, round and sites.

    Ids cannot contain '|' (see the id patterns), so the join is unambiguous."""
    return b"|".join(
        [_DOMAIN, purpose.encode(), run_id.encode(), round_id.encode(), *(s.encode() for s in site_ids)]
    )


# --------------------------------------------------------------------------- field checks


def _fields(data: object, what: str, keys: Iterable[str]) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise SecAggError(f"{what}: expected a JSON object, got {type(data).__name__}")
    expected = set(keys)
    unknown = sorted(str(k) for k in data if k not in expected)
    if unknown:
        raise SecAggError(f"{what}: unknown field(s) {', '.join(repr(k) for k in unknown[:5])}")
    missing = sorted(expected - set(data))
    if missing:
        raise SecAggError(f"{what}: missing field(s) {', '.join(repr(k) for k in missing)}")
    return dict(data)


def check_site_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not SITE_ID_RE.fullmatch(value):
        shown = repr(value)[:80]
        raise SecAggError(f"{field}: {shown} is not a site id (1-64 letters, digits, '.', '_' or '-')")
    return value


def check_run_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not RUN_ID_RE.fullmatch(value):
        shown = repr(value)[:80]
        raise SecAggError(f"{field}: {shown} is not an id (1-128 letters, digits, '.', '_' or '-')")
    return value


def _site_list(value: object, field: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise SecAggError(f"{field}: expected a list of site ids, got {type(value).__name__}")
    if len(value) > MAX_SITES:
        raise SecAggError(f"{field}: {len(value)} sites, more than {MAX_SITES}")
    ids = [check_site_id(v, f"{field}[{i}]") for i, v in enumerate(value)]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise SecAggError(f"{field}: site(s) listed twice: {', '.join(dup[:5])}")
    return tuple(sorted(ids))


def _blob_map(value: object, field: str, size: int) -> dict[str, bytes]:
    if not isinstance(value, Mapping):
        raise SecAggError(f"{field}: expected an object {{site id: base64}}, got {type(value).__name__}")
    if len(value) > MAX_SITES:
        raise SecAggError(f"{field}: {len(value)} entries, more than {MAX_SITES}")
    return {
        check_site_id(k, f"{field} key"): b64d(v, field=f"{field}[{k}]", size=size) for k, v in value.items()
    }


def _check_context(run_id: object, round_id: object) -> tuple[str, str]:
    return check_run_id(run_id, "run_id"), check_run_id(round_id, "round_id")


_M = TypeVar("_M", bound="_Message")


class _Message(ABC):
    """JSON text in and out, with a size limit before parsing."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The message as JSON-ready data."""

    @classmethod
    @abstractmethod
    def from_dict(cls: type[_M], data: object) -> _M:
        """The message from received data, every field checked."""

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls: type[_M], text: str | bytes) -> _M:
        if len(text) > MAX_MESSAGE_BYTES:
            raise SecAggError(f"{cls.__name__}: {len(text)} bytes, over the limit of {MAX_MESSAGE_BYTES}")
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SecAggError(f"{cls.__name__}: not valid JSON ({exc})") from None
        return cls.from_dict(data)


# --------------------------------------------------------------------------- step 0: advertise


@dataclass(frozen=True)
class AdvertiseBundle(_Message):
    """A site's two fresh X25519 public keys for one round, signed with its long-term Ed25519 key.

    c_pk agrees the keys that encrypt shares; s_pk agrees the pairwise mask seeds. The signature
    covers `signed_bytes()`: site, run, round and both keys, so a bundle cannot be replayed in
    another round or attributed to another site.
    """

    site_id: str
    run_id: str
    round_id: str
    c_pk: bytes
    s_pk: bytes
    signature: bytes

    def signed_bytes(self) -> bytes:
        return context("advertise", self.run_id, self.round_id, self.site_id) + b"|" + self.c_pk + self.s_pk

    def to_dict(self) -> dict[str, Any]:
        return {
            "site_id": self.site_id,
            "run_id": self.run_id,
            "round_id": self.round_id,
            "c_pk": b64e(self.c_pk),
            "s_pk": b64e(self.s_pk),
            "signature": b64e(self.signature),
        }

    @classmethod
    def from_dict(cls, data: object) -> AdvertiseBundle:
        f = _fields(data, "advertise bundle", ("site_id", "run_id", "round_id", "c_pk", "s_pk", "signature"))
        run_id, round_id = _check_context(f["run_id"], f["round_id"])
        return cls(
            site_id=check_site_id(f["site_id"], "site_id"),
            run_id=run_id,
            round_id=round_id,
            c_pk=b64d(f["c_pk"], field="c_pk", size=KEY_BYTES),
            s_pk=b64d(f["s_pk"], field="s_pk", size=KEY_BYTES),
            signature=b64d(f["signature"], field="signature", size=SIGNATURE_BYTES),
        )


# --------------------------------------------------------------------------- step 1: share


@dataclass(frozen=True)
class ShareRequest(_Message):
    """Coordinator -> every site of U1: the advertise bundles of all sites that advertised."""

    run_id: str
    round_id: str
    bundles: tuple[AdvertiseBundle, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "round_id": self.round_id,
            "bundles": [b.to_dict() for b in self.bundles],
        }

    @classmethod
    def from_dict(cls, data: object) -> ShareRequest:
        f = _fields(data, "share request", ("run_id", "round_id", "bundles"))
        run_id, round_id = _check_context(f["run_id"], f["round_id"])
        raw = f["bundles"]
        if not isinstance(raw, list):
            raise SecAggError(f"bundles: expected a list, got {type(raw).__name__}")
        if len(raw) > MAX_SITES:
            raise SecAggError(f"bundles: {len(raw)} bundles, more than {MAX_SITES}")
        bundles: list[AdvertiseBundle] = []
        for i, item in enumerate(raw):
            try:
                bundles.append(AdvertiseBundle.from_dict(item))
            except SecAggError as exc:
                raise SecAggError(f"bundles[{i}]: {exc}") from None
        # Duplicates are kept: refusing them is the site's decision (reason "duplicate_site").
        return cls(run_id, round_id, tuple(bundles))


@dataclass(frozen=True)
class ShareResponse(_Message):
    """Site -> coordinator: one sealed pair of shares (b and s) for every other site of U1."""

    site_id: str
    run_id: str
    round_id: str
    ciphertexts: Mapping[str, bytes]  # recipient site id -> AES-GCM ciphertext

    def to_dict(self) -> dict[str, Any]:
        return {
            "site_id": self.site_id,
            "run_id": self.run_id,
            "round_id": self.round_id,
            "ciphertexts": {k: b64e(v) for k, v in sorted(self.ciphertexts.items())},
        }

    @classmethod
    def from_dict(cls, data: object) -> ShareResponse:
        f = _fields(data, "share response", ("site_id", "run_id", "round_id", "ciphertexts"))
        run_id, round_id = _check_context(f["run_id"], f["round_id"])
        return cls(
            check_site_id(f["site_id"], "site_id"),
            run_id,
            round_id,
            _blob_map(f["ciphertexts"], "ciphertexts", CIPHERTEXT_BYTES),
        )


# --------------------------------------------------------------------------- step 2: masked input


@dataclass(frozen=True)
class MaskRequest(_Message):
    """Coordinator -> site u: U2 (the sites whose shares arrived) and the ciphertexts addressed to u."""

    run_id: str
    round_id: str
    survivors: tuple[str, ...]  # U2, sorted
    ciphertexts: Mapping[str, bytes]  # sender site id -> ciphertext for this site

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "round_id": self.round_id,
            "survivors": list(self.survivors),
            "ciphertexts": {k: b64e(v) for k, v in sorted(self.ciphertexts.items())},
        }

    @classmethod
    def from_dict(cls, data: object) -> MaskRequest:
        f = _fields(data, "mask request", ("run_id", "round_id", "survivors", "ciphertexts"))
        run_id, round_id = _check_context(f["run_id"], f["round_id"])
        return cls(
            run_id,
            round_id,
            _site_list(f["survivors"], "survivors"),
            _blob_map(f["ciphertexts"], "ciphertexts", CIPHERTEXT_BYTES),
        )


def vector_to_bytes(vector: np.ndarray) -> bytes:
    """A uint32 vector as little-endian bytes (how a masked input travels)."""
    if vector.dtype != np.uint32 or vector.ndim != 1:
        raise SecAggError(f"a masked vector is 1-D uint32, got {vector.dtype} {vector.shape}")
    return vector.astype("<u4", copy=False).tobytes()


def vector_from_bytes(data: bytes, length: int) -> np.ndarray:
    """Inverse of `vector_to_bytes`, refusing any other length than LENGTH elements."""
    if len(data) != 4 * length:
        raise SecAggError(
            f"masked vector is {len(data)} bytes, expected {4 * length} ({length} uint32 values)"
        )
    return np.frombuffer(data, dtype="<u4").astype(np.uint32)


# --------------------------------------------------------------------------- step 3: unmask


@dataclass(frozen=True)
class UnmaskRequest(_Message):
    """Coordinator -> every site of U3: who survived (U3) and who dropped after sharing (U2 \\ U3)."""

    run_id: str
    round_id: str
    survivors: tuple[str, ...]  # U3, sorted
    dropped: tuple[str, ...]  # U2 \ U3, sorted

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "round_id": self.round_id,
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
        }

    @classmethod
    def from_dict(cls, data: object) -> UnmaskRequest:
        f = _fields(data, "unmask request", ("run_id", "round_id", "survivors", "dropped"))
        run_id, round_id = _check_context(f["run_id"], f["round_id"])
        # A site in both lists is kept: refusing it is the site's decision (reason "both_shares").
        return cls(
            run_id, round_id, _site_list(f["survivors"], "survivors"), _site_list(f["dropped"], "dropped")
        )


@dataclass(frozen=True)
class UnmaskResponse(_Message):
    """Site -> coordinator: b-shares of the survivors, s-shares of the dropped (serialized `Share`s)."""

    site_id: str
    run_id: str
    round_id: str
    b_shares: Mapping[str, bytes]  # survivor id -> share of its self-mask seed
    s_shares: Mapping[str, bytes]  # dropped id -> share of its mask-agreement private key

    def to_dict(self) -> dict[str, Any]:
        return {
            "site_id": self.site_id,
            "run_id": self.run_id,
            "round_id": self.round_id,
            "b_shares": {k: b64e(v) for k, v in sorted(self.b_shares.items())},
            "s_shares": {k: b64e(v) for k, v in sorted(self.s_shares.items())},
        }

    @classmethod
    def from_dict(cls, data: object) -> UnmaskResponse:
        f = _fields(data, "unmask response", ("site_id", "run_id", "round_id", "b_shares", "s_shares"))
        run_id, round_id = _check_context(f["run_id"], f["round_id"])
        b = _blob_map(f["b_shares"], "b_shares", SHARE_BYTES)
        s = _blob_map(f["s_shares"], "s_shares", SHARE_BYTES)
        both = sorted(set(b) & set(s))
        if both:
            raise SecAggError(f"unmask response holds both shares for {', '.join(both[:5])}")
        return cls(check_site_id(f["site_id"], "site_id"), run_id, round_id, b, s)
