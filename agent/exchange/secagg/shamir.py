"""Shamir's t-of-n secret sharing over the prime field GF(2^521 - 1), for 32-byte secrets.

Small enough to read in full, which is why it is ours: a secret (a self-mask seed or an X25519
private key, both 32 bytes, so below the prime) is the constant term of a random polynomial
of degree t - 1; site number x (1-based, its position in the round's sorted site list) gets
the polynomial's value at x. Any t shares give the secret back by Lagrange interpolation at 0;
fewer than t give no information about it. Coefficients come from `secrets` (the OS CSPRNG).

A share travels as 2 bytes of x (big-endian) and 66 bytes of y (big-endian, 521 bits).
"""

from __future__ import annotations

import secrets as _secrets
from collections.abc import Sequence
from dataclasses import dataclass

from agent.errors import SecAggError

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
_Y_BYTES = 66
SHARE_BYTES = 2 + _Y_BYTES
MAX_SHARES = 65535


@dataclass(frozen=True)
class Share:
    """One point (x, y) of the sharing polynomial; x in 1..65535, y in [0, PRIME)."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(2, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Parse a received share; `SecAggError` for a wrong length, x = 0 or y outside the field."""
        if len(data) != SHARE_BYTES:
            raise SecAggError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        x = int.from_bytes(data[:2], "big")
        y = int.from_bytes(data[2:], "big")
        if x == 0:
            raise SecAggError("share has x = 0 (that point is the secret itself)")
        if y >= PRIME:
            raise SecAggError("share value is outside the field")
        return cls(x, y)


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, Share]:
    """Share SECRET (32 bytes) t-of-n: {x: Share} for every x in XS (distinct, 1..65535)."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"a shared secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(xs)) != len(xs):
        raise SecAggError("share x-coordinates must be distinct")
    if any(not (1 <= x <= MAX_SHARES) for x in xs):
        raise SecAggError(f"share x-coordinates must be in 1..{MAX_SHARES}")
    if not (1 <= threshold <= len(xs)):
        raise SecAggError(f"threshold {threshold} must be between 1 and the number of shares ({len(xs)})")
    coefficients = [int.from_bytes(secret, "big")] + [_secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, Share] = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = Share(x, y)
    return shares


def _interpolate(points: Sequence[Share], at: int) -> int:
    total = 0
    for i, pi in enumerate(points):
        num, den = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                num = num * (at - pj.x) % PRIME
                den = den * (pi.x - pj.x) % PRIME
        total = (total + pi.y * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: Sequence[Share], threshold: int) -> bytes:
    """The 32-byte secret from at least THRESHOLD shares.

    Refuses fewer than THRESHOLD shares and duplicate x-coordinates. With more than THRESHOLD
    shares, every extra one must lie on the polynomial through the first THRESHOLD (a wrong or
    altered share is detected rather than silently giving a wrong secret); a result that does
    not fit in 32 bytes means the shares do not belong together.
    """
    if threshold < 1:
        raise SecAggError(f"threshold must be at least 1, got {threshold}")
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise SecAggError("duplicate share x-coordinates: refusing to combine")
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, below the threshold of {threshold}: cannot reconstruct")
    base = list(shares[:threshold])
    for extra in shares[threshold:]:
        if _interpolate(base, extra.x) != extra.y:
            raise SecAggError(f"share x={extra.x} does not fit the others: the shares are inconsistent")
    value = _interpolate(base, 0)
    if value >> (8 * SECRET_BYTES):
        raise SecAggError("reconstructed value is not a 32-byte secret: the shares do not belong together")
    return value.to_bytes(SECRET_BYTES, "big")
