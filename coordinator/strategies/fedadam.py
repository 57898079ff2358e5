"""FedAdam: Adam on the coordinator, over the mean change of each round (Reddi et al. 2021, Alg. 2).

``m <- b1 m + (1 - b1) delta``; ``v <- b2 v + (1 - b2) delta^2``;
``g <- g + server_lr * m / (sqrt(v) + tau)``. As in the paper there is no bias correction and
``v`` starts at ``tau^2``; ``tau`` bounds how far one coordinate can move when its changes are tiny.
FedYogi (fedyogi.py) differs only in how ``v`` follows ``delta^2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from coordinator.options import RunOptions
from coordinator.strategies.fedopt import FedOpt


class FedAdam(FedOpt):
    title = "FedAdam"
    default_server_lr = 1e-2

    def __init__(self, options: RunOptions, sites: Sequence[str]) -> None:
        super().__init__(options, sites)
        self.beta1, self.beta2, self.tau = options.server_beta1, options.server_beta2, options.server_tau
        for key, value in (("server_beta1", self.beta1), ("server_beta2", self.beta2)):
            if not 0 <= value < 1:
                raise ValueError(f"{key} must be in [0, 1), not {value}")
        if not self.tau > 0:
            raise ValueError(f"server_tau must be positive, not {self.tau}")

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "server_beta1": self.beta1,
            "server_beta2": self.beta2,
            "server_tau": self.tau,
        }

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Adam's ``v``: an exponential moving average of ``delta^2``."""
        return self.beta2 * v + (1 - self.beta2) * delta.square()

    def server_step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        state = self.state.setdefault(
            name, {"m": torch.zeros_like(delta), "v": torch.full_like(delta, self.tau**2)}
        )
        state["m"] = self.beta1 * state["m"] + (1 - self.beta1) * delta
        state["v"] = self.second_moment(state["v"], delta)
        return self.server_lr * state["m"] / (state["v"].sqrt() + self.tau)
