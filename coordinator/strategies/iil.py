"""IIL (institutional incremental learning): the model visits each site once, in order.

Each site trains until its own validation Dice has not improved for `patience` epochs (at most
`max_epochs`) and passes on its best model. Every visit is a round of its own, evaluated and
recorded as "visit <n> (<site>)". The travelling model is CIIL's; this variant changes only
the schedule (one visit per round, one pass), the labels and the plan (early stopping, no
reseeding).
"""

from __future__ import annotations

import copy
from typing import Any

from coordinator.strategies.base import Job
from coordinator.strategies.ciil import CIIL


class IIL(CIIL):
    title = "IIL"
    round_label = "visit"
    lease_expiry = "fail"

    def num_rounds(self) -> int:
        """One pass over the sites; the `rounds` option does not apply."""
        return len(self.sites)

    def label(self, index: int) -> str:
        return f"visit {index} ({self.sites[index - 1]})"

    def round_plan(self, plan: dict[str, Any], index: int) -> dict[str, Any]:
        """The plan with early stopping at every site; one pass, so the seed stays."""
        out = copy.deepcopy(plan)
        out["early_stopping"] = {"patience": self.options.patience, "max_epochs": self.options.max_epochs}
        return out

    def configure_train(self, index: int, run_id: str) -> list[Job]:
        """The INDEX-th site of the visiting order, under `<run>-v<visit>-<site>`."""
        site = self.sites[index - 1]
        return [Job(site, f"{run_id}-v{index:03d}-{site}", self.label(index))]
