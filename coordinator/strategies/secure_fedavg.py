"""Secure FedAvg: FedAvg where the coordinator learns only the sum of the sites' updates.

Every round, every site trains from the global model as in FedAvg, but keeps its update (the
plan's ``aggregation: {mode: secure, threshold, clip, max_weight}``; ``send: diff``). Then the
strategy runs the secure-aggregation protocol (`agent.exchange.secagg`, Bonawitz et al. 2017)
over the sites' transports, one step at a time, all sites of a step at once:

1. advertise: each site's two fresh public keys, signed with its site key; the coordinator
   checks each against the key its federation file pins (``secagg_public_key``);
2. share: every site gets everyone's keys (and checks them against its own roster) and returns
   its Shamir shares, sealed for each other site;
3. mask: each site gets the shares addressed to it and returns its masked, quantised update
   (released through its egress gate); the coordinator only ever adds them up;
4. unmask: the survivors (sites whose masked update arrived) get the sets of survivors and of
   sites that dropped after sharing, and each answers once with the shares that remove the
   masks from the sum. The sum, decoded, is the sample-weighted mean of the clipped updates
   (within `agent.exchange.secagg.quantize.error_bound`).

A site that fails, times out or refuses at any step is left out of the rest of the round,
with its reason; the round goes on while at least ``threshold`` sites remain, and below it
fails cleanly: the next step's message is still sent to the sites that remain, each of which
refuses it by its own check and says why (its answer, its log and its audit log), and the
round is recorded as failed with every site's reason. What the coordinator stores (results,
models, logs) holds the sum and hashes of masked updates, never one site's update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from agent.errors import SecAggError, WeightError
from agent.exchange.codec import decode_masked
from agent.exchange.secagg import (
    AdvertiseBundle,
    CoordinatorSecAgg,
    MaskRequest,
    QuantParams,
    ShareRequest,
    ShareResponse,
    UnmaskRequest,
    UnmaskResponse,
    dequantize_sum,
    error_bound,
    parse_public_key,
    unflatten,
)
from coordinator.aggregate import UpdateKind, apply_update
from coordinator.client import SiteClient
from coordinator.errors import AgentError, AggregationError, RoundFailed, RunError
from coordinator.options import RunOptions
from coordinator.strategies.base import Job, Round, RunContext, SiteResult
from coordinator.strategies.fedavg import FedAvg
from coordinator.weights import MAX_UPDATE_BYTES, encode

if TYPE_CHECKING:
    from agent.training.plan import AggregationSpec


class SecureRunContext(RunContext, Protocol):
    """What Secure FedAvg asks of the coordinator beyond a plain strategy (`Coordinator` has it)."""

    def train_held(self, site: str, plan: dict[str, Any], weights: bytes, round_id: str) -> SiteResult:
        """Train at SITE; the site keeps the update (no download)."""
        ...

    def site_client(self, site: str) -> SiteClient:
        """SITE's transport, for the protocol's steps."""
        ...

    def secagg_public_keys(self) -> dict[str, str | None]:
        """Each site's pinned secure-aggregation public key (base64), None where unset."""
        ...


@dataclass
class _Progress:
    """Who is still in the round and why the others left."""

    jobs: dict[str, str]  # site -> the site's round id
    left_out: list[dict[str, str]] = field(default_factory=list)
    refusals: dict[str, str] = field(default_factory=dict)

    def drop(self, ctx: RunContext, rnd: Round, site: str, step: str, reason: str) -> None:
        self.left_out.append({"site": site, "step": step, "reason": reason})
        ctx.reporter.warning(f"{rnd.label}: {site} left out of this secure round at {step}: {reason}")
        ctx.reporter.site(site, f"left out at {step}", 0.0)


