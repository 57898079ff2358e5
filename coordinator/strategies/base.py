"""The `Strategy` base: what each round asks of which sites, how results combine, how a round is labelled.

A run is a number of rounds. For every round the base class asks its strategy four things,
each a method that a strategy (or a variant of one) overrides on its own:

- `label`: the round's name in results.json, warnings and the Dice table ("round 2").
- `round_plan`: the plan that the round's jobs carry (its seed, early stopping, ...).
- `configure_train`: the jobs of the round: which sites train, in what order, under which
  `round_id` (an agent finds a repeated POST by its round id instead of starting a second job).
- `aggregate_train`: how the updates that came back make the next global model.

`train_round` is the round's shape: the sites train at once from the same model and the
results combine at the end (FedAvg), or the model travels from site to site (IIL, CIIL).
`run` is the loop over the rounds; the coordinator records and evaluates each round.

A strategy never talks HTTP and never writes files itself: it asks its `RunContext` (the
`Coordinator`) to train at a site, to evaluate, and to record. Strategies are looked up by
name in `coordinator.strategies.STRATEGIES`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import torch

from coordinator.aggregate import UpdateKind
from coordinator.options import RunOptions
from coordinator.report import Reporter, RunRecorder

_A = TypeVar("_A")
_T = TypeVar("_T")


@dataclass
class SiteResult:
    """What one site's training job brought back, with what it cost."""

    site: str
    round_id: str
    tensors: dict[str, torch.Tensor]
    num_samples: int
    metrics: dict[str, Any]
    update_sha256: str
    bytes_sent: int
    bytes_received: int
    duration_s: float


@dataclass(frozen=True)
class Job:
    """One training job that a round asks of one site."""

    site: str
    # Unique within the run: the agent answers a repeated POST with the job it already has.
    round_id: str
    # Names the job in warnings ("cycle 2 visit 3 (site-4)").
    label: str


@dataclass(frozen=True)
class Round:
    """One round as its strategy configured it; `started` is time.monotonic() at its start."""

    index: int
    label: str
    plan: dict[str, Any]
    jobs: list[Job]
    started: float


class RunContext(Protocol):
    """What a strategy may ask of the coordinator: its transport, the global model, the records."""

    run_id: str
    # The run's base plan (without a round_id); `Strategy.round_plan` derives each round's.
    plan: dict[str, Any]
    kind: UpdateKind
    # The model every job starts from; a strategy replaces it as updates come in.
    global_weights: dict[str, torch.Tensor]
    reporter: Reporter

    @property
    def min_sites(self) -> int: ...

    @property
    def recorder(self) -> RunRecorder: ...

    def parallel(self, fn: Callable[[_A], _T], items: Sequence[_A]) -> list[_T]:
        """FN for every item at once, results in the items' order."""
        ...

    def train_at(self, site: str, plan: dict[str, Any], weights: bytes, round_id: str) -> SiteResult:
        """One training job at SITE, from WEIGHTS; raises AgentError when it brings nothing usable."""
        ...

    def evaluate_everywhere(
        self, weights: bytes, tag: str, sites: Sequence[str] | None = None
    ) -> tuple[dict[str, dict[str, Any]], float | None]:
        """Per-site evaluation results and the sample-weighted mean Dice."""
        ...

    def finish_round(
        self, rnd: Round, trained: Sequence[SiteResult], left_out: Sequence[dict[str, str]]
    ) -> dict[str, Any]:
        """Store the round's global model, evaluate it and add the round to results.json."""
        ...


class Strategy(ABC):
    """A way of collaborating, driven over a `RunContext`; one subclass per module of this package."""

    # The reporter's title for the run ("FedAvg over site-1, site-2").
    title: ClassVar[str]
    # What one round is called: results.json's `round_label` and the Dice plot's x axis.
    round_label: ClassVar[str]
    # What the relay does with a pull site's task whose lease ran out (the site stopped
    # answering): "requeue" hands it out again (at most relay.max_requeues times), "fail" ends
    # it at once. The runner gives it to every pull-site client.
    lease_expiry: ClassVar[str] = "requeue"

    def __init__(self, options: RunOptions, sites: Sequence[str]) -> None:
        self.options = options
        # The federation's sites in visiting order (the coordinator checked the names).
        self.sites = list(sites)

    # -- what each round asks --------------------------------------------------------------

    def num_rounds(self) -> int:
        return self.options.rounds

    def settings(self) -> dict[str, Any]:
        """The strategy's own settings as results.json records them (a server optimiser's rates)."""
        return {}

    def round_record(self, index: int) -> dict[str, Any]:
        """What the strategy adds to round INDEX's record in results.json (secure aggregation:
        its protocol report); nothing by default."""
        return {}

    @abstractmethod
    def label(self, index: int) -> str:
        """Round INDEX's (1-based) name in results.json, warnings and the Dice table."""

    def round_plan(self, plan: dict[str, Any], index: int) -> dict[str, Any]:
        """PLAN for round INDEX (1-based): PLAN itself, or with seed + INDEX - 1 when reseeding."""
        if not self.options.reseed_rounds:
            return plan
        return {**plan, "seed": int(plan.get("seed", 0)) + index - 1}

    @abstractmethod
    def configure_train(self, index: int, run_id: str) -> list[Job]:
        """The jobs of round INDEX: which sites train, in what order, under which round ids."""

    # -- how results combine ---------------------------------------------------------------

    @abstractmethod
    def aggregate_train(
        self, global_weights: dict[str, torch.Tensor], results: Sequence[SiteResult], kind: UpdateKind
    ) -> dict[str, torch.Tensor]:
        """The next global model from GLOBAL_WEIGHTS and the updates in RESULTS.

        Raises AggregationError when the updates cannot be combined.
        """

    # -- the round's shape and the loop ----------------------------------------------------

    @abstractmethod
    def train_round(self, ctx: RunContext, rnd: Round) -> tuple[list[SiteResult], list[dict[str, str]]]:
        """Run the round's jobs and update `ctx.global_weights`.

        Returns the results that went into the model and, for every site left out, a
        {"site", "reason"} entry; raises RoundFailed when the round cannot count.
        """

    def run(self, ctx: RunContext) -> None:
        """Every round: configure it, train, and let the coordinator record and evaluate it."""
        for index in range(1, self.num_rounds() + 1):
            started = time.monotonic()
            rnd = Round(
                index=index,
                label=self.label(index),
                plan=self.round_plan(ctx.plan, index),
                jobs=self.configure_train(index, ctx.run_id),
                started=started,
            )
            trained, left_out = self.train_round(ctx, rnd)
            record = ctx.finish_round(rnd, trained, left_out)
            extra = self.round_record(index)
            if extra:
                record.update(extra)
                ctx.recorder.flush()
