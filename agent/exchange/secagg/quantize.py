"""From a float model update to integers modulo 2^32 and back: what secure aggregation sums.

Masks cancel only in exact modular arithmetic, so each site sends integers. Site u clips its
update d_u (the difference to the round's global weights) elementwise to [-clip, clip],
multiplies by its integer weight w_u (its number of training samples, at most ``max_weight``)
and by ``scale``, rounds to the nearest integer and reduces modulo 2^32. One more element is
appended: w_u itself, so that the total weight W is summed under the masks as well and no
site's sample count is revealed on its own.

The scale is chosen so that the sum of n sites can never wrap around the signed 32-bit range:
each element of a site is at most ``max_weight * clip * scale + 0.5`` in magnitude, so with
``scale = (2^31 - 1 - n) / (n * max_weight * clip)`` the sum of n of them stays below 2^31 - 1
and decodes exactly as a signed int32. The decoded mean differs from the exact weighted mean of
the clipped updates by at most n * 0.5 / (scale * W) per element (each site's rounding is at
most a half) — `error_bound`. Values beyond the clip range are counted, never clipped silently.

Vectors are the plan model's exchanged tensors, flattened in sorted-name order, float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from agent.errors import SecAggError

MODULUS = 1 << 32
_INT31 = (1 << 31) - 1
MAX_SITES = 10_000


@dataclass(frozen=True)
class QuantParams:
    """What every site and the coordinator of one round must agree on to code the sum.

    n_sites is the number of sites that may contribute (the round's advertised sites); clip
    bounds each update element; max_weight bounds each site's integer weight.
    """

    n_sites: int
    clip: float
    max_weight: int

    def __post_init__(self) -> None:
        if not isinstance(self.n_sites, int) or not (1 <= self.n_sites <= MAX_SITES):
            raise SecAggError(f"n_sites must be an integer in 1..{MAX_SITES}, got {self.n_sites!r}")
        if not isinstance(self.max_weight, int) or self.max_weight < 1:
            raise SecAggError(f"max_weight must be a positive integer, got {self.max_weight!r}")
        if not (isinstance(self.clip, int | float) and math.isfinite(self.clip) and self.clip > 0):
            raise SecAggError(f"clip must be a positive finite number, got {self.clip!r}")
        # The weight element's sum must fit too; at 2^30 a site of weight 1 keeps only about
        # two integer steps per clip range.
        if self.n_sites * self.max_weight > _INT31 // 2:
            raise SecAggError(
                f"n_sites * max_weight = {self.n_sites * self.max_weight} is too large for 32-bit sums"
            )

    @property
    def scale(self) -> float:
        """Integer units per unit of (weight x update); see the module docstring."""
        return scale_for(self.n_sites, self.max_weight, self.clip)


def scale_for(n_sites: int, max_weight: int, clip: float) -> float:
    """(2^31 - 1 - n) / (n * max_weight * clip): the largest scale whose n-site sum cannot wrap."""
    return (_INT31 - n_sites) / (n_sites * max_weight * float(clip))


def error_bound(n_sites: int, max_weight: int, clip: float, total_weight: int) -> float:
    """Largest possible |decoded mean - exact weighted mean of the clipped updates| per element.

    n_sites * 0.5 / (scale * total_weight): every contributing site rounds each element once,
    by at most a half unit. Computed in float64 exactly as `dequantize_sum` decodes; add the
    float32 rounding of wherever the caller stores the result (about |value| * 2^-24).
    """
    if total_weight < 1:
        raise SecAggError(f"total weight must be positive, got {total_weight}")
    return n_sites * 0.5 / (scale_for(n_sites, max_weight, clip) * total_weight)


def flatten(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The tensors of STATE as one float32 vector, in sorted-name order."""
    if not state:
        raise SecAggError("no tensors to flatten")
    parts = [
        state[name].detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy()
        for name in sorted(state)
    ]
    return np.concatenate(parts).astype(np.float32, copy=False)


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Inverse of `flatten` for the given {name: shape}; refuses a vector of the wrong length."""
    total = sum(math.prod(shape) for shape in shapes.values())
    if vector.ndim != 1 or vector.shape[0] != total:
        raise SecAggError(f"vector of {vector.shape} elements does not fit the model's {total} values")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name in sorted(shapes):
        size = math.prod(shapes[name])
        chunk = np.ascontiguousarray(vector[offset : offset + size], dtype=np.float32)
        out[name] = torch.from_numpy(chunk.copy()).reshape(shapes[name])
        offset += size
    return out


@dataclass(frozen=True)
class Quantised:
    """A site's integer vector (update elements, then its weight) and how many elements it clipped."""

    vector: np.ndarray  # uint32, length = update length + 1
    clipped: int


def quantize(update: np.ndarray, weight: int, params: QuantParams) -> Quantised:
    """round(weight * clamp(update, -clip, clip) * scale) mod 2^32, then the weight itself."""
    if not isinstance(weight, int) or isinstance(weight, bool) or not (1 <= weight <= params.max_weight):
        raise SecAggError(f"site weight {weight!r} is not an integer in 1..max_weight ({params.max_weight})")
    values = np.asarray(update)
    if values.ndim != 1 or values.size == 0:
        raise SecAggError(f"update must be a non-empty 1-D vector, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.floating):
        raise SecAggError(f"update must be floating point, got {values.dtype}")
    if not np.isfinite(values).all():
        raise SecAggError("update contains NaN or Inf values")
    v64 = values.astype(np.float64)
    clipped = int(np.count_nonzero(np.abs(v64) > params.clip))
    np.clip(v64, -params.clip, params.clip, out=v64)
    v64 *= weight * params.scale
    ints = np.rint(v64).astype(np.int64)
    out = np.empty(values.shape[0] + 1, dtype=np.uint32)
    out[:-1] = ints.astype(np.int32).view(np.uint32)  # |ints| < 2^31; two's complement = mod 2^32
    out[-1] = weight
    return Quantised(out, clipped)


@dataclass(frozen=True)
class Decoded:
    """The weighted mean of the contributing sites' clipped updates, and their total weight."""

    mean: np.ndarray  # float64
    total_weight: int


def dequantize_sum(summed: np.ndarray, params: QuantParams) -> Decoded:
    """Decode the unmasked sum (uint32, update elements then total weight) into the weighted mean."""
    arr = np.asarray(summed)
    if arr.dtype != np.uint32 or arr.ndim != 1 or arr.shape[0] < 2:
        raise SecAggError(
            f"a summed vector is 1-D uint32 of at least 2 elements, got {arr.dtype} {arr.shape}"
        )
    total_weight = int(arr[-1])
    if not (1 <= total_weight <= params.n_sites * params.max_weight):
        raise SecAggError(
            f"decoded total weight {total_weight} is outside 1..{params.n_sites * params.max_weight}: "
            "the sum is not of this round's sites (masks did not cancel)"
        )
    signed = arr[:-1].view(np.int32).astype(np.float64)
    return Decoded(signed / (params.scale * total_weight), total_weight)
