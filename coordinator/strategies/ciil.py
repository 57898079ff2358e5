"""CIIL (cyclic institutional incremental learning): the model travels from site to site.

Each round is a cycle: the model visits every site in the visiting order, trains a fixed
number of epochs there (the plan's `local_epochs`; early stopping is taken out of the plan)
and goes on to the next site as that site sent it back. A site that fails passes the model on
unchanged. With `evaluate_every_visit` the model is also evaluated after each visit but the
last of a cycle (whose model is the cycle's, evaluated with the round).

This class is the travelling-model shape; IIL (iil.py) is the variant with one visit per
round and early stopping at every site.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from coordinator.aggregate import UpdateKind, apply_update
from coordinator.errors import AgentError, AggregationError
from coordinator.strategies.base import Job, Round, RunContext, SiteResult, Strategy
from coordinator.weights import encode


class CIIL(Strategy):
    title = "CIIL"
    round_label = "cycle"
    # The model waits at one site at a time: a site that stopped answering fails its visit,
    # so that the model moves on unchanged instead of waiting for the round's timeout.
    lease_expiry = "fail"

    def label(self, index: int) -> str:
        return f"cycle {index}"

    def round_plan(self, plan: dict[str, Any], index: int) -> dict[str, Any]:
        """A fixed number of epochs per visit: the plan without early stopping, reseeded per cycle."""
        return super().round_plan({k: v for k, v in plan.items() if k != "early_stopping"}, index)

    def configure_train(self, index: int, run_id: str) -> list[Job]:
        """Every site in visiting order, under `<run>-c<cycle>v<visit>-<site>`."""
        return [
            Job(site, f"{run_id}-c{index:03d}v{j:03d}-{site}", f"cycle {index} visit {j} ({site})")
            for j, site in enumerate(self.sites, start=1)
        ]

    def aggregate_train(
        self, global_weights: dict[str, torch.Tensor], results: Sequence[SiteResult], kind: UpdateKind
    ) -> dict[str, torch.Tensor]:
        """Each update in turn: the model a site sent back (weights) or the model plus its difference."""
        weights = global_weights
        for res in results:
            weights = apply_update(weights, res.tensors, kind)
        return weights

    def train_round(self, ctx: RunContext, rnd: Round) -> tuple[list[SiteResult], list[dict[str, str]]]:
        """The jobs one after another, each from the model the one before left."""
        trained: list[SiteResult] = []
        left_out: list[dict[str, str]] = []
        for j, job in enumerate(rnd.jobs, start=1):
            started = time.monotonic()
            res, miss = self.visit(ctx, rnd, job)
            if res is not None:
                trained.append(res)
            if miss is not None:
                left_out.append(miss)
            if j < len(rnd.jobs):
                self.after_visit(ctx, rnd, j, job, started)
        return trained, left_out

    def visit(self, ctx: RunContext, rnd: Round, job: Job) -> tuple[SiteResult | None, dict[str, str] | None]:
        """One stop of the travelling model; a failed site passes the model on unchanged."""
        weights = encode(ctx.global_weights)
        try:
            res = ctx.train_at(job.site, rnd.plan, weights, job.round_id)
            ctx.global_weights = self.aggregate_train(ctx.global_weights, [res], ctx.kind)
            return res, None
        except (AgentError, AggregationError) as exc:
            ctx.reporter.warning(f"{job.label}: {job.site} skipped, the model goes on unchanged: {exc}")
            ctx.reporter.site(job.site, "skipped", 0.0)
            return None, {"site": job.site, "reason": str(exc)}

    def after_visit(self, ctx: RunContext, rnd: Round, j: int, job: Job, started: float) -> None:
        """With `evaluate_every_visit`: store and evaluate the model after visit J of the cycle."""
        if not self.options.evaluate_every_visit:
            return
        cycle = rnd.index
        rel, _ = ctx.recorder.save_model(
            0, encode(ctx.global_weights), f"cycle-{cycle:03d}-visit-{j:03d}.safetensors"
        )
        evaluation, mean = ctx.evaluate_everywhere(encode(ctx.global_weights), f"c{cycle:03d}v{j:03d}")
        ctx.recorder.doc.setdefault("visits", []).append(
            {
                "cycle": cycle,
                "visit": j,
                "site": job.site,
                "evaluation": evaluation,
                "weighted_dice": mean,
                "model": rel,
                "duration_s": round(time.monotonic() - started, 3),
            }
        )
