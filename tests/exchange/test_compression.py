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


def _scales(payload: bytes) -> dict[str, np.ndarray]:
    n = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + n])
    body = payload[8 + n :]
    out = {}
    for entry, info in header.items():
        if entry.endswith("::scale"):
            lo, hi = info["data_offsets"]
            out[entry.split("::")[0]] = np.frombuffer(body[lo:hi], dtype="<f4")
    return out


@pytest.mark.parametrize("scale", ["tensor", "channel"])
@pytest.mark.parametrize("rounding", ["deterministic", "stochastic"])
def test_int8_round_trip_is_within_the_bound_of_each_scale(scale: Any, rounding: Any) -> None:
    diff = _diff()
    spec = Compression("int8", scale=scale, rounding=rounding)
    payload, residual = compress(diff, spec, seed_material="round-1")
    assert residual is None
    back = decode_update(payload, expected=_shapes(diff), max_bytes=MAX)
    scales = _scales(payload)
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
    with pytest.raises(WeightError, match="may not contain"):
        compress({"a::q": torch.zeros(2)}, Compression("int8"), seed_material="x")


# -- hostile payloads ------------------------------------------------------------------------


def _payload(entries: dict[str, np.ndarray]) -> bytes:
    return st_save_numpy(entries, metadata={"format": "fedsite-compressed"})


GOOD_Q = np.array([[1, -2], [3, 4]], dtype=np.int8)
TOPK_Q = np.array([1, -2], dtype=np.int8)
GOOD_S = np.array([0.5], dtype=np.float32)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"w::q": GOOD_Q, "w::scale": np.array([-0.5], np.float32)}, "finite and not negative"),
        ({"w::q": GOOD_Q, "w::scale": np.array([np.nan], np.float32)}, "finite and not negative"),
        ({"w::q": GOOD_Q, "w::scale": np.array([np.inf], np.float32)}, "finite and not negative"),
        ({"w::q": GOOD_Q, "w::scale": np.ones(3, np.float32)}, r"3 scale\(s\); expected 1 or 2"),
        ({"w::q": GOOD_Q}, "w::scale is missing"),
        ({"w::scale": GOOD_S}, "w::q is missing"),
        ({"w::q": GOOD_Q, "w::scale": GOOD_S, "w::extra": GOOD_S}, "unexpected entry 'w::extra'"),
        ({"w::q": GOOD_Q.astype(np.int32), "w::scale": GOOD_S}, "q must be I8"),
        ({"w::q": np.array([[-128, 0], [0, 0]], np.int8), "w::scale": GOOD_S}, "-128"),
        ({"w::q": GOOD_Q.reshape(-1), "w::scale": GOOD_S}, r"shape \[4\], expected \[2, 2\]"),
        ({"v::q": GOOD_Q, "v::scale": GOOD_S}, "missing tensors: 'w'"),
        (
            {"w::q": TOPK_Q, "w::scale": GOOD_S, "w::index": np.array([0, 4], np.int32)},
            "out of range",
        ),
        (
            {"w::q": TOPK_Q, "w::scale": GOOD_S, "w::index": np.array([-1, 2], np.int32)},
            "out of range",
        ),
        (
            {"w::q": TOPK_Q, "w::scale": GOOD_S, "w::index": np.array([2, 2], np.int32)},
            "strictly increasing",
        ),
        (
            {"w::q": TOPK_Q, "w::scale": GOOD_S, "w::index": np.array([3, 1], np.int32)},
            "strictly increasing",
        ),
        ({"w::q": TOPK_Q, "w::scale": GOOD_S, "w::index": np.array([1], np.int32)}, "1 indices for 2"),
        (
            {"w::q": TOPK_Q, "w::scale": GOOD_S, "w::index": np.array([0, 1], np.int64)},
            "not allowed on the wire",
        ),
    ],
)
def test_malformed_compressed_payloads_are_refused(entries: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(WeightError, match=message):
        decode_update(_payload(entries), expected={"w": (2, 2)}, max_bytes=MAX)


def test_a_compressed_payload_needs_the_model_shapes_and_a_sane_header() -> None:
    payload = _payload({"w::q": GOOD_Q, "w::scale": GOOD_S})
    with pytest.raises(WeightError, match="against the model's tensor shapes"):
        decode_update(payload, expected=None, max_bytes=MAX)
    torn = payload[:-3]
    with pytest.raises(WeightError, match="truncated"):
        decode_update(torn, expected={"w": (2, 2)}, max_bytes=MAX)
    n = struct.unpack("<Q", payload[:8])[0]
    with pytest.raises(WeightError, match="over the limit"):
        decode_update(payload, expected={"w": (2, 2)}, max_bytes=8 + n)
    ok = decode_update(payload, expected={"w": (2, 2)}, max_bytes=MAX)["w"]
    torch.testing.assert_close(ok, torch.tensor([[0.5, -1.0], [1.5, 2.0]]))
