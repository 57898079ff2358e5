"""The site's side of secure aggregation, for training rounds whose plan says ``aggregation.mode: secure``.

The protocol itself is `agent.exchange.secagg` (one `SiteSecAgg` state machine per round);
this module is what ties it to this site's rounds, whatever the transport (the push API's
``/v1/rounds/{id}/secagg/...`` routes, or the outbound connector's relay tasks):

* at ``start_round`` a secure plan weaker than the site accepts is refused (``check_plan``):
  a threshold below ``secure_aggregation.min_threshold``, a site without a signing key and a
  roster, or (with ``secure_aggregation.require``) a plan that is not secure at all;
* the worker trains as for any round, but the egress gate *holds* the filtered update
  (``secagg/<round_id>/update.safetensors``, 0600) instead of releasing it, and the round's
  update endpoint answers 409: nothing unmasked leaves;
* ``advertise``, ``share``, ``mask`` and ``unmask`` answer the coordinator's protocol steps
  for one completed round. Each runs `SiteSecAgg` in ``secagg/<round_id>/protocol/``, checks
  the coordinator's sets and keys against the site's own roster and minimums, and records an
  audit event (``secagg.advertised``, ``secagg.shared``, ``secagg.masked``,
  ``secagg.unmasked``, or ``secagg.refused`` with the reason) holding counts, sets of site
  ids and hashes, never a key, seed or share;
* ``mask`` quantises the held update (`agent.exchange.secagg.quantize`, weight = the round's
  sample count), masks it and releases the masked vector through the egress gate
  (``EgressGate.release_masked``: hashed, audited ``egress.update``), which is what it returns.

One round is aggregated in one protocol session only (its run and round ids are fixed by the
first ``advertise``): a coordinator that could run two sessions over the same update with
different survivors would learn one site's update as the difference of two sums.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.audit.sink import AuditSink
from agent.config import AgentConfig
from agent.errors import (
    ConfigError,
    Conflict,
    EgressError,
    InvalidRequest,
    NotFound,
    PlanError,
    SecAggError,
    SecAggRefused,
    WeightError,
)
from agent.exchange.codec import decode_weights
from agent.exchange.egress import EgressGate
from agent.exchange.secagg import (
    MaskRequest,
    QuantParams,
    ShareRequest,
    SiteSecAgg,
    UnmaskRequest,
    flatten,
    load_site_key,
    parse_public_key,
    public_key_b64,
    quantize,
)
from agent.exchange.secagg.messages import check_run_id
from agent.jobs.states import JobKind, JobStatus
from agent.jobs.store import JobStore, JobView
from agent.training.plan import AggregationSpec, Plan, load_stored_plan, plan_hash
from agent.training.registry import expected_shapes

log = logging.getLogger("fedsite.secagg")

ACTOR = "secure-aggregation"
_T = TypeVar("_T")


@dataclass(frozen=True)
class MaskedUpdate:
    """The masked vector released for a round (safetensors bytes, one uint32 tensor)."""

    round_id: str
    data: bytes
    sha256: str


def check_setup(cfg: AgentConfig) -> str | None:
    """A configured site key and roster that can be used: the key readable and this site's roster
    entry its public key; the public key, or None when secure aggregation is not configured. A
    ConfigError naming the key otherwise, so that a mistake stops the agent when it starts
    (`fedsite serve` checks it first) rather than at the first secure round."""
    sa = cfg.secure_aggregation
    if not sa.configured or sa.site_key_file is None:
        return None
    try:
        own = public_key_b64(load_site_key(sa.site_key_file))
    except SecAggError as exc:
        raise ConfigError(f"secure_aggregation.site_key_file: {exc}") from None
    pinned = sa.peers.get(cfg.site.id)
    if pinned is None or base64.b64decode(pinned) != base64.b64decode(own):
        raise ConfigError(
            f"secure_aggregation.peers.{cfg.site.id}: is not the public key of "
            f"secure_aggregation.site_key_file ({sa.site_key_file}), which is {own}"
        )
    return own


class SecureRounds:
    """Secure-aggregation steps for this site's rounds (see the module docstring)."""

    def __init__(self, cfg: AgentConfig, store: JobStore, audit: AuditSink, gate: EgressGate) -> None:
        self.cfg = cfg
        self.store = store
        self.audit = audit
        self.gate = gate
        self._key: Ed25519PrivateKey | None = None
        self._roster: dict[str, Ed25519PublicKey] | None = None

    # ---- at start ---------------------------------------------------------------------------

    def check_setup(self) -> None:
        """At agent start: `check_setup` of the config (a ConfigError naming the key)."""
        check_setup(self.cfg)

    # ---- at start_round ------------------------------------------------------------------

    def check_plan(self, plan: Plan, actor: str) -> None:
        """Refuse (InvalidRequest, audited) a training plan weaker than this site accepts."""
        sa = self.cfg.secure_aggregation
        agg = plan.aggregation
        problem: tuple[str, str] | None = None
        if agg is None:
            if sa.require:
                problem = (
                    "secure_aggregation_required",
                    "plan.aggregation: this site trains only in secure-aggregation rounds "
                    "(secure_aggregation.require); add aggregation {mode: secure, ...} to the plan",
                )
        elif not sa.configured:
            problem = (
                "not_configured",
                "plan.aggregation: this site is not set up for secure aggregation; its admin sets "
                "secure_aggregation.site_key_file (`fedsite secagg keygen`) and secure_aggregation.peers",
            )
        elif agg.threshold < sa.min_threshold:
            problem = (
                "threshold_below_minimum",
                f"plan.aggregation.threshold: {agg.threshold} is below this site's minimum "
                f"{sa.min_threshold} (secure_aggregation.min_threshold)",
            )
        if problem is None:
            return
        reason, message = problem
        self.audit.append(
            "secagg.refused",
            actor=actor,
            details={
                "step": "start_round",
                "round_id": plan.round_id,
                "plan_hash": plan_hash(plan),
                "reason": reason,
                "message": message,
            },
        )
        log.warning("secure aggregation: round %s refused: %s", plan.round_id, message)
        raise InvalidRequest(message)

    # ---- the protocol's steps ------------------------------------------------------------

    def advertise(self, round_id: str, message: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """Step 0: this round's two fresh public keys, signed with the site key."""
        job, agg = self._secure_job(round_id)
        run_id, secagg_round = self._context(message, job, "advertise")

        def step() -> dict[str, Any]:
            weight = int(job.num_samples or 0)
            if not 1 <= weight <= agg.max_weight:
                raise SecAggRefused(
                    "weight_above_maximum",
                    f"this round trained on {weight} samples, outside 1..max_weight ({agg.max_weight}) "
                    "of the plan's aggregation",
                )
            return self._session(job, agg, run_id, secagg_round).advertise().to_dict()

        bundle = self._run("advertise", job, run_id, secagg_round, actor, step)
        self._record("secagg.advertised", job, run_id, secagg_round, actor, {"public_keys": 2})
        return bundle

    def share(self, round_id: str, message: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """Step 1: check U1's bundles against the roster, then seal shares for every other site."""
        job, agg = self._secure_job(round_id)
        request = self._parse(ShareRequest.from_dict, message, "share", job)

        def step() -> dict[str, Any]:
            return self._session(job, agg, request.run_id, request.round_id).share(request).to_dict()

        response = self._run("share", job, request.run_id, request.round_id, actor, step)
        sites = sorted(b.site_id for b in request.bundles)
        self._record(
            "secagg.shared",
            job,
            request.run_id,
            request.round_id,
            actor,
            {"sites": sites, "threshold": agg.threshold, "ciphertexts": len(response["ciphertexts"])},
        )
        return response

    def mask(self, round_id: str, message: Mapping[str, Any], actor: str) -> MaskedUpdate:
        """Step 2: quantise and mask the held update; release the masked vector through the gate."""
        job, agg = self._secure_job(round_id)
        request = self._parse(MaskRequest.from_dict, message, "mask", job)
        plan = load_stored_plan(job.plan_json)
        clipped = 0

        def step() -> bytes:
            nonlocal clipped
            session = self._session(job, agg, request.run_id, request.round_id)
            sites = session.sites
            if not sites:
                raise SecAggRefused(
                    "out_of_order", "asked for a masked input before this site shared its keys"
                )
            params = QuantParams(n_sites=len(sites), clip=agg.clip, max_weight=agg.max_weight)
            quantised = quantize(self._held_vector(job, plan), int(job.num_samples or 0), params)
            clipped = quantised.clipped
            masked = session.mask(request, quantised.vector)
            try:
                already = self.gate.recorded_sha256(job.round_id)
            except EgressError:
                already = None
            if already is None:
                self.gate.release_masked(
                    round_id=job.round_id,
                    plan=plan,
                    masked=masked,
                    details={
                        "run_id": request.run_id,
                        "secagg_round": request.round_id,
                        "survivors": len(request.survivors),
                        "clipped_elements": clipped,
                    },
                )
            # What leaves is exactly what the gate recorded (a repeated request: the same bytes).
            return self.gate.read_released(job.round_id)

        data = self._run("mask", job, request.run_id, request.round_id, actor, step)
        digest = hashlib.sha256(data).hexdigest()
        self.store.mark_update_fetched(job.id)
        self._record(
            "secagg.masked",
            job,
            request.run_id,
            request.round_id,
            actor,
            {
                "survivors": list(request.survivors),
                "sha256": digest,
                "bytes": len(data),
                "clipped_elements": clipped,
            },
        )
        if clipped:
            log.warning(
                "round %s: %d update element(s) were beyond the plan's clip %g and were clamped",
                job.round_id,
                clipped,
                agg.clip,
            )
        return MaskedUpdate(round_id=job.round_id, data=data, sha256=digest)

    def unmask(self, round_id: str, message: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """Step 3, for one request per round (and its retries, each audited): b-shares of the
        survivors, s-shares of the dropped."""
        job, agg = self._secure_job(round_id)
        request = self._parse(UnmaskRequest.from_dict, message, "unmask", job)

        def step() -> dict[str, Any]:
            return self._session(job, agg, request.run_id, request.round_id).unmask(request).to_dict()

        response = self._run("unmask", job, request.run_id, request.round_id, actor, step)
        self._record(
            "secagg.unmasked",
            job,
            request.run_id,
            request.round_id,
            actor,
            {
                "survivors": list(request.survivors),
                "dropped": list(request.dropped),
                "b_shares": len(response["b_shares"]),
                "s_shares": len(response["s_shares"]),
            },
        )
        return response

    # ---- internals -----------------------------------------------------------------------

    def _secure_job(self, round_id: str) -> tuple[JobView, AggregationSpec]:
        job = self.store.get(JobKind.TRAIN, round_id)
        if job is None:
            raise NotFound(f"no round with id {round_id!r}")
        try:
            agg = load_stored_plan(job.plan_json).aggregation
        except PlanError as exc:
            raise Conflict(f"round {round_id}: {exc}") from None
        if agg is None:
            raise Conflict(
                f"round {round_id} is not a secure-aggregation round (its plan has no aggregation)"
            )
        if job.status != JobStatus.COMPLETED:
            raise Conflict(
                f"round {round_id} is {job.status}; secure aggregation starts once its training completed"
            )
        return job, agg

    def _context(self, message: Mapping[str, Any], job: JobView, step: str) -> tuple[str, str]:
        def parse(data: Mapping[str, Any]) -> tuple[str, str]:
            if not isinstance(data, Mapping) or set(data) != {"run_id", "round_id"}:
                raise SecAggError("advertise request: expected exactly the fields 'run_id' and 'round_id'")
            return check_run_id(data["run_id"], "run_id"), check_run_id(data["round_id"], "round_id")

        return self._parse(parse, message, step, job)

    def _parse(self, parse: Callable[[Any], _T], message: Any, step: str, job: JobView) -> _T:
        try:
            return parse(message)
        except SecAggError as exc:
            self.audit.append(
                "secagg.refused",
                actor=ACTOR,
                details={"step": step, "round_id": job.round_id, "reason": "malformed", "message": str(exc)},
            )
            raise InvalidRequest(f"secure aggregation {step}: {exc}") from None

    def _signing(self) -> tuple[Ed25519PrivateKey, dict[str, Ed25519PublicKey]]:
        sa = self.cfg.secure_aggregation
        if not sa.configured or sa.site_key_file is None:
            raise SecAggRefused(
                "not_configured",
                "this site is not set up for secure aggregation (secure_aggregation.site_key_file and peers)",
            )
        if self._key is None or self._roster is None:
            self._key = load_site_key(sa.site_key_file)
            self._roster = {
                site: parse_public_key(text, field=f"secure_aggregation.peers.{site}")
                for site, text in sa.peers.items()
            }
        return self._key, self._roster

    def _session(self, job: JobView, agg: AggregationSpec, run_id: str, secagg_round: str) -> SiteSecAgg:
        key, roster = self._signing()
        directory = self.session_dir(job.round_id)
        try:
            return SiteSecAgg(
                directory,
                site_id=self.cfg.site.id,
                run_id=run_id,
                round_id=secagg_round,
                threshold=agg.threshold,
                signing_key=key,
                roster=roster,
                min_threshold=self.cfg.secure_aggregation.min_threshold,
                min_sites=self.cfg.secure_aggregation.min_sites,
            )
        except SecAggRefused:
            raise
        except SecAggError as exc:
            if "holds the state of" in str(exc):
                raise SecAggRefused(
                    "other_session",
                    f"round {job.round_id} already takes part in another secure-aggregation session; "
                    "a round's update is aggregated in one session only",
                ) from None
            raise

    def session_dir(self, round_id: str) -> Path:
        """Where the protocol's state for ROUND_ID lives (beside the held update)."""
        return self.gate.held_path(round_id).parent / "protocol"

    def _held_vector(self, job: JobView, plan: Plan) -> Any:
        try:
            data = self.gate.read_held(job.round_id)
            tensors = decode_weights(data, expected=expected_shapes(plan), max_bytes=len(data))
        except (EgressError, WeightError) as exc:
            raise SecAggRefused("no_update", f"the round's held update cannot be used: {exc}") from None
        return flatten(tensors)

    def _run(
        self, step: str, job: JobView, run_id: str, secagg_round: str, actor: str, fn: Callable[[], _T]
    ) -> _T:
        """FN, with a refusal audited and logged (the site says why) and answered 409."""
        try:
            return fn()
        except SecAggRefused as exc:
            self.audit.append(
                "secagg.refused",
                actor=actor,
                details={
                    "step": step,
                    "round_id": job.round_id,
                    "run_id": run_id,
                    "secagg_round": secagg_round,
                    "reason": exc.reason,
                    "message": exc.detail,
                },
            )
            log.warning("secure aggregation: round %s, step %s refused: %s", job.round_id, step, exc)
            raise Conflict(f"round {job.round_id}: {exc}") from None
        except SecAggError as exc:
            self.audit.append(
                "secagg.refused",
                actor=actor,
                details={
                    "step": step,
                    "round_id": job.round_id,
                    "run_id": run_id,
                    "secagg_round": secagg_round,
                    "reason": "invalid",
                    "message": str(exc),
                },
            )
            log.warning("secure aggregation: round %s, step %s failed: %s", job.round_id, step, exc)
            raise InvalidRequest(f"round {job.round_id}: secure aggregation {step}: {exc}") from None

    def _record(
        self,
        action: str,
        job: JobView,
        run_id: str,
        secagg_round: str,
        actor: str,
        details: Mapping[str, Any],
    ) -> None:
        self.audit.append(
            action,
            actor=actor,
            details={"round_id": job.round_id, "run_id": run_id, "secagg_round": secagg_round, **details},
        )
