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

On the wire it is still safetensors, one group of entries per model tensor NAME::

    NAME::q       int8     the tensor's shape (int8), or [k] (int8_topk)
    NAME::scale   float32  [1] (per tensor) or [C] (per channel, C = the tensor's first dimension)
    NAME::index   int32    [k], int8_topk only: strictly increasing flat indices into the tensor

`decode_update` is the one reader for every update a coordinator receives: it tells a
compressed payload by its ``::`` names (model tensor names never hold one) and refuses
malformed scales (negative, not finite, wrong length) and indices (out of range, repeated,
unordered, more than the tensor holds) with a WeightError that names the tensor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from safetensors.numpy import save as st_save_numpy

from agent.errors import WeightError
from agent.exchange.codec import check_names_and_shapes, decode_weights, parse_header

Mode = Literal["int8", "int8_topk"]
ScaleMode = Literal["tensor", "channel"]
Rounding = Literal["deterministic", "stochastic"]

SEP = "::"
VALUES, SCALE, INDEX = "q", "scale", "index"
_DTYPES = {"I8": 1, "F32": 4, "I32": 4, "F16": 2, "BF16": 2}
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


def _scales(
    flat: np.ndarray, shape: tuple[int, ...], scale: ScaleMode, keep: np.ndarray | None
) -> np.ndarray:
    """Per-channel (or one) scale: the largest magnitude of the values sent, mapped to 127."""
    c = _channels(shape, scale)
    mags = np.abs(flat if keep is None else np.where(keep, flat, 0.0)).reshape(c, -1)
    return (mags.max(axis=1) / _QMAX).astype(np.float32) if mags.size else np.zeros(c, np.float32)


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
    out: dict[str, np.ndarray] = {}
    new_residual: dict[str, torch.Tensor] | None = {} if spec.mode == "int8_topk" else None
    for name in sorted(diff):
        if SEP in name:
            raise WeightError(f"tensor {name!r}: a model tensor name may not contain {SEP!r}")
        tensor = diff[name].detach().to(device="cpu", dtype=torch.float32)
        if not bool(torch.isfinite(tensor).all()):
            raise WeightError(f"tensor {name!r}: contains NaN or Inf values")
        shape = tuple(tensor.shape)
        acc = tensor.numpy().astype(np.float64).reshape(-1)
        if residual is not None and name in residual:
            acc = acc + residual[name].detach().to(torch.float64).numpy().reshape(-1)
        rng = _rng(seed_material, name) if spec.rounding == "stochastic" else None
        c = _channels(shape, spec.scale)
        if spec.mode == "int8":
            scales = _scales(acc, shape, spec.scale, None)
            q = _quantise(acc.reshape(c, -1), scales[:, None], spec.rounding, rng).reshape(shape)
            out[f"{name}{SEP}{VALUES}"] = q
        else:
            assert spec.topk_fraction is not None and new_residual is not None
            k = min(acc.size, max(1, math.ceil(spec.topk_fraction * acc.size))) if acc.size else 0
            # The k largest magnitudes; ties broken by index, so the choice is reproducible.
            order = np.lexsort((np.arange(acc.size), -np.abs(acc)))[:k]
            index = np.sort(order).astype(np.int32)
            keep = np.zeros(acc.size, dtype=bool)
            keep[index] = True
            scales = _scales(acc, shape, spec.scale, keep)
            per = acc.size // c if c else 0
            channel_scale = scales[index // per] if per else scales[:0]
            q = _quantise(acc[index], channel_scale, spec.rounding, rng)
            sent = np.zeros(acc.size, dtype=np.float64)
            sent[index] = q.astype(np.float64) * channel_scale
            new_residual[name] = torch.from_numpy((acc - sent).astype(np.float32).reshape(shape))
            out[f"{name}{SEP}{VALUES}"] = q
            out[f"{name}{SEP}{INDEX}"] = index
        out[f"{name}{SEP}{SCALE}"] = scales.astype(np.float32)
    # One metadata key: safetensors writes the metadata map in no fixed order, and a rerun of a
    # round must send the same bytes. (np.array keeps 0-d tensors 0-d; ascontiguousarray would not.)
    meta = {"format": f"fedsite-{spec.mode}"}
    return st_save_numpy({k: np.array(v, order="C") for k, v in out.items()}, metadata=meta), new_residual


def error_bound(spec: Compression, scale_value: float) -> float:
    """The most one value sent with SCALE_VALUE can be off by (not counting what top-k kept back)."""
    return scale_value * (1.0 if spec.rounding == "stochastic" else 0.5)


def is_compressed(names: set[str] | list[str]) -> bool:
    return any(SEP in n for n in names)


def decode_update(
    data: bytes, *, expected: Mapping[str, tuple[int, ...]] | None, max_bytes: int
) -> dict[str, torch.Tensor]:
    """Any update a site released: plain safetensors (`decode_weights`) or compressed.

    A compressed payload decodes to the dense float32 difference it stands for, and needs
    EXPECTED (the model's names and shapes: a top-k entry does not carry its tensor's shape).
    """
    header = parse_header(data, max_bytes=max_bytes, dtypes=_DTYPES)
    if not is_compressed(list(header)):
        return decode_weights(data, expected=expected, max_bytes=max_bytes)
    if expected is None:
        raise WeightError("a compressed update can only be decoded against the model's tensor shapes")
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for entry, info in header.items():
        name, sep, part = entry.rpartition(SEP)
        if not sep or part not in (VALUES, SCALE, INDEX) or SEP in name:
            raise WeightError(f"compressed update: unexpected entry {entry!r}")
        groups.setdefault(name, {})[part] = info
    # Names first (missing, unknown); the shapes are the model's, checked per entry below.
    check_names_and_shapes({n: tuple(expected.get(n, ())) for n in groups}, expected)
    begin = 8 + int.from_bytes(data[:8], "little")
    body = memoryview(bytes(data))[begin:]

    def array(info: dict[str, Any], dtype: str) -> np.ndarray:
        lo, hi = info["data_offsets"]
        return np.frombuffer(body[lo:hi], dtype=dtype)

    out: dict[str, torch.Tensor] = {}
    for name, parts in sorted(groups.items()):
        shape = tuple(expected[name])
        size = math.prod(shape)
        for part, dtype in ((VALUES, "I8"), (SCALE, "F32")):
            if part not in parts:
                raise WeightError(f"tensor {name!r}: compressed entry {name}{SEP}{part} is missing")
            if parts[part]["dtype"] != dtype:
                raise WeightError(f"tensor {name!r}: {part} must be {dtype}, got {parts[part]['dtype']}")
        scales = array(parts[SCALE], "<f4").astype(np.float64)
        c_tensor, c_channel = 1, _channels(shape, "channel")
        if scales.size not in {c_tensor, c_channel}:
            raise WeightError(
                f"tensor {name!r}: {scales.size} scale(s); expected 1 or {c_channel} (one per channel)"
            )
        if not (np.all(np.isfinite(scales)) and np.all(scales >= 0)):
            raise WeightError(f"tensor {name!r}: scales must be finite and not negative")
        q = array(parts[VALUES], "i1").astype(np.float64)
        if np.any(q < -_QMAX):
            raise WeightError(f"tensor {name!r}: int8 value -128 is outside the range sent (-127..127)")
        per = size // scales.size if scales.size else 0
        if INDEX in parts:
            if parts[INDEX]["dtype"] != "I32":
                raise WeightError(f"tensor {name!r}: index must be I32, got {parts[INDEX]['dtype']}")
            index = array(parts[INDEX], "<i4").astype(np.int64)
            if index.size != q.size:
                raise WeightError(f"tensor {name!r}: {index.size} indices for {q.size} values")
            if index.size > size or (index.size and (index[0] < 0 or index[-1] >= size)):
                raise WeightError(f"tensor {name!r}: indices out of range for {size} values")
            if index.size > 1 and not np.all(np.diff(index) > 0):
                raise WeightError(f"tensor {name!r}: indices must be strictly increasing (no repeats)")
            dense = np.zeros(size, dtype=np.float64)
            dense[index] = q * scales[index // per] if per else 0.0
        else:
            got = list(parts[VALUES]["shape"])
            if got != list(shape):
                raise WeightError(f"tensor {name!r}: int8 values have shape {got}, expected {list(shape)}")
            dense = (q.reshape(scales.size, -1) * scales[:, None]).reshape(-1) if size else q
        out[name] = torch.from_numpy(dense.astype(np.float32).reshape(shape))
    return out
