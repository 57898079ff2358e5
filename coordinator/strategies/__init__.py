"""The ways of collaborating, by the name that `--strategy` and results.json's `strategy` use.

One module per strategy, each a `Strategy` subclass (see base.py for what a strategy decides).
Adding a strategy is one new module beside these and one entry in `STRATEGIES`.
"""

from __future__ import annotations

from coordinator.strategies.base import Strategy
from coordinator.strategies.ciil import CIIL
from coordinator.strategies.fedadam import FedAdam
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.fedavgm import FedAvgM
from coordinator.strategies.fednova import FedNova
from coordinator.strategies.fedyogi import FedYogi
from coordinator.strategies.iil import IIL
from coordinator.strategies.secure_fedavg import SecureFedAvg

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fednova": FedNova,
    "iil": IIL,
    "ciil": CIIL,
    "secure_fedavg": SecureFedAvg,
}

__all__ = ["STRATEGIES"]
