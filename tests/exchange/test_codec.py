"""The safetensors codec refuses everything but well-formed, expected, finite float tensors."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save as st_save

from agent.errors import WeightError
from agent.exchange.codec import decode_weights, encode_weights, parse_header

LIMIT = 1 << 20


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "norm.running_var": torch.rand(4, generator=g) + 0.5,
    }


def _expected() -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in _state().items()}


def test_roundtrip_float32_is_exact() -> None:
    state = _state()
    out = decode_weights(encode_weights(state), expected=_expected(), max_bytes=LIMIT)
    assert set(out) == set(state)
    for name, tensor in state.items():
        assert out[name].dtype == torch.float32
        assert torch.equal(out[name], tensor)


def test_float16_transfer_is_restored_to_float32() -> None:
    state = _state()
    data = encode_weights(state, "float16")
    assert len(data) < len(encode_weights(state))
    out = decode_weights(data, expected=_expected(), max_bytes=LIMIT)
    for name, tensor in state.items():
        assert out[name].dtype == torch.float32
        assert torch.allclose(out[name], tensor, atol=1e-2, rtol=1e-3)


def test_bfloat16_on_the_wire_is_accepted() -> None:
    state = {n: t.to(torch.bfloat16) for n, t in _state().items()}
    out = decode_weights(st_save(state), expected=_expected(), max_bytes=LIMIT)
    assert all(t.dtype == torch.float32 for t in out.values())


def test_encoding_is_deterministic() -> None:
    assert encode_weights(_state()) == encode_weights(dict(reversed(list(_state().items()))))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("conv.bias"), "missing tensors: 'conv.bias'"),
        (
            lambda s: s.update({"extra.weight": torch.zeros(2)}),
            "unknown tensors not in the plan's model: 'extra.weight'",
        ),
        (lambda s: s.update({"conv.bias": torch.zeros(5)}), "tensor 'conv.bias': shape [5]"),
    ],
    ids=["missing", "extra", "shape"],
)
def test_names_and_shapes_are_checked(mutate, message: str) -> None:
    state = _state()
    mutate(state)
    with pytest.raises(WeightError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_weights(st_save(state), expected=_expected(), max_bytes=LIMIT)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(bad: float) -> None:
    state = _state()
    state["conv.weight"][0, 0, 1, 1] = bad
    with pytest.raises(WeightError, match=r"tensor 'conv.weight': contains NaN or Inf"):
        decode_weights(st_save(state), expected=_expected(), max_bytes=LIMIT)
    with pytest.raises(WeightError, match=r"conv.weight"):
        encode_weights(state)


def test_float16_overflow_is_refused_on_encode() -> None:
    state = _state()
    state["conv.bias"][0] = 1e6
    with pytest.raises(WeightError, match=r"conv.bias.*overflow"):
        encode_weights(state, "float16")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.uint8, torch.int32])
def test_unexpected_dtypes_are_refused(dtype: torch.dtype) -> None:
    state = _state()
    state["conv.bias"] = state["conv.bias"].to(dtype)
    with pytest.raises(WeightError, match=r"tensor 'conv.bias': dtype .* not allowed on the wire"):
        decode_weights(st_save(state), expected=_expected(), max_bytes=LIMIT)


def test_torch_save_zip_archive_is_refused() -> None:
    buf = io.BytesIO()
    torch.save(_state(), buf)
    with pytest.raises(WeightError, match=r"zip archive"):
        decode_weights(buf.getvalue(), expected=_expected(), max_bytes=LIMIT)
    other = io.BytesIO()
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("model.safetensors", encode_weights(_state()))
    with pytest.raises(WeightError, match=r"zip archive"):
        decode_weights(other.getvalue(), expected=_expected(), max_bytes=LIMIT)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickle_is_refused(protocol: int) -> None:
    data = pickle.dumps({n: t.tolist() for n, t in _state().items()}, protocol=protocol)
    with pytest.raises(WeightError, match=r"pickle|not a safetensors file"):
        decode_weights(data, expected=_expected(), max_bytes=LIMIT)


def test_legacy_torch_save_is_refused() -> None:
    buf = io.BytesIO()
    torch.save(_state(), buf, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightError, match=r"pickle"):
        decode_weights(buf.getvalue(), expected=_expected(), max_bytes=LIMIT)


@pytest.mark.parametrize("cut", [0, 3, 7, 8, 20, -1, -17])
def test_truncated_payloads_are_refused(cut: int) -> None:
    data = encode_weights(_state())
    with pytest.raises(WeightError, match=r"truncated|empty|not a safetensors"):
        decode_weights(data[:cut], expected=_expected(), max_bytes=LIMIT)


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(WeightError, match=r"trailing bytes"):
        decode_weights(encode_weights(_state()) + b"\0" * 8, expected=_expected(), max_bytes=LIMIT)


def test_oversize_payload_is_refused_before_parsing() -> None:
    data = encode_weights(_state())
    with pytest.raises(WeightError, match=f"payload is {len(data)} bytes, over the limit of 100"):
        decode_weights(data, expected=_expected(), max_bytes=100)


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_header_lies_are_refused_before_allocation() -> None:
    huge = {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}}
    with pytest.raises(WeightError, match=r"tensor 'w': 16 data bytes for shape"):
        parse_header(_with_header(huge, b"\0" * 16), max_bytes=LIMIT)
    overlap = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    with pytest.raises(WeightError, match=r"overlap or leave a gap"):
        parse_header(_with_header(overlap, b"\0" * 12), max_bytes=LIMIT)
    with pytest.raises(WeightError, match=r"header length .* implausible"):
        parse_header(struct.pack("<Q", 1 << 40) + b"{}", max_bytes=LIMIT)
    with pytest.raises(WeightError, match=r"not valid JSON"):
        parse_header(struct.pack("<Q", 5) + b"{abc}", max_bytes=LIMIT)
    with pytest.raises(WeightError, match=r"no tensors"):
        parse_header(_with_header({"__metadata__": {"a": "b"}}, b""), max_bytes=LIMIT)
    with pytest.raises(WeightError, match=r"malformed shape"):
        parse_header(
            _with_header({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            max_bytes=LIMIT,
        )