class SecureFedAvg(FedAvg):
    """FedAvg's jobs and labels; the round's shape (`train_round`) is the protocol's."""

    title = "Secure FedAvg"
    # A pull site whose lease ran out while the round's protocol waits cannot rejoin a later
    # step with the same keys: the task fails and the site counts as dropped.
    lease_expiry = "fail"

    def __init__(self, options: RunOptions, sites: Sequence[str]) -> None:
        super().__init__(options, sites)
        # Each round's protocol report, until the round's record takes it (`round_record`).
        self._reports: dict[int, dict[str, Any]] = {}

    def aggregate_train(
        self, global_weights: dict[str, torch.Tensor], results: Sequence[SiteResult], kind: UpdateKind
    ) -> dict[str, torch.Tensor]:
        """Not used: the coordinator never holds the sites' updates, only their masked sum (train_round)."""
        raise AggregationError("secure FedAvg aggregates through the secure-aggregation protocol only")

    def round_record(self, index: int) -> dict[str, Any]:
        """Round INDEX's protocol report (session, threshold, who took part in which step)."""
        return {"secure_aggregation": self._reports.pop(index, {})}

    # -- one round -------------------------------------------------------------------------

    def train_round(self, ctx: RunContext, rnd: Round) -> tuple[list[SiteResult], list[dict[str, str]]]:
        sctx = _secure_context(ctx)
        agg = _aggregation(rnd.plan, ctx.kind)
        pinned = _pinned(sctx, [job.site for job in rnd.jobs])
        weights = encode(ctx.global_weights)

        def train(job: Job) -> tuple[Job, SiteResult | None, str | None]:
            try:
                return job, sctx.train_held(job.site, rnd.plan, weights, job.round_id), None
            except AgentError as exc:
                return job, None, str(exc)

        progress = _Progress(jobs={})
        trained: dict[str, SiteResult] = {}
        for job, res, err in ctx.parallel(train, rnd.jobs):
            if res is None:
                progress.drop(ctx, rnd, job.site, "train", err or "unknown error")
            else:
                trained[job.site] = res
                progress.jobs[job.site] = res.round_id

        session = f"r{rnd.index:03d}"
        # The protocol's bytes count with the round's, per site (what results.json reports).
        before = {site: sctx.site_client(site).transfer.snapshot() for site in progress.jobs}
        shapes = {name: tuple(t.shape) for name, t in ctx.global_weights.items()}
        length = sum(math.prod(s) for s in shapes.values()) + 1  # the model's values, then the weight
        server = CoordinatorSecAgg(
            run_id=ctx.run_id, round_id=session, threshold=agg.threshold, pinned=pinned, length=length
        )
        report: dict[str, Any] = {
            "session": session,
            "threshold": agg.threshold,
            "clip": agg.clip,
            "max_weight": agg.max_weight,
        }
        self._reports[rnd.index] = report

        def fail(step: str, why: str, notify: Mapping[str, dict[str, Any]], notify_step: str) -> RoundFailed:
            """Tell the sites that remain (they refuse by their own checks, saying why), record the
            failed round with every reason, and return the error to raise."""
            for site, answer, err in self._ask(ctx, sctx, progress, notify_step, notify):
                progress.refusals[site] = err if err is not None else f"answered {notify_step} ({answer})"
            report.update(vars(server.report()))
            report["site_refusals"] = dict(progress.refusals)
            record: dict[str, Any] = {
                "index": rnd.index,
                "label": rnd.label,
                "participants": [],
                "left_out": progress.left_out,
                "failed": True,
                "failed_at": step,
                "secure_aggregation": report,
                "duration_s": round(time.monotonic() - rnd.started, 3),
            }
            ctx.recorder.add_round(record)
            said = (
                "; ".join(f"{s} says: {r}" for s, r in sorted(progress.refusals.items()))
                or "no site answered"
            )
            return RoundFailed(f"{rnd.label} failed at {step}: {why}. {said}")

        # Step 0: advertise.
        bundles: dict[str, AdvertiseBundle] = {}

        def took_bundle(site: str, answer: dict[str, Any]) -> None:
            bundle = AdvertiseBundle.from_dict(answer)
            _names_itself(bundle.site_id, site, "the bundle")
            server.add_advertisement(bundle)
            bundles[site] = bundle

        ask = {site: {"run_id": ctx.run_id, "round_id": session} for site in progress.jobs}
        self._collect(ctx, sctx, progress, rnd, "advertise", ask, took_bundle)
        try:
            share_request = server.share_request()
        except SecAggError as exc:
            everyone = ShareRequest(ctx.run_id, session, tuple(bundles[s] for s in sorted(bundles)))
            raise fail("advertise", str(exc), {s: everyone.to_dict() for s in bundles}, "share") from None

        # Step 1: share.
        u1 = list(share_request.bundles)
        message = share_request.to_dict()

        def took_shares(site: str, answer: dict[str, Any]) -> None:
            response = ShareResponse.from_dict(answer)
            _names_itself(response.site_id, site, "the share answer")
            server.add_shares(response)

        self._collect(ctx, sctx, progress, rnd, "share", {b.site_id: message for b in u1}, took_shares)
        try:
            mask_requests = server.mask_requests()
        except SecAggError as exc:
            shared = tuple(server.shared)
            told = {b.site_id: MaskRequest(ctx.run_id, session, shared, {}).to_dict() for b in u1}
            raise fail("share", str(exc), told, "mask") from None

        # Step 2: masked inputs, summed as they come (never kept one by one).
        masked_sha: dict[str, tuple[str, int]] = {}
        for site, blob, err in self._mask(ctx, sctx, progress, mask_requests):
            if err is not None or blob is None:
                progress.drop(ctx, rnd, site, "mask", err or "no answer")
                continue
            data, digest = blob
            try:
                server.add_masked(site, decode_masked(data, length=length, max_bytes=MAX_UPDATE_BYTES))
                masked_sha[site] = (digest, len(data))
            except (SecAggError, WeightError) as exc:
                progress.drop(ctx, rnd, site, "mask", str(exc))
            del data, blob
        try:
            unmask_request = server.unmask_request()
        except SecAggError as exc:
            masked = tuple(server.masked)
            dropped = tuple(s for s in server.shared if s not in masked)
            told_unmask = UnmaskRequest(ctx.run_id, session, masked, dropped).to_dict()
            raise fail("mask", str(exc), {s: told_unmask for s in server.shared}, "unmask") from None

        # Step 3: unmask, answered once by each survivor.
        message = unmask_request.to_dict()

        def took_unmask(site: str, answer: dict[str, Any]) -> None:
            response = UnmaskResponse.from_dict(answer)
            _names_itself(response.site_id, site, "the unmask answer")
            server.add_unmask(response)

        self._collect(
            ctx, sctx, progress, rnd, "unmask", {s: message for s in unmask_request.survivors}, took_unmask
        )
        try:
            total = server.result()
            params = QuantParams(n_sites=len(u1), clip=agg.clip, max_weight=agg.max_weight)
            decoded = dequantize_sum(total, params)
            mean = unflatten(decoded.mean, shapes)
        except SecAggError as exc:
            raise fail("unmask", str(exc), {}, "unmask") from None
        report.update(vars(server.report()))
        report["total_weight"] = decoded.total_weight
        report["error_bound"] = error_bound(len(u1), agg.max_weight, agg.clip, decoded.total_weight)
        survivors = list(unmask_request.survivors)
        if len(survivors) < ctx.min_sites:
            raise fail(
                "unmask",
                f"{len(survivors)} site(s) in the sum, fewer than min_sites={ctx.min_sites}",
                {},
                "unmask",
            )
        ctx.global_weights = apply_update(ctx.global_weights, mean, "diff")
        results: list[SiteResult] = []
        for site in survivors:
            res = trained[site]
            digest, _ = masked_sha[site]
            res.update_sha256 = digest
            sent, received = sctx.site_client(site).transfer.snapshot()
            res.bytes_sent += sent - before[site][0]
            res.bytes_received += received - before[site][1]
            results.append(res)
        return results, progress.left_out

    # -- transport -------------------------------------------------------------------------

    @staticmethod
    def _ask(
        ctx: RunContext,
        sctx: SecureRunContext,
        progress: _Progress,
        step: str,
        messages: Mapping[str, dict[str, Any]],
    ) -> list[tuple[str, dict[str, Any] | None, str | None]]:
        """STEP's message to each site at once: (site, its JSON answer or None, the error or None)."""

        def one(site: str) -> tuple[str, dict[str, Any] | None, str | None]:
            try:
                client = sctx.site_client(site)
                return site, client.secagg(progress.jobs[site], step, messages[site]), None
            except AgentError as exc:
                return site, None, str(exc)

        return ctx.parallel(one, sorted(messages))

    @classmethod
    def _collect(
        cls,
        ctx: RunContext,
        sctx: SecureRunContext,
        progress: _Progress,
        rnd: Round,
        step: str,
        messages: Mapping[str, dict[str, Any]],
        take: Callable[[str, dict[str, Any]], None],
    ) -> None:
        """Ask STEP of every site in MESSAGES and TAKE each answer; a site that does not answer,
        or whose answer TAKE refuses (SecAggError), is dropped from the round with the reason."""
        for site, answer, err in cls._ask(ctx, sctx, progress, step, messages):
            if err is not None or answer is None:
                progress.drop(ctx, rnd, site, step, err or "no answer")
                continue
            try:
                take(site, answer)
            except SecAggError as exc:
                progress.drop(ctx, rnd, site, step, str(exc))

    @staticmethod
    def _mask(
        ctx: RunContext, sctx: SecureRunContext, progress: _Progress, requests: Mapping[str, MaskRequest]
    ) -> list[tuple[str, tuple[bytes, str] | None, str | None]]:
        def one(site: str) -> tuple[str, tuple[bytes, str] | None, str | None]:
            try:
                client = sctx.site_client(site)
                return site, client.secagg_mask(progress.jobs[site], requests[site].to_dict()), None
            except AgentError as exc:
                return site, None, str(exc)

        return ctx.parallel(one, sorted(requests))


