"""FedNova: FedAvg with each site's change normalised by its number of local steps (Wang et al. 2020).

With a number of local *epochs* per round, a site takes optimiser steps in proportion to its
size, so the sample-weighted mean of the changes weights each site's objective by about the
square of its size ("objective inconsistency"). FedNova divides each site's change by the
steps it took, averages these per-step changes with the sample weights ``p_k``, and scales the
mean back by the effective number of steps ``tau_eff = sum_k p_k tau_k``:
``g <- g + tau_eff * sum_k p_k (w_k - g) / tau_k``. With equal steps at every site it is FedAvg.

The steps come from each site's round metrics (``steps``, which the agent reports). Wang et
al. derive the normalisation for local SGD; with a local Adam it is the same first-order
correction, not an exact one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from coordinator.aggregate import SiteUpdate, UpdateKind, apply_update, pseudo_gradient, weighted_mean
from coordinator.errors import AggregationError
from coordinator.strategies.base import SiteResult
from coordinator.strategies.fedavg import FedAvg


def local_steps(result: SiteResult) -> float:
    """The optimiser steps RESULT's site took, from its metrics; refused when missing or not positive."""
    steps = result.metrics.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int | float) or not steps > 0:
        raise AggregationError(
            f"{result.site}: its round metrics give no positive 'steps' ({steps!r}); "
            "FedNova needs the number of local steps of every site"
        )
    return float(steps)


class FedNova(FedAvg):
    title = "FedNova"

    def aggregate_train(
        self, global_weights: dict[str, torch.Tensor], results: Sequence[SiteResult], kind: UpdateKind
    ) -> dict[str, torch.Tensor]:
        ordered = sorted(results, key=lambda r: r.site)
        steps = {r.site: local_steps(r) for r in ordered}
        total = float(sum(r.num_samples for r in ordered))
        if not total > 0:
            raise AggregationError("no training samples in this round's updates")
        tau_eff = sum(r.num_samples / total * steps[r.site] for r in ordered)
        # Each site's change per step; the weighted mean of these is FedNova's direction.
        per_step: list[SiteUpdate] = []
        for r in ordered:
            delta = pseudo_gradient(global_weights, apply_update(global_weights, r.tensors, kind))
            per_step.append(
                SiteUpdate(r.site, {k: d / steps[r.site] for k, d in delta.items()}, r.num_samples)
            )
        direction = weighted_mean(per_step)
        # Integer counters (batch norm's) take FedAvg's mean: computed for them alone, not for
        # the whole model a second time.
        ints = [n for n, g in global_weights.items() if not g.is_floating_point()]
        counters: dict[str, torch.Tensor] = {}
        if ints:
            means = weighted_mean(
                [SiteUpdate(r.site, {n: r.tensors[n] for n in ints}, r.num_samples) for r in ordered]
            )
            counters = apply_update({n: global_weights[n] for n in ints}, means, kind)
        out: dict[str, torch.Tensor] = {}
        for name, g in global_weights.items():
            if not g.is_floating_point():
                out[name] = counters[name]
                continue
            moved = g.detach().to(torch.float64) + tau_eff * direction[name].to(torch.float64)
            out[name] = moved.to(g.dtype)
        return out
