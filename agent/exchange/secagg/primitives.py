"""The cryptographic primitives of secure aggregation, all from `cryptography`, nothing home-made.

* Ed25519: each site's long-term signing key. It signs the per-round public keys a site
  advertises, so that a coordinator that relays them cannot substitute its own (every agent
  checks them against the roster pinned in its own config).
* X25519: two fresh key pairs per site and round, one to agree share-encryption keys, one to
  agree pairwise mask seeds.
* HKDF-SHA256: every agreed secret is expanded with a context string naming its purpose, the
  run, the round and both sites, so that a key made for one use is useless for any other.
* AES-256-GCM: the Shamir shares travel between sites through the coordinator, encrypted and
  bound (associated data) to sender, recipient, run and round.
* ChaCha20 keystream as the mask generator: a full 256-bit key (the seed) and a fixed nonce;
  every seed is fresh per round and purpose, so a key is never reused with the nonce. Seeds are
  never reduced or truncated (a 32-bit seed could be searched by the coordinator).
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.errors import SecAggError
from agent.fileio import atomic_write_bytes

KEY_BYTES = 32  # X25519 and Ed25519 raw keys, HKDF outputs, PRG seeds
SIGNATURE_BYTES = 64
NONCE_BYTES = 12  # AES-GCM
TAG_BYTES = 16
# ChaCha20's 16-byte nonce field (32-bit block counter + 96-bit nonce). Constant, because each
# PRG key (seed) is used for one stream only: fresh self-mask seeds, per-pair per-round HKDF keys.
_PRG_NONCE = bytes(16)
_PRG_CHUNK_WORDS = 1 << 22  # 16 MiB of keystream at a time bounds the zero buffer


def b64e(data: bytes) -> str:
    """Standard base64 with padding: how every binary field travels in JSON."""
    return base64.b64encode(data).decode("ascii")


def b64d(text: object, *, field: str, size: int | None = None, max_size: int | None = None) -> bytes:
    """Decode a base64 field of a received message; a clear `SecAggError` naming FIELD otherwise."""
    if not isinstance(text, str):
        raise SecAggError(f"{field}: expected a base64 string, got {type(text).__name__}")
    limit = max_size if max_size is not None else size
    if limit is not None and len(text) > 4 * ((limit + 2) // 3):
        raise SecAggError(f"{field}: {len(text)} characters of base64, more than {limit} bytes can need")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SecAggError(f"{field}: not valid base64") from None
    if size is not None and len(raw) != size:
        raise SecAggError(f"{field}: {len(raw)} bytes, expected {size}")
    return raw


# --------------------------------------------------------------------------- Ed25519 site keys


def generate_site_key() -> Ed25519PrivateKey:
    """A new long-term site signing key."""
    return Ed25519PrivateKey.generate()


def write_site_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write KEY as unencrypted PKCS#8 PEM, mode 0600 (atomic; refuses to overwrite a key)."""
    if path.exists():
        raise SecAggError(f"{path}: a site key already exists there; refusing to overwrite it")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write_bytes(path, pem)  # mkstemp: 0600
    os.chmod(path, 0o600)


def load_site_key(path: Path) -> Ed25519PrivateKey:
    """Read a site key written by `write_site_key`; the message names the file and the problem."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecAggError(f"{path}: cannot read the site signing key: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SecAggError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SecAggError(f"{path}: the key is {type(key).__name__}, not an Ed25519 private key")
    return key


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Base64 of the 32 raw bytes of the public key: what a roster and a federation file pin."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return b64e(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def parse_public_key(text: object, *, field: str = "public key") -> Ed25519PublicKey:
    """A pinned Ed25519 public key from its base64 form; `SecAggError` naming FIELD otherwise."""
    return Ed25519PublicKey.from_public_bytes(b64d(text, field=field, size=KEY_BYTES))


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def verify(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    """True when SIGNATURE is KEY's signature of DATA."""
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


# --------------------------------------------------------------------------- X25519, HKDF


def x25519_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 pair as (private raw 32 bytes, public raw 32 bytes)."""
    sk = X25519PrivateKey.generate()
    return (
        sk.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        ),
        sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
    )


def x25519_public(private: bytes) -> bytes:
    """The public key of a raw X25519 private key (to check a reconstructed one)."""
    sk = X25519PrivateKey.from_private_bytes(private)
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """HKDF-SHA256(X25519(private, peer_public), info) -> 32 bytes.

    Refuses a peer key that yields the all-zero shared secret (a small-order point).
    """
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as exc:
        raise SecAggError(f"key agreement failed: {exc}") from None
    return hkdf(shared, info)


def hkdf(secret: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


# --------------------------------------------------------------------------- AES-GCM


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: random 12-byte nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Inverse of `seal`; `SecAggError` when the ciphertext or its context was altered."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(f"ciphertext of {len(sealed)} bytes is too short to be sealed")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SecAggError(
            "ciphertext does not authenticate (altered, or not for this recipient/round)"
        ) from None


# --------------------------------------------------------------------------- the mask generator


def _keystream(seed: bytes, length: int) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, uint32 words) chunks of the ChaCha20 keystream under SEED, LENGTH words in all."""
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"PRG seed must be {KEY_BYTES} bytes, got {len(seed)}")
    if length < 0:
        raise SecAggError(f"PRG length must be >= 0, got {length}")
    enc = Cipher(algorithms.ChaCha20(seed, _PRG_NONCE), mode=None).encryptor()
    chunk = _PRG_CHUNK_WORDS
    zeros = bytes(4 * min(length, chunk))
    for start in range(0, length, chunk):
        n = min(chunk, length - start)
        yield start, np.frombuffer(enc.update(zeros[: 4 * n]), dtype="<u4")


def prg(seed: bytes, length: int) -> np.ndarray:
    """LENGTH pseudo-random uint32 words: the ChaCha20 keystream under the full 32-byte SEED,
    read little-endian. Deterministic in SEED; every bit of SEED matters."""
    out = np.empty(length if length > 0 else 0, dtype=np.uint32)
    for start, words in _keystream(seed, length):
        out[start : start + words.shape[0]] = words
    return out


def add_prg(acc: np.ndarray, seed: bytes, sign: int = 1) -> None:
    """acc += sign * PRG(seed) modulo 2^32, in place (ACC is 1-D uint32), one chunk at a time
    (no second vector of the model's size is allocated)."""
    if sign not in (1, -1):
        raise SecAggError(f"mask sign must be +1 or -1, got {sign}")
    if acc.dtype != np.uint32 or acc.ndim != 1:
        raise SecAggError(f"masks are added to a 1-D uint32 vector, got {acc.dtype} {acc.shape}")
    op = np.add if sign == 1 else np.subtract
    for start, words in _keystream(seed, acc.shape[0]):
        part = acc[start : start + words.shape[0]]
        op(part, words, out=part)
