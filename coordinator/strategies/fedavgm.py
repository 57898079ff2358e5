"""FedAvgM: FedAvg with server momentum (Hsu et al. 2019).

``m <- beta * m + delta``, ``g <- g + server_lr * m``. With beta 0 and server_lr 1 it is FedAvg.
Momentum carries the direction of earlier rounds through the rounds where the sites' changes
disagree (unequal data at the sites), which is where plain averaging stalls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from coordinator.options import RunOptions
from coordinator.strategies.fedopt import FedOpt


class FedAvgM(FedOpt):
    title = "FedAvgM"
    default_server_lr = 1.0

    def __init__(self, options: RunOptions, sites: Sequence[str]) -> None:
        super().__init__(options, sites)
        self.momentum = options.server_momentum
        if not 0 <= self.momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), not {self.momentum}")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "server_momentum": self.momentum}

    def server_step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        state = self.state.setdefault(name, {"m": torch.zeros_like(delta)})
        state["m"] = self.momentum * state["m"] + delta
        return self.server_lr * state["m"]
