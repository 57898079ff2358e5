"""FedAvg's weighted mean for the ServerApp, with numpy only, bit for bit as `fedsite coordinate`.

Flower's own FedAvg (`flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`) adds the
sites' arrays in the order their replies arrived, in the arrays' own dtype. Float addition is
not associative, so two runs of one seed could release different models when sites answered
in another order, and float16 transfers were averaged in float16. This mean is the
coordinator's (`coordinator.aggregate.weighted_mean`): sites sorted by name, each array taken
to float64 and weighted by its share of the samples, the sum cast back to float32 (the agents'
model dtype, which the coordinator decodes every transfer dtype to). A run under Flower then
releases the very model that `fedsite coordinate` releases from the same sites, plan and seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


class AggregationError(ValueError):
    """Updates that cannot be averaged; the message names the site and the tensor."""


@dataclass(frozen=True)
class SiteArrays:
    site: str
    arrays: Mapping[str, np.ndarray]
    num_samples: int


def _check(update: SiteArrays, reference: SiteArrays) -> None:
    if update.num_samples <= 0:
        raise AggregationError(
            f"{update.site}: reported {update.num_samples} training samples; cannot weight its update"
        )
    missing = sorted(set(reference.arrays) - set(update.arrays))
    extra = sorted(set(update.arrays) - set(reference.arrays))
    if missing or extra:
        parts = [f"missing {', '.join(missing[:5])}"] if missing else []
        parts += [f"unexpected {', '.join(extra[:5])}"] if extra else []
        raise AggregationError(f"{update.site}: arrays differ from {reference.site}'s: {'; '.join(parts)}")
    for name, ref in reference.arrays.items():
        got = np.asarray(update.arrays[name])
        want = np.asarray(ref).shape
        if got.shape != want:
            raise AggregationError(
                f"{update.site}: tensor {name!r} has shape {got.shape}, {reference.site}'s {want}"
            )
        if not np.issubdtype(got.dtype, np.floating) or not bool(np.isfinite(got).all()):
            raise AggregationError(
                f"{update.site}: tensor {name!r} is not finite floating point ({got.dtype})"
            )


def weighted_mean(updates: Sequence[SiteArrays]) -> dict[str, np.ndarray]:
    """The sample-weighted mean of the sites' arrays, float32, whatever order UPDATES come in."""
    if not updates:
        raise AggregationError("no updates to aggregate")
    ordered = sorted(updates, key=lambda u: u.site)
    if len({u.site for u in ordered}) != len(ordered):
        raise AggregationError(f"two updates from one site: {[u.site for u in ordered]}")
    first = ordered[0]
    for update in ordered:
        _check(update, first)
    total = float(sum(u.num_samples for u in ordered))
    out: dict[str, np.ndarray] = {}
    for name in first.arrays:
        acc = np.zeros(np.asarray(first.arrays[name]).shape, dtype=np.float64)
        for update in ordered:
            acc += np.asarray(update.arrays[name]).astype(np.float64) * (update.num_samples / total)
        out[name] = acc.astype(np.float32)
    return out
