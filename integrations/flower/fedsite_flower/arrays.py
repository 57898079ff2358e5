"""Model arrays as safetensors bytes, with numpy only (no torch), byte-for-byte like the agent.

The agent's codec (`agent.exchange.codec.encode_weights`) writes safetensors with the metadata
``{"format": "pt"}``; safetensors orders tensors by dtype and name whatever order they are given
in. Writing the same arrays here with the same metadata therefore gives the same bytes, so the
SHA-256 that the ServerApp computes over the arrays it received equals the SHA-256 the agent's
egress gate recorded in its audit log (`egress.sent`).

Only float32 and float16 travel (the agent's transfer dtypes); anything else is refused with
its tensor's name, as the agent would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

# The metadata the agent's codec writes; it is part of the bytes, hence of the hash.
METADATA = {"format": "pt"}
WIRE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class ArrayCodecError(ValueError):
    """Arrays that cannot travel as fedsite weights; the message names the tensor."""


def _canonical(name: str, value: np.ndarray) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.newbyteorder("=") not in WIRE_DTYPES:
        raise ArrayCodecError(f"tensor {name!r}: dtype {array.dtype} is not float32 or float16")
    if not bool(np.isfinite(array).all()):
        raise ArrayCodecError(f"tensor {name!r}: contains NaN or Inf values")
    # safetensors stores little-endian, C-ordered data.
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False))


def encode(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Safetensors bytes of ARRAYS, identical to what the agent's codec writes for them."""
    if not arrays:
        raise ArrayCodecError("no tensors to encode")
    return bytes(
        st_save({name: _canonical(name, value) for name, value in arrays.items()}, metadata=METADATA)
    )


def decode(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of safetensors DATA (from the agent, hash-checked before), dtypes as they came."""
    try:
        arrays = st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own error type for any malformed input
        raise ArrayCodecError(f"not a safetensors payload: {exc}") from None
    if not arrays:
        raise ArrayCodecError("the safetensors payload holds no tensors")
    for name, value in arrays.items():
        _canonical(name, value)
    return arrays


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """The SHA-256 of ARRAYS in their canonical encoding (what the agent's audit log records)."""
    return sha256(encode(arrays))
