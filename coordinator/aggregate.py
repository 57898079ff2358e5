"""Weighted averaging of model updates (FedAvg) and applying an update to the global model.

Sites send either their full local weights or the difference to the global weights they
started from. With weights w_k and sample counts n_k the new global model is
sum(n_k * w_k) / sum(n_k); with diffs d_k = w_k - g it is g + sum(n_k * d_k) / sum(n_k),
which is the same model up to float rounding. Sums are taken in float64 and over the sites
sorted by name, so that the order in which sites answered cannot change a bit of the result
(float addition is not associative, not even in float64).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from coordinator.errors import AggregationError

UpdateKind = Literal["weights", "diff"]


@dataclass(frozen=True)
class SiteUpdate:
    site: str
    tensors: Mapping[str, torch.Tensor]
    num_samples: int


def _check_same_keys(reference: Mapping[str, torch.Tensor], update: SiteUpdate, ref_name: str) -> None:
    missing = sorted(set(reference) - set(update.tensors))
    extra = sorted(set(update.tensors) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:5])}")
        raise AggregationError(f"{update.site}: update does not match {ref_name}: {'; '.join(parts)}")
    for name, ref in reference.items():
        got = update.tensors[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise AggregationError(
                f"{update.site}: tensor {name!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise AggregationError(f"{update.site}: tensor {name!r} holds NaN or infinite values")


def weighted_mean(updates: Sequence[SiteUpdate]) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of the sites' tensors, in the dtype of the first site by name."""
    if not updates:
        raise AggregationError("no updates to aggregate")
    updates = sorted(updates, key=lambda u: u.site)
    for u in updates:
        if u.num_samples <= 0:
            raise AggregationError(
                f"{u.site}: reported {u.num_samples} training samples; cannot weight its update"
            )
    first = updates[0]
    for u in updates[1:]:
        _check_same_keys(first.tensors, u, f"the update of {first.site}")
    _check_same_keys(first.tensors, first, "itself")
    total = float(sum(u.num_samples for u in updates))
    out: dict[str, torch.Tensor] = {}
    for name, ref in first.tensors.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for u in updates:
            acc += u.tensors[name].detach().to(torch.float64) * (u.num_samples / total)
        if ref.is_floating_point():
            out[name] = acc.to(ref.dtype)
        else:
            # Counters such as BatchNorm's num_batches_tracked: round the mean back to integers.
            out[name] = torch.round(acc).to(ref.dtype)
    return out


def apply_update(
    global_weights: Mapping[str, torch.Tensor] | None, update: Mapping[str, torch.Tensor], kind: UpdateKind
) -> dict[str, torch.Tensor]:
    """The model that an (aggregated) update describes: itself for weights, global + diff for diffs."""
    if kind == "weights":
        return {k: v.detach().clone() for k, v in update.items()}
    if global_weights is None:
        raise AggregationError("a diff update needs the global weights it was computed against")
    probe = SiteUpdate("aggregate", update, 1)
    _check_same_keys(global_weights, probe, "the global model")
    out: dict[str, torch.Tensor] = {}
    for name, g in global_weights.items():
        total = g.detach().to(torch.float64) + update[name].detach().to(torch.float64)
        out[name] = total.to(g.dtype) if g.is_floating_point() else torch.round(total).to(g.dtype)
    return out


def pseudo_gradient(
    global_weights: Mapping[str, torch.Tensor], new_weights: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """NEW_WEIGHTS - GLOBAL_WEIGHTS per tensor, in float64: the change a server optimiser steps along."""
    probe = SiteUpdate("new model", new_weights, 1)
    _check_same_keys(global_weights, probe, "the global model")
    return {
        name: new_weights[name].detach().to(torch.float64) - g.detach().to(torch.float64)
        for name, g in global_weights.items()
    }


def fedavg(
    global_weights: Mapping[str, torch.Tensor] | None, updates: Sequence[SiteUpdate], kind: UpdateKind
) -> dict[str, torch.Tensor]:
    """One FedAvg step: the new global model from the sites' updates."""
    return apply_update(global_weights, weighted_mean(updates), kind)
