"""The primitives: the mask generator uses the whole seed and is ChaCha20's keystream; keys,
signatures and sealed shares refuse what is not theirs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from agent.errors import SecAggError
from agent.exchange.secagg import primitives as P


def test_prg_is_deterministic_and_is_the_chacha20_keystream() -> None:
    seed = os.urandom(32)
    a = P.prg(seed, 1000)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    assert np.array_equal(a, P.prg(seed, 1000))
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(4000))
    assert a.tobytes() == np.frombuffer(stream, dtype="<u4").astype(np.uint32).tobytes()
    assert np.array_equal(P.prg(seed, 10), a[:10])  # a prefix of the same stream


def test_prg_uses_every_byte_of_the_seed() -> None:
    """Seeds that differ only in their high bytes (or any one byte) give unrelated streams:
    nothing reduces the seed to fewer bits."""
    base = bytes(32)
    stream = P.prg(base, 256)
    for position in (0, 3, 4, 7, 8, 15, 16, 31):
        seed = bytearray(base)
        seed[position] = 0x80
        other = P.prg(bytes(seed), 256)
        # Unrelated streams agree in about 1 word in 2^32: none of 256 here.
        assert np.count_nonzero(other == stream) == 0, position


def test_prg_crosses_its_chunk_boundary_seamlessly(monkeypatch: pytest.MonkeyPatch) -> None:
    seed = os.urandom(32)
    whole = P.prg(seed, 1000)
    monkeypatch.setattr(P, "_PRG_CHUNK_WORDS", 64)
    assert np.array_equal(P.prg(seed, 1000), whole)
    acc = np.arange(1000, dtype=np.uint32)
    P.add_prg(acc, seed, 1)
    assert np.array_equal(acc, np.arange(1000, dtype=np.uint32) + whole)


def test_add_prg_adds_and_subtracts_modulo_2_32() -> None:
    seed = os.urandom(32)
    acc = np.full(100, 0xFFFFFFFF, dtype=np.uint32)
    P.add_prg(acc, seed, 1)
    assert np.array_equal(acc, (P.prg(seed, 100).astype(np.uint64) + 0xFFFFFFFF) % (1 << 32))
    P.add_prg(acc, seed, -1)
    assert np.all(acc == 0xFFFFFFFF)


def test_prg_refuses_a_short_seed() -> None:
    with pytest.raises(SecAggError, match="32 bytes"):
        P.prg(b"\x01" * 4, 10)


def test_key_agreement_is_symmetric_and_bound_to_its_context() -> None:
    a_sk, a_pk = P.x25519_keypair()
    b_sk, b_pk = P.x25519_keypair()
    assert P.agree(a_sk, b_pk, b"ctx") == P.agree(b_sk, a_pk, b"ctx")
    assert P.agree(a_sk, b_pk, b"ctx") != P.agree(a_sk, b_pk, b"other")
    assert P.x25519_public(a_sk) == a_pk
    with pytest.raises(SecAggError, match="key agreement failed"):
        P.agree(a_sk, bytes(32), b"ctx")  # a small-order point: all-zero shared secret


def test_sealed_shares_refuse_another_context_or_a_flipped_bit() -> None:
    key = os.urandom(32)
    sealed = P.seal(key, b"share", b"aad")
    assert P.open_sealed(key, sealed, b"aad") == b"share"
    with pytest.raises(SecAggError, match="does not authenticate"):
        P.open_sealed(key, sealed, b"other aad")
    flipped = bytes([sealed[0] ^ 1]) + sealed[1:]
    with pytest.raises(SecAggError, match="does not authenticate"):
        P.open_sealed(key, flipped, b"aad")
    with pytest.raises(SecAggError, match="too short"):
        P.open_sealed(key, b"x", b"aad")


def test_site_key_file_is_private_loads_back_and_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "site.key"
    key = P.generate_site_key()
    P.write_site_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert P.public_key_b64(P.load_site_key(path)) == P.public_key_b64(key)
    with pytest.raises(SecAggError, match="already exists"):
        P.write_site_key(path, P.generate_site_key())
    sig = P.sign(key, b"data")
    pub = P.parse_public_key(P.public_key_b64(key))
    assert P.verify(pub, sig, b"data") and not P.verify(pub, sig, b"other")


def test_bad_key_material_gets_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SecAggError, match="cannot read the site signing key"):
        P.load_site_key(tmp_path / "missing.key")
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(SecAggError, match="not an unencrypted PEM"):
        P.load_site_key(tmp_path / "junk.key")
    with pytest.raises(SecAggError, match=r"peers\.site-2: 3 bytes, expected 32"):
        P.parse_public_key(P.b64e(b"abc"), field="peers.site-2")
    with pytest.raises(SecAggError, match="not valid base64"):
        P.parse_public_key("!!!!", field="k")
