"""Compressed updates (agent/exchange/compression.py): round trips within the bound the scale
implies, error feedback that loses nothing over rounds, and payloads that are refused."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save as st_save_numpy

from agent.errors import WeightError
from agent.exchange.codec import encode_weights
from agent.exchange.compression import Compression, compress, decode_update, error_bound

MAX = 10**8


def _diff(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(6, 3, 3, 3, generator=g) * 0.05,
        "conv.bias": torch.randn(6, generator=g) * 0.01,
        "head.weight": torch.randn(1, 6, 1, 1, generator=g),
        "empty": torch.zeros(0),
        "counter": torch.tensor(0.25),
    }


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _entries(payload: bytes) -> dict[str, np.ndarray]:
    n = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + n])
    header.pop("__metadata__", None)
    body = payload[8 + n :]
    kinds = {"I8": "i1", "F32": "<f4", "I32": "<i4", "U8": "u1"}
    out = {}
    for entry, info in header.items():
        lo, hi = info["data_offsets"]
        out[entry] = np.frombuffer(body[lo:hi], dtype=kinds[info["dtype"]])
    return out


def _scales(payload: bytes, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Each tensor's scales, split by scale_counts in sorted-name order."""
    e = _entries(payload)
    out, at = {}, 0
    for name, count in zip(sorted(shapes), e["scale_counts"], strict=True):
        out[name] = e["scale"][at : at + count]
        at += int(count)
    return out


@pytest.mark.parametrize("scale", ["tensor", "channel"])
@pytest.mark.parametrize("rounding", ["deterministic", "stochastic"])
def test_int8_round_trip_is_within_the_bound_of_each_scale(scale: Any, rounding: Any) -> None:
    diff = _diff()
    spec = Compression("int8", scale=scale, rounding=rounding)
    payload, residual = compress(diff, spec, seed_material="round-1")
    assert residual is None
    back = decode_update(payload, expected=_shapes(diff), max_bytes=MAX)
    scales = _scales(payload, _shapes(diff))
    for name, tensor in diff.items():
        assert back[name].shape == tensor.shape and back[name].dtype == torch.float32
        if tensor.numel() == 0:
            continue
        s = scales[name]
        assert s.size == (tensor.shape[0] if scale == "channel" and tensor.dim() >= 2 else 1)
        per_value = np.repeat(s, tensor.numel() // s.size).reshape(tuple(tensor.shape))
        err = (back[name] - tensor).abs().numpy()
        bound = np.vectorize(lambda v: error_bound(spec, float(v)))(per_value)
        assert np.all(err <= bound * (1 + 1e-5) + 1e-12), name
        # The largest magnitude of each channel is exact up to float32 (it maps to 127).
        assert float((back[name] - tensor).abs().max()) <= float(s.max())


def test_int8_is_a_quarter_of_float32_and_reruns_send_the_same_bytes() -> None:
    diff = {"w": torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(1))}
    plain = encode_weights(diff)
    spec = Compression("int8", rounding="stochastic")
    a, _ = compress(diff, spec, seed_material="run-r001-site-1")
    b, _ = compress(diff, spec, seed_material="run-r001-site-1")
    c, _ = compress(diff, spec, seed_material="run-r002-site-1")
    assert a == b and a != c
    assert len(a) < 0.27 * len(plain)


def test_stochastic_rounding_is_unbiased() -> None:
    value = torch.full((200_000,), 0.3)
    value[0] = 1.27  # the scale: 0.01 per step, so 0.3 is exactly 30 steps... shift it off-grid
    value[1:] = 0.3037
    spec = Compression("int8", scale="tensor", rounding="stochastic")
    payload, _ = compress({"w": value}, spec, seed_material="x")
    back = decode_update(payload, expected={"w": (200_000,)}, max_bytes=MAX)["w"]
    assert abs(float(back[1:].mean()) - 0.3037) < 2e-5
    det, _ = compress({"w": value}, Compression("int8", scale="tensor"), seed_material="x")
    back_det = decode_update(det, expected={"w": (200_000,)}, max_bytes=MAX)["w"]
    assert abs(float(back_det[1:].mean()) - 0.3037) > 2e-4  # rounding to nearest is biased here


def test_topk_sends_the_largest_values_and_feedback_carries_the_rest() -> None:
    spec = Compression("int8_topk", topk_fraction=0.1, scale="tensor")
    shapes = {"w": (40, 25)}
    rounds = [{"w": torch.randn(40, 25, generator=torch.Generator().manual_seed(r))} for r in range(3)]
    residual: dict[str, torch.Tensor] | None = None
    sent_total = torch.zeros(40, 25, dtype=torch.float64)
    for r, diff in enumerate(rounds):
        before = None if residual is None else residual["w"].clone()
        payload, residual = compress(diff, spec, seed_material=f"r{r}", residual=residual)
        assert residual is not None
        sent = decode_update(payload, expected=shapes, max_bytes=MAX)["w"]
        assert int((sent != 0).sum()) <= math.ceil(0.1 * 1000)
        # What this round carries plus what it keeps back is the difference plus what came in.
        incoming = diff["w"] if before is None else diff["w"] + before
        torch.testing.assert_close(sent + residual["w"], incoming, rtol=0, atol=1e-5)
        if r == 0:
            # The values sent are the largest magnitudes of the difference.
            kept = sent != 0
            assert float(diff["w"].abs()[kept].min()) >= float(diff["w"].abs()[~kept].max()) - 1e-6
        sent_total += sent.double()
    # Over the rounds nothing is lost: sent + residual equals the sum of the differences.
    total = sum(d["w"].double() for d in rounds)
    assert residual is not None
    torch.testing.assert_close(sent_total + residual["w"].double(), total, rtol=0, atol=1e-4)
    # The residual is not the plain remainder: quantisation error is fed back as well.
    assert float(residual["w"].abs().max()) > 0


