"""Compressed updates: the difference to the global model as int8, optionally top-k sparsified.

A plan's ``compression`` section asks for it (the site may forbid modes: ``egress.forbid_compression``);
the egress gate compresses after its filters, so what is compressed is exactly what the site
would otherwise release. Only differences are compressed (the plan must send ``diff``): weights
themselves do not survive 8 bits, changes of a round do.

``int8``: each tensor's values are divided by a scale (per tensor, or per output channel along
dimension 0) so that the largest magnitude maps to 127, then rounded: to nearest
(``deterministic``: error at most half a scale step) or up or down with probability given by
the remainder (``stochastic``: unbiased, error below one step, seeded by the round so that a
rerun sends the same bytes). ``int8_topk``: of each tensor only the ``topk_fraction`` largest
magnitudes travel, quantised as above, with their flat indices; what is not sent (the small
values and every value's quantisation error) is kept at the site as a residual and added to
the next round's difference (error feedback), so that nothing is lost, only delayed.

On the wire it is still safetensors, with a handful of entries whatever the model's size (a
header entry per tensor would weigh more than the int8 values of a small model). The model's
tensors are taken in sorted-name order, each flattened, and concatenated:

    q              int8     the values sent, tensor after tensor
    scale          float32  the scales, tensor after tensor: 1 (per tensor) or C (per channel,
                            C = the tensor's first dimension) each
    scale_counts   int32    [n tensors] how many scales each tensor has (1 or C)
    mask           uint8    int8_topk only: one bit per value of the whole model (numpy's
                            packbits order), set where the value was sent; ``q`` holds the set
                            values in order

A bit mask costs an eighth of a byte per value, less than 4-byte indices as soon as more than
one value in 32 is sent. `decode_update` is the one reader for every update a coordinator
receives: it tells a compressed payload by its entry names (no model tensor is called ``q``
and ``scale_counts``), needs the model's names and shapes, and refuses malformed scales
(negative, not finite, a count that is neither 1 nor C), values (-128, too many or too few)
and masks (wrong length, bits past the model's end, a count that differs from the values).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from safetensors.numpy import save as st_save_numpy

from agent.errors import WeightError
from agent.exchange.codec import decode_weights, parse_header

Mode = Literal["int8", "int8_topk"]
ScaleMode = Literal["tensor", "channel"]
Rounding = Literal["deterministic", "stochastic"]

VALUES, SCALE, SCALE_COUNTS, MASK = "q", "scale", "scale_counts", "mask"
_ENTRIES = {VALUES: "I8", SCALE: "F32", SCALE_COUNTS: "I32", MASK: "U8"}
_DTYPES = {"I8": 1, "F32": 4, "I32": 4, "U8": 1, "F16": 2, "BF16": 2}
_QMAX = 127


@dataclass(frozen=True)
class Compression:
    """What a plan asks for (the plan's ``compression`` section, as the gate applies it)."""

    mode: Mode
    scale: ScaleMode = "channel"
    rounding: Rounding = "deterministic"
    topk_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.mode == "int8_topk":
            f = self.topk_fraction
            if f is None or not (0 < f <= 1):
                raise WeightError(f"int8_topk needs a topk_fraction in (0, 1], got {f!r}")
        elif self.topk_fraction is not None:
            raise WeightError("topk_fraction applies to int8_topk only")


def _channels(shape: tuple[int, ...], scale: ScaleMode) -> int:
    """How many scales a tensor of SHAPE gets: one per output channel, or one."""
    return shape[0] if scale == "channel" and len(shape) >= 2 and shape[0] > 0 else 1


def _scales(flat: np.ndarray, channels: int, keep: np.ndarray | None) -> np.ndarray:
    """Per-channel (or one) scale: the largest magnitude of the values sent, mapped to 127."""
    mags = np.abs(flat if keep is None else np.where(keep, flat, 0.0)).reshape(channels, -1)
    return (mags.max(axis=1) / _QMAX).astype(np.float32) if mags.size else np.zeros(channels, np.float32)


def _rng(seed_material: str, name: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed_material}\0{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _quantise(
    values: np.ndarray, scales: np.ndarray, rounding: Rounding, rng: np.random.Generator | None
) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(scales > 0, values / np.where(scales > 0, scales, 1.0), 0.0)
    if rounding == "stochastic":
        assert rng is not None
        ratio = np.floor(ratio + rng.random(ratio.shape))
    else:
        ratio = np.rint(ratio)
    return np.clip(ratio, -_QMAX, _QMAX).astype(np.int8)


def compress(
    diff: Mapping[str, torch.Tensor],
    spec: Compression,
    *,
    seed_material: str,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> tuple[bytes, dict[str, torch.Tensor] | None]:
    """DIFF (float tensors) as a compressed payload; for int8_topk also the new residual.

    RESIDUAL (int8_topk) is what earlier rounds did not send; it is added first. The returned
    residual is the part of (DIFF + RESIDUAL) that this payload does not carry: the sum of what
    was sent over the rounds plus the residual is always the sum of the differences.
    """
    if not diff:
        raise WeightError("no tensors to compress")
    values: list[np.ndarray] = []
    scales: list[np.ndarray] = []
    counts: list[int] = []
    masks: list[np.ndarray] = []
    new_residual: dict[str, torch.Tensor] | None = {} if spec.mode == "int8_topk" else None
    for name in sorted(diff):
        tensor = diff[name].detach().to(device="cpu", dtype=torch.float32)
        if not bool(torch.isfinite(tensor).all()):
            raise WeightError(f"tensor {name!r}: contains NaN or Inf values")
        shape = tuple(tensor.shape)
        acc = tensor.numpy().astype(np.float64).reshape(-1)
        if residual is not None and name in residual:
            acc = acc + residual[name].detach().to(torch.float64).numpy().reshape(-1)
        rng = _rng(seed_material, name) if spec.rounding == "stochastic" else None
        c = _channels(shape, spec.scale)
        per = acc.size // c
        keep: np.ndarray | None = None
        if spec.mode == "int8_topk":
            assert spec.topk_fraction is not None
            k = min(acc.size, max(1, math.ceil(spec.topk_fraction * acc.size))) if acc.size else 0
            # The k largest magnitudes; ties broken by index, so the choice is reproducible.
            chosen = np.lexsort((np.arange(acc.size), -np.abs(acc)))[:k]
            keep = np.zeros(acc.size, dtype=bool)
            keep[chosen] = True
            masks.append(keep)
        s = _scales(acc, c, keep)
        per_value = np.repeat(s.astype(np.float64), per) if per else np.zeros(0)
        if keep is None:
            values.append(_quantise(acc, per_value, spec.rounding, rng))
        else:
            q = _quantise(acc[keep], per_value[keep], spec.rounding, rng)
            values.append(q)
            sent = np.zeros(acc.size, dtype=np.float64)
            sent[keep] = q.astype(np.float64) * per_value[keep]
            assert new_residual is not None
            new_residual[name] = torch.from_numpy((acc - sent).astype(np.float32).reshape(shape))
        scales.append(s)
        counts.append(c)
    out: dict[str, np.ndarray] = {
        VALUES: np.concatenate(values).astype(np.int8),
        SCALE: np.concatenate(scales).astype("<f4"),
        SCALE_COUNTS: np.asarray(counts, dtype="<i4"),
    }
    if masks:
        out[MASK] = np.packbits(np.concatenate(masks))
    # One metadata key: safetensors writes the metadata map in no fixed order, and a rerun of a
    # round must send the same bytes.
    return st_save_numpy(out, metadata={"format": f"fedsite-{spec.mode}"}), new_residual


def error_bound(spec: Compression, scale_value: float) -> float:
    """The most one value sent with SCALE_VALUE can be off by (not counting what top-k kept back)."""
    return scale_value * (1.0 if spec.rounding == "stochastic" else 0.5)


def is_compressed(names: set[str] | list[str]) -> bool:
    """A compressed payload's entries: ``q``, ``scale``, ``scale_counts`` (and ``mask``)."""
    return {VALUES, SCALE, SCALE_COUNTS} <= set(names)


def decode_update(
    data: bytes, *, expected: Mapping[str, tuple[int, ...]] | None, max_bytes: int
) -> dict[str, torch.Tensor]:
    """Any update a site released: plain safetensors (`decode_weights`) or compressed.

    A compressed payload decodes to the dense float32 difference it stands for, and needs
    EXPECTED, the model's names and shapes (the payload carries values, not names).
    """
    header = parse_header(data, max_bytes=max_bytes, dtypes=_DTYPES)
    if not is_compressed(list(header)):
        return decode_weights(data, expected=expected, max_bytes=max_bytes)
    if expected is None:
        raise WeightError("a compressed update can only be decoded against the model's tensor shapes")
    unknown = sorted(set(header) - set(_ENTRIES))
    if unknown:
        raise WeightError(f"compressed update: unexpected entries {unknown}")
    for entry, info in header.items():
        if info["dtype"] != _ENTRIES[entry]:
            raise WeightError(f"compressed update: {entry} must be {_ENTRIES[entry]}, got {info['dtype']}")
        if len(info["shape"]) != 1:
            raise WeightError(
                f"compressed update: {entry} must be one-dimensional, got shape {info['shape']}"
            )
    begin = 8 + int.from_bytes(data[:8], "little")
    body = memoryview(bytes(data))[begin:]

    def array(entry: str, dtype: str) -> np.ndarray:
        lo, hi = header[entry]["data_offsets"]
        return np.frombuffer(body[lo:hi], dtype=dtype)

    names = sorted(expected)
    shapes = [tuple(expected[n]) for n in names]
    sizes = [math.prod(shape) for shape in shapes]
    total = sum(sizes)
    counts = array(SCALE_COUNTS, "<i4").astype(np.int64)
    if counts.size != len(names):
        raise WeightError(
            f"compressed update: scale_counts has {counts.size} entries for a model of {len(names)}"
        )
    for name, shape, count in zip(names, shapes, counts, strict=True):
        channels = _channels(shape, "channel")
        if count not in {1, channels}:
            raise WeightError(
                f"tensor {name!r}: {count} scale(s); expected 1 or {channels} (one per channel)"
            )
    scales = array(SCALE, "<f4").astype(np.float64)
    if scales.size != int(counts.sum()):
        raise WeightError(
            f"compressed update: {scales.size} scales, scale_counts adds up to {int(counts.sum())}"
        )
    if not (np.all(np.isfinite(scales)) and np.all(scales >= 0)):
        bad = int(np.argmax(~np.isfinite(scales) | (scales < 0)))
        owner = names[int(np.searchsorted(np.cumsum(counts), bad, side="right"))]
        raise WeightError(f"tensor {owner!r}: scales must be finite and not negative")
    q = array(VALUES, "i1").astype(np.float64)
    if np.any(q < -_QMAX):
        raise WeightError("compressed update: int8 value -128 is outside the range sent (-127..127)")
    if MASK in header:
        packed = array(MASK, "u1")
        if packed.size != (total + 7) // 8:
            raise WeightError(
                f"compressed update: mask has {packed.size} bytes; {total} values need {(total + 7) // 8}"
            )
        bits = np.unpackbits(packed)
        if bits[total:].any():
            raise WeightError("compressed update: mask has bits set past the model's last value")
        keep = bits[:total].astype(bool)
        if int(keep.sum()) != q.size:
            raise WeightError(f"compressed update: mask marks {int(keep.sum())} values, {q.size} were sent")
        dense_q = np.zeros(total, dtype=np.float64)
        dense_q[keep] = q
    else:
        if q.size != total:
            raise WeightError(f"compressed update: {q.size} int8 values for a model of {total}")
        dense_q = q
    out: dict[str, torch.Tensor] = {}
    at, at_scale = 0, 0
    for name, shape, size, count in zip(names, shapes, sizes, counts, strict=True):
        s = scales[at_scale : at_scale + count]
        per_value = np.repeat(s, size // count) if size else np.zeros(0)
        out[name] = torch.from_numpy((dense_q[at : at + size] * per_value).astype(np.float32).reshape(shape))
        at += size
        at_scale += int(count)
    return out
