"""fedsite_flower.arrays writes, with numpy only, the very bytes the agent's codec writes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from fedsite_flower import arrays

from agent.exchange.codec import decode_weights, encode_weights


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    # Inserted out of name order: the encoding must not depend on it.
    return {
        "model.2.bias": torch.randn(7, generator=g),
        "model.0.conv.weight": torch.randn(4, 1, 3, 3, generator=g),
        "model.1.weight": torch.randn(2, 5, generator=g),
    }


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_same_bytes_as_the_agents_codec(dtype: str) -> None:
    state = _state()
    agent_bytes = encode_weights(state, dtype=dtype)
    np_dtype = np.float32 if dtype == "float32" else np.float16
    mine = arrays.encode({k: v.numpy().astype(np_dtype) for k, v in reversed(list(state.items()))})
    assert mine == agent_bytes
    assert arrays.arrays_sha256(arrays.decode(agent_bytes)) == hashlib.sha256(agent_bytes).hexdigest()


def test_round_trip_keeps_values_and_dtypes() -> None:
    agent_bytes = encode_weights(_state(), dtype="float16")
    decoded = arrays.decode(agent_bytes)
    assert {a.dtype for a in decoded.values()} == {np.dtype(np.float16)}
    assert arrays.encode(decoded) == agent_bytes
    back = decode_weights(arrays.encode(decoded), expected=None, max_bytes=1 << 20)
    for name, tensor in back.items():
        assert np.array_equal(tensor.numpy(), decoded[name].astype(np.float32))


def test_big_endian_input_gives_the_canonical_bytes() -> None:
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert arrays.encode({"w": value.astype(">f4")}) == arrays.encode({"w": value})


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (np.arange(3, dtype=np.int64), "dtype int64"),
        (np.array([1.0, np.nan], dtype=np.float32), "NaN or Inf"),
        (np.arange(3, dtype=np.float64), "dtype float64"),
    ],
)
def test_refuses_what_the_agent_would_refuse(value: np.ndarray, needle: str) -> None:
    with pytest.raises(arrays.ArrayCodecError, match=needle) as info:
        arrays.encode({"layer.weight": value})
    assert "layer.weight" in str(info.value)


def test_refuses_no_tensors_and_non_safetensors_bytes() -> None:
    with pytest.raises(arrays.ArrayCodecError, match="no tensors"):
        arrays.encode({})
    with pytest.raises(arrays.ArrayCodecError, match="not a safetensors payload"):
        arrays.decode(b"PK\x03\x04 a zip, not safetensors")