def test_topk_payload_is_far_smaller() -> None:
    diff = {"w": torch.randn(128, 64, 3, 3, generator=torch.Generator().manual_seed(2))}
    payload, _ = compress(diff, Compression("int8_topk", topk_fraction=0.05), seed_material="x")
    assert len(payload) < 0.08 * len(encode_weights(diff))


def test_plain_updates_still_decode_through_the_same_reader() -> None:
    diff = _diff()
    back = decode_update(encode_weights(diff), expected=_shapes(diff), max_bytes=MAX)
    for name, tensor in diff.items():
        assert torch.equal(back[name], tensor)


def test_spec_is_checked() -> None:
    with pytest.raises(WeightError, match="needs a topk_fraction"):
        Compression("int8_topk")
    with pytest.raises(WeightError, match=r"topk_fraction applies to int8_topk only"):
        Compression("int8", topk_fraction=0.5)
    with pytest.raises(WeightError, match="NaN or Inf"):
        compress({"w": torch.tensor([float("nan")])}, Compression("int8"), seed_material="x")


# -- hostile payloads ------------------------------------------------------------------------


def _payload(entries: dict[str, np.ndarray]) -> bytes:
    return st_save_numpy(entries, metadata={"format": "fedsite-int8"})


# A model of two tensors: "a" of shape (2, 2) (per-channel: 2 scales) and "b" of shape (3,).
SHAPES = {"a": (2, 2), "b": (3,)}
Q = np.array([1, -2, 3, 4, 5, 6, 7], dtype=np.int8)
S = np.array([0.5, 0.25, 1.0], dtype=np.float32)
C = np.array([2, 1], dtype=np.int32)
GOOD = {"q": Q, "scale": S, "scale_counts": C}


def test_the_packed_layout_decodes_tensor_by_tensor() -> None:
    out = decode_update(_payload(GOOD), expected=SHAPES, max_bytes=MAX)
    torch.testing.assert_close(out["a"], torch.tensor([[0.5, -1.0], [0.75, 1.0]]))
    torch.testing.assert_close(out["b"], torch.tensor([5.0, 6.0, 7.0]))
    # Top-k: a mask over all 7 values marks which the 3 values sent belong to.
    mask = np.packbits(np.array([1, 0, 0, 1, 0, 0, 1], dtype=bool))
    sparse = {"q": np.array([2, 4, 6], np.int8), "scale": S, "scale_counts": C, "mask": mask}
    out = decode_update(_payload(sparse), expected=SHAPES, max_bytes=MAX)
    torch.testing.assert_close(out["a"], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(out["b"], torch.tensor([0.0, 0.0, 6.0]))


def _with(**change: np.ndarray | None) -> dict[str, np.ndarray]:
    out = {**GOOD, **{k: v for k, v in change.items() if v is not None}}
    for k, v in change.items():
        if v is None:
            out.pop(k)
    return out


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            _with(scale=np.array([-0.5, 1, 1], np.float32)),
            "tensor 'a': scales must be finite and not negative",
        ),
        (_with(scale=np.array([0.5, 1, np.nan], np.float32)), "tensor 'b': scales must be finite"),
        (_with(scale=np.array([0.5, np.inf, 1], np.float32)), "finite and not negative"),
        (_with(scale=np.ones(2, np.float32)), "2 scales, scale_counts adds up to 3"),
        (_with(scale_counts=np.array([3, 0], np.int32)), r"tensor 'a': 3 scale\(s\); expected 1 or 2"),
        (_with(scale_counts=np.array([2], np.int32)), "scale_counts has 1 entries for a model of 2"),
        (_with(q=Q.astype(np.int32)), "q must be I8"),
        (_with(q=np.array([-128, 0, 0, 0, 0, 0, 0], np.int8)), "-128"),
        (_with(q=Q[:6]), "6 int8 values for a model of 7"),
        (_with(extra=S), r"unexpected entries \['extra'\]"),
        (_with(q=Q.reshape(7, 1)), "must be one-dimensional"),
        (
            _with(q=Q[:2], mask=np.packbits(np.array([1, 0, 0, 1, 0, 0, 1], dtype=bool))),
            "mask marks 3 values, 2 were sent",
        ),
        (_with(q=Q[:1], mask=np.array([0x80, 0], np.uint8)), "mask has 2 bytes; 7 values need 1"),
        (_with(q=Q[:2], mask=np.array([0x81], np.uint8)), "bits set past the model's last value"),
        (_with(mask=np.packbits(np.ones(7, dtype=bool)).astype(np.int8)), "mask must be U8"),
    ],
)
def test_malformed_compressed_payloads_are_refused(entries: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(WeightError, match=message):
        decode_update(_payload(entries), expected=SHAPES, max_bytes=MAX)


def test_a_payload_missing_an_entry_is_not_taken_for_a_compressed_one() -> None:
    # Without scale_counts it is no compressed payload, and no model either.
    with pytest.raises(WeightError, match="not allowed on the wire"):
        decode_update(_payload(_with(scale_counts=None)), expected=SHAPES, max_bytes=MAX)


def test_a_compressed_payload_needs_the_model_shapes_and_a_sane_header() -> None:
    payload = _payload(GOOD)
    with pytest.raises(WeightError, match="against the model's tensor shapes"):
        decode_update(payload, expected=None, max_bytes=MAX)
    with pytest.raises(WeightError, match="truncated"):
        decode_update(payload[:-3], expected=SHAPES, max_bytes=MAX)
    n = struct.unpack("<Q", payload[:8])[0]
    with pytest.raises(WeightError, match="over the limit"):
        decode_update(payload, expected=SHAPES, max_bytes=8 + n)
