"""Shamir sharing over GF(2^521 - 1): any t shares give the secret back, fewer are refused."""

from __future__ import annotations

import itertools
import os

import pytest

from agent.errors import SecAggError
from agent.exchange.secagg.shamir import PRIME, SHARE_BYTES, Share, combine, split


@pytest.mark.parametrize(("t", "n"), [(1, 1), (1, 3), (2, 3), (3, 5), (6, 10)])
def test_every_t_subset_reconstructs_the_secret(t: int, n: int) -> None:
    secret = os.urandom(32)
    shares = split(secret, t, list(range(1, n + 1)))
    for subset in itertools.islice(itertools.combinations(shares.values(), t), 20):
        assert combine(list(subset), t) == secret
    assert combine(list(shares.values()), t) == secret  # all of them: the extras are checked


def test_extreme_secrets_and_sparse_x_coordinates() -> None:
    for secret in (bytes(32), b"\xff" * 32, b"\x00" * 31 + b"\x01"):
        shares = split(secret, 3, [7, 300, 65535, 2])
        assert combine([shares[65535], shares[7], shares[2]], 3) == secret


def test_shares_round_trip_as_bytes() -> None:
    shares = split(os.urandom(32), 2, [1, 2, 3])
    blobs = [s.to_bytes() for s in shares.values()]
    assert all(len(b) == SHARE_BYTES for b in blobs)
    assert [Share.from_bytes(b) for b in blobs] == list(shares.values())


def test_fewer_than_t_shares_are_refused() -> None:
    shares = list(split(os.urandom(32), 3, [1, 2, 3, 4]).values())
    with pytest.raises(SecAggError, match="below the threshold of 3"):
        combine(shares[:2], 3)


def test_shares_read_with_a_lower_threshold_are_detected() -> None:
    """Two shares of a degree-2 polynomial read as degree 1: the constant term is a random field
    element, not a 32-byte value, and combine says so instead of returning it."""
    shares = list(split(os.urandom(32), 3, [1, 2, 3]).values())
    with pytest.raises(SecAggError, match="not a 32-byte secret"):
        combine(shares[:2], 2)


def test_duplicate_x_and_inconsistent_shares_are_refused() -> None:
    shares = list(split(os.urandom(32), 2, [1, 2, 3]).values())
    with pytest.raises(SecAggError, match="duplicate"):
        combine([shares[0], shares[0]], 2)
    altered = Share(shares[2].x, (shares[2].y + 1) % PRIME)
    with pytest.raises(SecAggError, match="does not fit"):
        combine([shares[0], shares[1], altered], 2)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"\x00" * (SHARE_BYTES - 1), "is 68 bytes"),
        (b"\x00\x00" + b"\x01" * 66, "x = 0"),
        (b"\x00\x01" + b"\xff" * 66, "outside the field"),
    ],
)
def test_malformed_shares_are_refused(blob: bytes, message: str) -> None:
    with pytest.raises(SecAggError, match=message):
        Share.from_bytes(blob)


def test_bad_split_arguments_are_refused() -> None:
    with pytest.raises(SecAggError, match="32 bytes"):
        split(b"short", 1, [1])
    with pytest.raises(SecAggError, match="distinct"):
        split(bytes(32), 1, [1, 1])
    with pytest.raises(SecAggError, match="threshold 4"):
        split(bytes(32), 4, [1, 2, 3])
    with pytest.raises(SecAggError, match="x-coordinates must be in"):
        split(bytes(32), 1, [0])
