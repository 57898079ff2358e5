"""What one coordinated run is asked to do: the strategy by name, its rounds and the evaluations.

The options live apart from the runner so that the strategies (which read their share of them)
and the runner (which reads the rest) both import them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class RunOptions:
    # A name from coordinator.strategies.STRATEGIES (the CLI's --strategy).
    strategy: str = "fedavg"
    # FedAvg: rounds; CIIL: cycles; IIL: ignored (one pass over the sites).
    rounds: int = 1
    # IIL / CIIL visiting order (site names); default: the federation file's order.
    order: list[str] | None = None
    # IIL: epochs without improvement of the site's validation Dice before it passes the model on.
    patience: int = 8
    # IIL: upper bound on epochs at one site.
    max_epochs: int = 50
    # Evaluate the global model at every site after every round (the study's metric).
    evaluate: bool = True
    # With per-round evaluation off, still evaluate the final model at every site.
    evaluate_final: bool = True
    # CIIL: also evaluate after every visit, not only after every cycle.
    evaluate_every_visit: bool = False
    # Keep each site's downloaded update under OUT/updates/ (for audits and tests).
    keep_updates: bool = False
    # Sites outside the federation (federation file's `outside`): evaluate the final model,
    # the model of every round, or never.
    evaluate_outside: Literal["final", "every", "never"] = "final"
    # FedAvg round r / CIIL cycle r runs with seed `plan seed + r - 1`. Every job is one
    # engine run whose sampling is seeded by (seed, epoch), so with one seed every round
    # draws the same slices and augmentations at a site, where pooled training draws new
    # ones every epoch. Off by default: the seed is part of the plan hash, and a site
    # approving plans by hand approves one plan per seed.
    reseed_rounds: bool = False
    run_id: str | None = None
    # Server optimisers (fedavgm, fedadam, fedyogi): the step size on the mean change; None takes
    # the strategy's default (1.0 for FedAvgM, 1e-2 for FedAdam and FedYogi).
    server_lr: float | None = None
    # FedAvgM's momentum.
    server_momentum: float = 0.9
    # FedAdam / FedYogi: first- and second-moment decay and the adaptivity floor tau.
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
