"""FedOpt: FedAvg's round with a server optimiser in place of plain averaging (Reddi et al. 2021).

"Adaptive Federated Optimization" treats the sample-weighted mean of the sites' changes,
``delta = mean_k(w_k) - g``, as a pseudo-gradient and lets an optimiser on the coordinator take
the step: ``g <- g + step(delta)``. Plain FedAvg is the step ``delta`` itself. The variants
differ only in that step, so each overrides `server_step` alone (fedavgm.py, fedadam.py,
fedyogi.py); the optimiser's state (momentum, second moments) lives in the strategy object for
the length of one run and is never sent anywhere.

Integer tensors (batch norm's ``num_batches_tracked``) are counters, not parameters: they take
the plain weighted mean, as in FedAvg. The sums are taken over the sites sorted by name
(`coordinator.aggregate.weighted_mean`), so the order in which sites answered cannot change a
bit of the result.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from coordinator.aggregate import SiteUpdate, UpdateKind, apply_update, pseudo_gradient, weighted_mean
from coordinator.options import RunOptions
from coordinator.strategies.base import SiteResult
from coordinator.strategies.fedavg import FedAvg


class FedOpt(FedAvg):
    """FedAvg's rounds; the new global model is one server-optimiser step along the mean change."""

    # The server learning rate when the run gives none (`RunOptions.server_lr`).
    default_server_lr: ClassVar[float]

    def __init__(self, options: RunOptions, sites: Sequence[str]) -> None:
        super().__init__(options, sites)
        self.server_lr = options.server_lr if options.server_lr is not None else self.default_server_lr
        if not self.server_lr > 0:
            raise ValueError(f"server_lr must be positive, not {self.server_lr}")
        # Optimiser state per tensor name, in float64 like the sums.
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def settings(self) -> dict[str, Any]:
        """What results.json records of the optimiser (its name is the run's strategy)."""
        return {"server_lr": self.server_lr}

    @abstractmethod
    def server_step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """The change to global tensor NAME for pseudo-gradient DELTA (float64), updating the state."""

    def aggregate_train(
        self, global_weights: dict[str, torch.Tensor], results: Sequence[SiteResult], kind: UpdateKind
    ) -> dict[str, torch.Tensor]:
        mean = weighted_mean([SiteUpdate(r.site, r.tensors, r.num_samples) for r in results])
        averaged = apply_update(global_weights, mean, kind)
        delta = pseudo_gradient(global_weights, averaged)
        out: dict[str, torch.Tensor] = {}
        for name, g in global_weights.items():
            if not g.is_floating_point():
                out[name] = averaged[name]
                continue
            step = self.server_step(name, delta[name])
            out[name] = (g.detach().to(torch.float64) + step).to(g.dtype)
        return out
