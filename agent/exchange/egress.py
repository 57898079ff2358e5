"""The egress gate: the single code path by which bytes derived from local data leave the site.

``EgressGate.release`` takes a trained update and, in this order:

1. checks that the tensors are exactly the plan's model tensors (every name, every shape,
   float32, finite) — anything else is a bug or tampering and nothing is released;
2. applies the site's filters, joined with any the plan asks for (a plan can only add):
   ``exclude_parameters`` (fnmatch patterns on tensor names): in a ``diff`` update the
   matching tensors are zeroed; in a ``weights`` update they are replaced by the global
   weights' values, so that the coordinator learns nothing about them while a weighted
   average stays unchanged for those tensors. ``clip_norm``: the L2 norm of the difference
   to the global weights (over all tensors) is scaled down to at most this value;
3. encodes with the safetensors codec in the plan's transfer dtype and hashes the bytes —
   or, when the plan asks for ``compression`` and the site does not forbid the mode, encodes
   the difference compressed (``agent.exchange.compression``); for ``int8_topk`` the residual
   that error feedback keeps between rounds is read from and written back to
   ``compression/<key>.safetensors`` in the work directory, keyed by requester, dataset, model
   and compression settings, and the audit record carries its hash before and after;
4. records an ``egress.update`` audit event (round, plan hash, tensor count, bytes,
   SHA-256, filters, compression) — if this fails, nothing is written;
5. writes the bytes atomically to ``outbox/<round_id>.safetensors``.

A round under secure aggregation (plan ``aggregation.mode: secure``) releases nothing at the
end of training: ``release`` then *holds* the filtered update (steps 1-3, an ``egress.held``
audit event with its hash) in ``secagg/<round_id>/update.safetensors`` (0600) beside the
round's protocol state, where only this site reads it. What leaves is the masked vector,
through ``release_masked``: encoded (one uint32 tensor), hashed, recorded as ``egress.update``
(kind ``masked``) and written to the outbox like any release, and served only if its bytes
still match that record.

``read_released`` is what the update endpoint serves from: it returns a file's bytes only
when their SHA-256 equals the hash recorded for that round in the audit log, whose hash
chain makes the record itself tamper-evident. A file dropped into the outbox by anything
else, or changed after release, is refused.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from agent.audit.sink import AuditSink
from agent.config import EgressConfig
from agent.errors import EgressError, WeightError
from agent.exchange.codec import check_names_and_shapes, decode_weights, encode_masked, encode_weights
from agent.exchange.compression import Compression, compress
from agent.fileio import atomic_write_bytes
from agent.training.plan import ROUND_ID_PATTERN, plan_hash
from agent.training.registry import expected_shapes

if TYPE_CHECKING:
    from agent.training.plan import Plan

EGRESS_ACTION = "egress.update"
ACTOR = "egress-gate"
_ROUND_ID = re.compile(ROUND_ID_PATTERN)


HELD_ACTION = "egress.held"


@dataclass(frozen=True)
class Released:
    sha256: str
    nbytes: int
    path: Path
    filters: dict[str, Any] = field(default_factory=dict)
    # True: a secure round's update, kept at the site (`EgressGate.hold`), not released.
    held: bool = False


def _check_round_id(round_id: str) -> None:
    # The id becomes a file name: refuse anything that could leave the outbox folder.
    if not isinstance(round_id, str) or not _ROUND_ID.fullmatch(round_id):
        raise EgressError(f"round id {round_id!r} is not valid (letters, digits, '.', '_', '-')")


class EgressGate:
    def __init__(
        self,
        audit: AuditSink,
        outbox: Path,
        config: EgressConfig | None = None,
        *,
        held_dir: Path | None = None,
        requester: str = "",
    ) -> None:
        self.audit = audit
        self.outbox = Path(outbox)
        self.config = config or EgressConfig()
        # Who asked for the round (the job's actor): error feedback keeps one residual per
        # requester, so that two coordinators' runs never feed each other's remainders.
        self.requester = requester
        self.residual_dir = self.outbox.parent / "compression"
        # Secure rounds' private state, beside the outbox in the work directory.
        self.held_dir = Path(held_dir) if held_dir is not None else self.outbox.parent / "secagg"

    def path_for(self, round_id: str) -> Path:
        _check_round_id(round_id)
        return self.outbox / f"{round_id}.safetensors"

    def _check_update(
        self,
        plan: Plan,
        update: Mapping[str, torch.Tensor],
        global_weights: Mapping[str, torch.Tensor] | None,
    ) -> dict[str, tuple[int, ...]]:
        expected = expected_shapes(plan)
        try:
            check_names_and_shapes({n: tuple(t.shape) for n, t in update.items()}, expected)
            if global_weights is not None:
                check_names_and_shapes({n: tuple(t.shape) for n, t in global_weights.items()}, expected)
        except WeightError as exc:
            raise EgressError(f"update refused: {exc}") from None
        for name, tensor in update.items():
            if tensor.dtype != torch.float32:
                raise EgressError(
                    f"update refused: tensor {name!r} has dtype {tensor.dtype}, expected float32"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise EgressError(f"update refused: tensor {name!r} contains NaN or Inf values")
        return expected

    def release(
        self,
        *,
        round_id: str,
        plan: Plan,
        update: Mapping[str, torch.Tensor],
        global_weights: Mapping[str, torch.Tensor] | None,
        kind: Literal["weights", "diff"],
    ) -> Released:
        """Check, filter, encode, hash, audit, then write the update for ``round_id``.

        A secure round's update is held at the site instead (`hold`)."""
        path = self.path_for(round_id)
        if kind not in ("weights", "diff"):
            raise EgressError(f"update kind {kind!r} must be 'weights' or 'diff'")
        if kind != plan.send:
            raise EgressError(f"update kind {kind!r} differs from the plan's send {plan.send!r}")
        self._check_update(plan, update, global_weights)
        filtered, filters = self._apply_filters(plan, update, global_weights, kind)
        if plan.aggregation is not None:
            return self._hold(round_id, plan, filtered, filters)
        compression: dict[str, Any] | None = None
        residual: tuple[Path, bytes] | None = None
        try:
            if plan.compression is not None and plan.compression.mode in self.config.forbid_compression:
                compression = {
                    "asked": plan.compression.mode,
                    "used": "none",
                    "reason": "forbidden by this site's egress.forbid_compression",
                }
            if plan.compression is not None and compression is None:
                data, compression, residual = self._compress(round_id, plan, filtered)
            else:
                data = encode_weights(filtered, plan.transfer_dtype)
        except WeightError as exc:
            raise EgressError(f"update refused: {exc}") from None
        details: dict[str, Any] = {
            "round_id": round_id,
            "plan_hash": plan_hash(plan),
            "kind": kind,
            "tensors": len(filtered),
            "transfer_dtype": plan.transfer_dtype,
            "filters": filters,
        }
        if compression is not None:
            details["compression"] = compression
        digest = self._record_and_write(EGRESS_ACTION, path, data, details)
        if residual is not None:
            # After the release is on record: a failed audit leaves the residual as it was.
            self.residual_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_bytes(residual[0], residual[1])  # mkstemp: 0600
        return Released(sha256=digest, nbytes=len(data), path=path, filters=filters)

    def residual_path(self, plan: Plan) -> Path:
        """Where error feedback keeps what earlier rounds of this requester's run did not send."""
        assert plan.compression is not None
        key = {
            "requester": self.requester,
            "dataset": plan.dataset,
            "model": plan.model.model_dump(mode="json"),
            "compression": plan.compression.model_dump(mode="json"),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.residual_dir / f"{digest}.safetensors"

    def _compress(
        self, round_id: str, plan: Plan, diff: dict[str, torch.Tensor]
    ) -> tuple[bytes, dict[str, Any], tuple[Path, bytes] | None]:
        """The compressed payload, its audit details, and the residual to keep (int8_topk)."""
        spec_model = plan.compression
        assert spec_model is not None
        spec = Compression(
            mode=spec_model.mode,
            scale=spec_model.scale,
            rounding=spec_model.rounding,
            topk_fraction=spec_model.topk_fraction,
        )
        details: dict[str, Any] = {"used": spec.mode, **spec_model.model_dump(mode="json")}
        previous: dict[str, torch.Tensor] | None = None
        path: Path | None = None
        if spec.mode == "int8_topk":
            path = self.residual_path(plan)
            before: str | None = None
            if path.is_file():
                raw = path.read_bytes()
                before = hashlib.sha256(raw).hexdigest()
                try:
                    previous = decode_weights(raw, expected=expected_shapes(plan), max_bytes=len(raw) + 1)
                except WeightError as exc:
                    # The site's own file, unreadable: start again from nothing, on record.
                    details["residual_reset"] = f"unreadable residual: {exc}"
                    previous = None
            details["residual"] = {"key": path.stem, "sha256_before": before}
        # Seeded by the round: a rerun of the round sends the same bytes.
        data, kept = compress(diff, spec, seed_material=round_id, residual=previous)
        if kept is None or path is None:
            return data, details, None
        kept_bytes = encode_weights(kept)
        details["residual"]["sha256_after"] = hashlib.sha256(kept_bytes).hexdigest()
        return data, details, (path, kept_bytes)

    def _apply_filters(
        self,
        plan: Plan,
        update: Mapping[str, torch.Tensor],
        global_weights: Mapping[str, torch.Tensor] | None,
        kind: str,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        patterns = list(dict.fromkeys([*self.config.exclude_parameters, *plan.privacy.exclude_parameters]))
        norms = [n for n in (self.config.clip_norm, plan.privacy.clip_norm) if n is not None]
        clip = min(norms) if norms else None
        filters: dict[str, Any] = {}
        if not patterns and clip is None:
            return {n: t.detach().cpu().clone() for n, t in update.items()}, filters
        if kind == "weights" and global_weights is None:
            raise EgressError(
                "egress filters (exclude_parameters / clip_norm) on a 'weights' update need the global "
                "weights; this round has none (init 'random')"
            )
        # Work on the difference to the global weights: both filters are defined on it.
        if kind == "diff":
            diff = {n: t.detach().cpu().clone() for n, t in update.items()}
        else:
            assert global_weights is not None
            diff = {n: update[n].detach().cpu() - global_weights[n].detach().cpu() for n in update}
        if patterns:
            excluded = sorted(n for n in diff if any(fnmatch.fnmatchcase(n, p) for p in patterns))
            for name in excluded:
                diff[name].zero_()
            filters["exclude_parameters"] = {"patterns": patterns, "excluded_tensors": len(excluded)}
        if clip is not None:
            norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in diff.values()))
            scale = min(1.0, clip / norm) if norm > 0 else 1.0
            if scale < 1.0:
                for t in diff.values():
                    t.mul_(scale)
            filters["clip_norm"] = {"max_norm": clip, "norm": norm, "clipped": scale < 1.0}
        if kind == "diff":
            return diff, filters
        assert global_weights is not None
        return {n: global_weights[n].detach().cpu().float() + diff[n] for n in diff}, filters

    def held_path(self, round_id: str) -> Path:
        _check_round_id(round_id)
        return self.held_dir / round_id / "update.safetensors"

    def _hold(
        self, round_id: str, plan: Plan, filtered: dict[str, torch.Tensor], filters: dict[str, Any]
    ) -> Released:
        """Keep a secure round's filtered update at the site: encoded in float32, hashed,
        recorded as `egress.held`, written 0600 where only the protocol reads it."""
        try:
            data = encode_weights(filtered, "float32")
        except WeightError as exc:
            raise EgressError(f"update refused: {exc}") from None
        details = {
            "round_id": round_id,
            "plan_hash": plan_hash(plan),
            "tensors": len(filtered),
            "filters": filters,
            "reason": "secure aggregation: only the masked update leaves",
        }
        path = self.held_path(round_id)
        digest = self._record_and_write(HELD_ACTION, path, data, details, private=True)
        return Released(sha256=digest, nbytes=len(data), path=path, filters=filters, held=True)

    def _record_and_write(
        self, action: str, path: Path, data: bytes, details: dict[str, Any], *, private: bool = False
    ) -> str:
        """Hash DATA, record ACTION with DETAILS plus its size and hash, then write it to PATH
        (atomically; in a 0700 folder when PRIVATE). Nothing is written if the record fails."""
        digest = hashlib.sha256(data).hexdigest()
        self.audit.append(action, actor=ACTOR, details={**details, "bytes": len(data), "sha256": digest})
        if private:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)  # mkstemp: 0600
        return digest

    @staticmethod
    def _read_recorded(round_id: str, path: Path, sha: str, what: str) -> bytes:
        """PATH's bytes, only if their SHA-256 is SHA (what the audit log recorded for them)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise EgressError(f"round {round_id}: the {what} file is missing") from None
        if hashlib.sha256(data).hexdigest() != sha:
            raise EgressError(f"round {round_id}: the {what} file does not match the hash recorded; refused")
        return data

    def read_held(self, round_id: str) -> bytes:
        """A secure round's held update, only if it is exactly what `hold` recorded."""
        path = self.held_path(round_id)
        events = self.audit.find(HELD_ACTION, round_id=round_id)
        sha = events[-1].get("details", {}).get("sha256") if events else None
        if not isinstance(sha, str):
            raise EgressError(f"round {round_id}: no update is held for secure aggregation")
        return self._read_recorded(round_id, path, sha, "held update")

    def release_masked(
        self, *, round_id: str, plan: Plan, masked: np.ndarray, details: Mapping[str, Any]
    ) -> Released:
        """Release a secure round's masked vector: encode, hash, audit (`egress.update`, kind
        ``masked``, with DETAILS: the protocol's counts), write to the outbox. Once per round."""
        path = self.path_for(round_id)
        if plan.aggregation is None:
            raise EgressError(f"round {round_id}: a masked update belongs to a secure round only")
        if self.audit.find(EGRESS_ACTION, round_id=round_id):
            raise EgressError(f"round {round_id}: an update was already released; a round releases once")
        try:
            data = encode_masked(masked)
        except WeightError as exc:
            raise EgressError(f"masked update refused: {exc}") from None
        record = {
            "round_id": round_id,
            "plan_hash": plan_hash(plan),
            "kind": "masked",
            "tensors": 1,
            "elements": int(masked.size),
            **dict(details),
        }
        digest = self._record_and_write(EGRESS_ACTION, path, data, record)
        return Released(sha256=digest, nbytes=len(data), path=path)

    def recorded_sha256(self, round_id: str) -> str:
        """The hash recorded by the most recent release for ``round_id``."""
        _check_round_id(round_id)
        events = self.audit.find(EGRESS_ACTION, round_id=round_id)
        if not events:
            raise EgressError(f"round {round_id}: no update was released through the egress gate")
        sha = events[-1].get("details", {}).get("sha256")
        if not isinstance(sha, str):
            raise EgressError(f"round {round_id}: the release record carries no hash")
        return sha

    def read_released(self, round_id: str) -> bytes:
        """The released update's bytes, only if they are exactly what the gate recorded."""
        return self._read_recorded(
            round_id, self.path_for(round_id), self.recorded_sha256(round_id), "released update"
        )