def _names_itself(named: str, site: str, what: str) -> None:
    """An answer must come from the site it names: WHAT names NAMED, but SITE sent it."""
    if named != site:
        raise SecAggError(f"{what} names site {named!r}")


def _secure_context(ctx: RunContext) -> SecureRunContext:
    for method in ("train_held", "site_client", "secagg_public_keys"):
        if not callable(getattr(ctx, method, None)):
            raise RunError(f"strategy secure_fedavg needs a coordinator with {method}()")
    return cast(SecureRunContext, ctx)


def _aggregation(plan: dict[str, Any], kind: UpdateKind) -> AggregationSpec:
    """The plan's aggregation section; a RunError naming the key when it cannot drive a secure round."""
    raw = plan.get("aggregation")
    if raw is None:
        raise RunError(
            "strategy secure_fedavg needs the plan's aggregation section, e.g. "
            '"aggregation": {"mode": "secure", "threshold": 2, "clip": 0.05, "max_weight": 10000}, '
            'with "send": "diff"'
        )
    if kind != "diff":
        raise RunError(
            "strategy secure_fedavg needs the plan's send to be 'diff' (the masked updates are differences)"
        )
    try:
        # Imported here: the plan module brings MONAI, which `fedsite` commands that only load
        # the strategy registry (and a read-only container) do without.
        from agent.training.plan import AggregationSpec

        return AggregationSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise RunError(f"plan.aggregation.{where}: {first.get('msg')}") from None


def _pinned(sctx: SecureRunContext, sites: Sequence[str]) -> dict[str, Ed25519PublicKey]:
    keys = sctx.secagg_public_keys()
    missing = [s for s in sites if not keys.get(s)]
    if missing:
        raise RunError(
            "strategy secure_fedavg: the federation file pins no secagg_public_key for "
            f"{', '.join(missing)}; add each site's `fedsite secagg public-key` to its entry"
        )
    try:
        return {s: parse_public_key(keys[s], field=f"{s}.secagg_public_key") for s in sites}
    except SecAggError as exc:
        raise RunError(f"federation: {exc}") from None
