"""The egress gate: only the plan's tensors leave, filtered, hashed and recorded first."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from agent.audit.chain import AuditLog
from agent.config import EgressConfig
from agent.errors import EgressError
from agent.exchange.codec import decode_weights
from agent.exchange.egress import EGRESS_ACTION, EgressGate
from agent.training.plan import plan_hash
from agent.training.registry import expected_shapes
from tests.fixtures.training import initial_weights, tiny_plan

LIMIT = 1 << 26


class MemorySink:
    """The AuditSink protocol over a list, with the audit log's `find` semantics."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def append(self, action: str, *, actor: str, details: dict[str, Any]) -> int:
        self.events.append({"id": len(self.events) + 1, "action": action, "actor": actor, "details": details})
        return len(self.events)

    def find(self, action: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["action"] == action and all(e["details"].get(k) == v for k, v in match.items())
        ]


class FailingSink(MemorySink):
    def append(self, action: str, *, actor: str, details: dict[str, Any]) -> int:
        raise RuntimeError("audit database unavailable")


def _trained(seed: int = 11) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(global, locally changed) weights of the tiny plan's model."""
    plan = tiny_plan()
    start = initial_weights(plan, seed)
    g = torch.Generator().manual_seed(seed)
    local = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in start.items()}
    return start, local


def _norm(state: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in state.values())))


def test_release_records_then_writes_and_read_released_serves_exactly_that(tmp_path: Path) -> None:
    plan = tiny_plan(round_id="r-1")
    start, local = _trained()
    sink = MemorySink()
    gate = EgressGate(sink, tmp_path / "outbox")
    released = gate.release(round_id="r-1", plan=plan, update=local, global_weights=start, kind="weights")
    data = gate.read_released("r-1")
    assert hashlib.sha256(data).hexdigest() == released.sha256
    assert released.nbytes == len(data) and released.path == tmp_path / "outbox" / "r-1.safetensors"
    [event] = sink.events
    assert event["action"] == EGRESS_ACTION
    details = event["details"]
    assert details["round_id"] == "r-1" and details["plan_hash"] == plan_hash(plan)
    assert details["sha256"] == released.sha256 and details["bytes"] == len(data)
    assert details["tensors"] == len(expected_shapes(plan)) and details["filters"] == {}
    back = decode_weights(data, expected=expected_shapes(plan), max_bytes=LIMIT)
    assert all(torch.equal(back[n], local[n]) for n in local)
    assert not list((tmp_path / "outbox").glob(".*tmp"))


def test_update_endpoint_can_only_serve_what_the_gate_released(tmp_path: Path) -> None:
    plan = tiny_plan()
    start, local = _trained()
    gate = EgressGate(MemorySink(), tmp_path / "outbox")
    gate.release(round_id="r-1", plan=plan, update=local, global_weights=start, kind="weights")
    path = tmp_path / "outbox" / "r-1.safetensors"
    # Changed after release (one flipped byte), so refused.
    original = path.read_bytes()
    tampered = bytearray(original)
    tampered[-1] ^= 0x01
    path.write_bytes(bytes(tampered))
    with pytest.raises(EgressError, match="released update file does not match the hash recorded"):
        gate.read_released("r-1")
    path.write_bytes(original)
    assert gate.read_released("r-1") == original
    # A file that did not come through the gate: no record, refused.
    (tmp_path / "outbox" / "r-2.safetensors").write_bytes(original)
    with pytest.raises(EgressError, match="no update was released"):
        gate.read_released("r-2")
    # Released but the file has gone.
    path.unlink()
    with pytest.raises(EgressError, match="file is missing"):
        gate.read_released("r-1")
    for bad in ("../r-1", "r/1", "", ".hidden"):
        with pytest.raises(EgressError, match="not valid"):
            gate.read_released(bad)


def test_nothing_is_written_when_the_audit_record_fails(tmp_path: Path) -> None:
    start, local = _trained()
    gate = EgressGate(FailingSink(), tmp_path / "outbox")
    with pytest.raises(RuntimeError, match="audit database unavailable"):
        gate.release(round_id="r-1", plan=tiny_plan(), update=local, global_weights=start, kind="weights")
    assert not (tmp_path / "outbox" / "r-1.safetensors").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop(next(iter(s))), "missing tensors"),
        (
            lambda s: s.update({"extra.weight": torch.zeros(2)}),
            "unknown tensors not in the plan's model: 'extra.weight'",
        ),
        (lambda s: s.update({k: torch.zeros(1) for k in list(s)[:1]}), "shape"),
        (lambda s: s.update({k: v.double() for k, v in list(s.items())[:1]}), "dtype torch.float64"),
        (lambda s: next(iter(s.values())).view(-1).__setitem__(0, float("inf")), "NaN or Inf"),
    ],
    ids=["missing", "extra", "shape", "dtype", "inf"],
)
def test_only_the_plans_tensors_leave(tmp_path: Path, change: Any, message: str) -> None:
    start, local = _trained()
    change(local)
    sink = MemorySink()
    gate = EgressGate(sink, tmp_path / "outbox")
    with pytest.raises(EgressError, match=message):
        gate.release(round_id="r-1", plan=tiny_plan(), update=local, global_weights=start, kind="weights")
    assert sink.events == []
    assert not (tmp_path / "outbox").exists()


