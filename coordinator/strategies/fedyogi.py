"""FedYogi: FedAdam with Yogi's second moment (Reddi et al. 2021; Zaheer et al. 2018).

``v <- v - (1 - b2) delta^2 sign(v - delta^2)``: ``v`` moves towards ``delta^2`` by an additive
amount instead of a multiplicative one, so a coordinate whose changes suddenly grow does not
have its step cut as sharply as under Adam. Everything else is FedAdam's.
"""

from __future__ import annotations

import torch

from coordinator.strategies.fedadam import FedAdam


class FedYogi(FedAdam):
    title = "FedYogi"

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        squared = delta.square()
        return v - (1 - self.beta2) * squared * torch.sign(v - squared)
