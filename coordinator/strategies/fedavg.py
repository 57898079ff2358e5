"""FedAvg (and FedProx): every round, every site trains from the global model at the same time.

The new global model is the mean of the updates weighted by each site's training-sample count.
A site that fails, times out or sends an update that fails its hash check is left out of that
round (with a warning naming it); the round fails only when fewer than the federation's
`min_sites` updates arrive.

FedProx is FedAvg with a proximal term in each site's local loss: the plan's `fedprox_mu`,
which the agents apply. The coordinator's side of the two is the same, so one class serves both.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from coordinator.aggregate import SiteUpdate, UpdateKind, fedavg
from coordinator.errors import AgentError, AggregationError, RoundFailed
from coordinator.strategies.base import Job, Round, RunContext, SiteResult, Strategy
from coordinator.weights import encode


class FedAvg(Strategy):
    title = "FedAvg"
    round_label = "round"
    # The sites train side by side: a site that comes back gets its task again, and the round
    # waits for it no longer than its timeout.
    lease_expiry = "requeue"

    def label(self, index: int) -> str:
        return f"round {index}"

    def configure_train(self, index: int, run_id: str) -> list[Job]:
        """Every site of the federation, under `<run>-r<round>-<site>`."""
        return [Job(site, f"{run_id}-r{index:03d}-{site}", self.label(index)) for site in self.sites]

    def aggregate_train(
        self, global_weights: dict[str, torch.Tensor], results: Sequence[SiteResult], kind: UpdateKind
    ) -> dict[str, torch.Tensor]:
        """The sample-weighted mean of the updates (summed in float64, so arrival order does not matter)."""
        updates = [SiteUpdate(r.site, r.tensors, r.num_samples) for r in results]
        return fedavg(global_weights, updates, kind)

    def train_round(self, ctx: RunContext, rnd: Round) -> tuple[list[SiteResult], list[dict[str, str]]]:
        """All jobs at once from one model; the round counts with at least `min_sites` updates."""
        weights = encode(ctx.global_weights)

        def one(job: Job) -> tuple[Job, SiteResult | None, str | None]:
            try:
                return job, ctx.train_at(job.site, rnd.plan, weights, job.round_id), None
            except AgentError as exc:
                return job, None, str(exc)

        trained: list[SiteResult] = []
        left_out: list[dict[str, str]] = []
        for job, res, err in ctx.parallel(one, rnd.jobs):
            if res is not None:
                trained.append(res)
            else:
                reason = err or "unknown error"
                left_out.append({"site": job.site, "reason": reason})
                ctx.reporter.warning(f"{job.label}: {job.site} left out of this round: {reason}")
                ctx.reporter.site(job.site, "left out of this round", 0.0)
        if len(trained) < ctx.min_sites:
            self._record_failed(ctx, rnd, trained, left_out)
            names = ", ".join(x["site"] for x in left_out)
            raise RoundFailed(
                f"{rnd.label} failed: {len(trained)} update(s) arrived, fewer than min_sites="
                f"{ctx.min_sites}; left out: {names}"
            )
        try:
            ctx.global_weights = self.aggregate_train(ctx.global_weights, trained, ctx.kind)
        except AggregationError as exc:
            raise RoundFailed(f"{rnd.label} failed: {exc}") from None
        return trained, left_out

    @staticmethod
    def _record_failed(
        ctx: RunContext, rnd: Round, trained: list[SiteResult], left_out: list[dict[str, str]]
    ) -> None:
        """Keep the failed round in results.json: who trained, who was left out and why."""
        record: dict[str, Any] = {
            "index": rnd.index,
            "label": rnd.label,
            "participants": [r.site for r in trained],
            "left_out": left_out,
            "failed": True,
            "duration_s": round(time.monotonic() - rnd.started, 3),
        }
        ctx.recorder.add_round(record)