def test_excluded_parameters_are_zeroed_in_diffs_and_global_in_weights(tmp_path: Path) -> None:
    start, local = _trained()
    diff = {n: local[n] - start[n] for n in local}
    excluded = [n for n in local if n.startswith("model.0.")]
    assert excluded and len(excluded) < len(local)
    sink = MemorySink()
    gate = EgressGate(sink, tmp_path / "outbox", EgressConfig(exclude_parameters=["model.0.*"]))
    plan = tiny_plan(send="diff")
    gate.release(round_id="d", plan=plan, update=diff, global_weights=start, kind="diff")
    sent = decode_weights(gate.read_released("d"), expected=expected_shapes(plan), max_bytes=LIMIT)
    for name in local:
        if name in excluded:
            assert not sent[name].any()
        else:
            assert torch.equal(sent[name], diff[name])
    gate.release(round_id="w", plan=tiny_plan(), update=local, global_weights=start, kind="weights")
    sent = decode_weights(gate.read_released("w"), expected=expected_shapes(plan), max_bytes=LIMIT)
    for name in local:
        assert torch.equal(sent[name], start[name] if name in excluded else local[name])
    assert sink.events[0]["details"]["filters"] == {
        "exclude_parameters": {"patterns": ["model.0.*"], "excluded_tensors": len(excluded)}
    }


def test_clip_norm_bounds_the_difference_and_plans_can_only_tighten_it(tmp_path: Path) -> None:
    start, local = _trained()
    diff_norm = _norm({n: local[n] - start[n] for n in local})
    sink = MemorySink()
    gate = EgressGate(sink, tmp_path / "outbox", EgressConfig(clip_norm=diff_norm / 2))
    gate.release(round_id="a", plan=tiny_plan(), update=local, global_weights=start, kind="weights")
    sent = decode_weights(gate.read_released("a"), expected=expected_shapes(tiny_plan()), max_bytes=LIMIT)
    assert _norm({n: sent[n] - start[n] for n in sent}) == pytest.approx(diff_norm / 2, rel=1e-4)
    filters = sink.events[-1]["details"]["filters"]["clip_norm"]
    assert filters["clipped"] is True and filters["norm"] == pytest.approx(diff_norm)
    # A plan asking for a looser bound gets the site's; a tighter one is honoured.
    loose = tiny_plan(privacy={"clip_norm": diff_norm * 10})
    gate.release(round_id="b", plan=loose, update=local, global_weights=start, kind="weights")
    assert sink.events[-1]["details"]["filters"]["clip_norm"]["max_norm"] == pytest.approx(diff_norm / 2)
    tight = tiny_plan(send="diff", privacy={"clip_norm": diff_norm / 4})
    diff = {n: local[n] - start[n] for n in local}
    gate.release(round_id="c", plan=tight, update=diff, global_weights=start, kind="diff")
    sent = decode_weights(gate.read_released("c"), expected=expected_shapes(tight), max_bytes=LIMIT)
    assert _norm(sent) == pytest.approx(diff_norm / 4, rel=1e-4)
    # Under the bound nothing changes.
    open_gate = EgressGate(MemorySink(), tmp_path / "outbox2", EgressConfig(clip_norm=diff_norm * 2))
    open_gate.release(round_id="d", plan=tiny_plan(), update=local, global_weights=start, kind="weights")
    sent = decode_weights(
        open_gate.read_released("d"), expected=expected_shapes(tiny_plan()), max_bytes=LIMIT
    )
    assert all(torch.allclose(sent[n], local[n], atol=1e-6) for n in local)


def test_filters_on_weights_without_global_weights_are_refused(tmp_path: Path) -> None:
    _, local = _trained()
    gate = EgressGate(MemorySink(), tmp_path / "outbox", EgressConfig(clip_norm=1.0))
    with pytest.raises(EgressError, match="need the global weights"):
        gate.release(
            round_id="r", plan=tiny_plan(init="random"), update=local, global_weights=None, kind="weights"
        )


def test_update_kind_must_match_the_plan(tmp_path: Path) -> None:
    start, local = _trained()
    gate = EgressGate(MemorySink(), tmp_path / "outbox")
    with pytest.raises(EgressError, match="differs from the plan's send 'weights'"):
        gate.release(round_id="r", plan=tiny_plan(), update=local, global_weights=start, kind="diff")


def test_float16_transfer_halves_the_bytes(tmp_path: Path) -> None:
    start, local = _trained()
    gate = EgressGate(MemorySink(), tmp_path / "outbox")
    full = gate.release(round_id="a", plan=tiny_plan(), update=local, global_weights=start, kind="weights")
    half = gate.release(
        round_id="b",
        plan=tiny_plan(transfer_dtype="float16"),
        update=local,
        global_weights=start,
        kind="weights",
    )
    assert half.nbytes < full.nbytes * 0.6
    back = decode_weights(gate.read_released("b"), expected=expected_shapes(tiny_plan()), max_bytes=LIMIT)
    assert all(back[n].dtype == torch.float32 and torch.allclose(back[n], local[n], atol=2e-3) for n in local)


def test_with_the_hash_chained_audit_log(tmp_path: Path, audit_log: AuditLog) -> None:
    start, local = _trained()
    gate = EgressGate(audit_log, tmp_path / "outbox")
    first = gate.release(round_id="r-1", plan=tiny_plan(), update=local, global_weights=start, kind="weights")
    # A re-released round (e.g. after a resumed round) serves the latest release only.
    _, other = _trained(seed=12)
    second = gate.release(
        round_id="r-1", plan=tiny_plan(), update=other, global_weights=start, kind="weights"
    )
    assert first.sha256 != second.sha256
    assert hashlib.sha256(gate.read_released("r-1")).hexdigest() == second.sha256
    assert [e["details"]["sha256"] for e in audit_log.find(EGRESS_ACTION, round_id="r-1")] == [
        first.sha256,
        second.sha256,
    ]
    assert audit_log.verify().ok
