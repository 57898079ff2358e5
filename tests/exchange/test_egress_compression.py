"""The egress gate with a plan that asks for compression: what leaves, what is recorded, what
the site keeps for error feedback, and what a site that forbids a mode sends instead."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from agent.config import EgressConfig
from agent.errors import EgressError
from agent.exchange.codec import decode_weights, encode_weights
from agent.exchange.compression import decode_update
from agent.exchange.egress import EGRESS_ACTION, EgressGate
from agent.training.plan import parse_plan
from agent.training.registry import expected_shapes
from tests.exchange.test_egress import MemorySink, _trained
from tests.fixtures.training import tiny_plan_dict

LIMIT = 1 << 26


def _plan(round_id: str, **compression: Any) -> Any:
    return parse_plan(tiny_plan_dict(round_id=round_id, send="diff", compression=compression))


def _body(payload: bytes) -> int:
    return len(payload) - 8 - int.from_bytes(payload[:8], "little")


def _diff(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    start, local = _trained(seed)
    return start, {n: local[n] - start[n] for n in local}


def test_int8_release_is_compressed_recorded_and_decodes_to_the_difference(tmp_path: Path) -> None:
    plan = _plan("r-1", mode="int8")
    start, diff = _diff(3)
    sink = MemorySink()
    gate = EgressGate(sink, tmp_path / "outbox")
    released = gate.release(round_id="r-1", plan=plan, update=diff, global_weights=start, kind="diff")
    data = gate.read_released("r-1")
    assert hashlib.sha256(data).hexdigest() == released.sha256
    plain = encode_weights(diff)
    # The tensor bytes: a quarter plus the scales (the JSON headers of so tiny a model weigh
    # more than its tensors; benchmarks/compression.py measures a real one).
    assert _body(data) < 0.3 * _body(plain)
    [event] = sink.find(EGRESS_ACTION)
    comp = event["details"]["compression"]
    assert comp["used"] == "int8" and comp["scale"] == "channel" and comp["rounding"] == "deterministic"
    assert "residual" not in comp  # int8 alone keeps nothing at the site
    back = decode_update(data, expected=expected_shapes(plan), max_bytes=LIMIT)
    for name in diff:
        step = float(diff[name].abs().max()) / 127
        assert float((back[name] - diff[name]).abs().max()) <= step / 2 + 1e-7
    assert not (tmp_path / "compression").exists()


def test_topk_residual_is_kept_between_rounds_and_on_record(tmp_path: Path) -> None:
    gate = EgressGate(MemorySink(), tmp_path / "outbox", requester="coordinator-a")
    spec = {"mode": "int8_topk", "topk_fraction": 0.05, "scale": "tensor"}
    start, first = _diff(4)
    _, second = _diff(5)
    plan1, plan2 = _plan("r-1", **spec), _plan("r-2", **spec)
    gate.release(round_id="r-1", plan=plan1, update=first, global_weights=start, kind="diff")
    residual_file = gate.residual_path(plan1)
    assert residual_file == gate.residual_path(plan2)  # the same run's rounds share it
    assert residual_file.stat().st_mode & 0o077 == 0
    raw1 = residual_file.read_bytes()
    residual1 = decode_weights(raw1, expected=expected_shapes(plan1), max_bytes=LIMIT)
    sent1 = decode_update(gate.read_released("r-1"), expected=expected_shapes(plan1), max_bytes=LIMIT)
    for name in first:
        torch.testing.assert_close(sent1[name] + residual1[name], first[name], rtol=0, atol=1e-6)

    gate.release(round_id="r-2", plan=plan2, update=second, global_weights=start, kind="diff")
    raw2 = residual_file.read_bytes()
    residual2 = decode_weights(raw2, expected=expected_shapes(plan2), max_bytes=LIMIT)
    sent2 = decode_update(gate.read_released("r-2"), expected=expected_shapes(plan2), max_bytes=LIMIT)
    # The second round carried part of what the first kept back: residual in, residual out.
    for name in second:
        torch.testing.assert_close(
            sent2[name] + residual2[name], second[name] + residual1[name], rtol=0, atol=1e-6
        )
    events = [e["details"]["compression"]["residual"] for e in gate.audit.find(EGRESS_ACTION)]
    assert events[0]["sha256_before"] is None
    assert events[0]["sha256_after"] == hashlib.sha256(raw1).hexdigest() == events[1]["sha256_before"]
    assert events[1]["sha256_after"] == hashlib.sha256(raw2).hexdigest()


def test_each_requester_keeps_its_own_residual(tmp_path: Path) -> None:
    plan = _plan("r-1", mode="int8_topk", topk_fraction=0.1)
    a = EgressGate(MemorySink(), tmp_path / "outbox", requester="coordinator-a")
    b = EgressGate(MemorySink(), tmp_path / "outbox", requester="coordinator-b")
    assert a.residual_path(plan) != b.residual_path(plan)


def test_an_unreadable_residual_is_reset_on_record(tmp_path: Path) -> None:
    plan = _plan("r-1", mode="int8_topk", topk_fraction=0.1)
    sink = MemorySink()
    gate = EgressGate(sink, tmp_path / "outbox")
    path = gate.residual_path(plan)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not safetensors")
    start, diff = _diff(6)
    gate.release(round_id="r-1", plan=plan, update=diff, global_weights=start, kind="diff")
    comp = sink.find(EGRESS_ACTION)[0]["details"]["compression"]
    assert "unreadable residual" in comp["residual_reset"]
    assert comp["residual"]["sha256_before"] == hashlib.sha256(b"not safetensors").hexdigest()
    decode_weights(path.read_bytes(), expected=expected_shapes(plan), max_bytes=LIMIT)


@pytest.mark.parametrize("mode", ["int8", "int8_topk"])
def test_a_forbidden_mode_sends_the_difference_uncompressed_and_says_why(tmp_path: Path, mode: str) -> None:
    spec: dict[str, Any] = {"mode": mode, **({"topk_fraction": 0.1} if mode == "int8_topk" else {})}
    plan = _plan("r-1", **spec)
    sink = MemorySink()
    gate = EgressGate(sink, tmp_path / "outbox", EgressConfig(forbid_compression=[mode]))  # type: ignore[list-item]
    start, diff = _diff(7)
    gate.release(round_id="r-1", plan=plan, update=diff, global_weights=start, kind="diff")
    comp = sink.find(EGRESS_ACTION)[0]["details"]["compression"]
    assert comp == {
        "asked": mode,
        "used": "none",
        "reason": "forbidden by this site's egress.forbid_compression",
    }
    back = decode_weights(gate.read_released("r-1"), expected=expected_shapes(plan), max_bytes=LIMIT)
    assert all(torch.equal(back[n], diff[n]) for n in diff)
    assert not (tmp_path / "compression").exists()


def test_filters_apply_before_compression(tmp_path: Path) -> None:
    plan = _plan("r-1", mode="int8")
    start, diff = _diff(8)
    sink = MemorySink()
    gate = EgressGate(sink, tmp_path / "outbox", EgressConfig(exclude_parameters=["model.0.*"]))
    gate.release(round_id="r-1", plan=plan, update=diff, global_weights=start, kind="diff")
    back = decode_update(gate.read_released("r-1"), expected=expected_shapes(plan), max_bytes=LIMIT)
    excluded = [n for n in back if n.startswith("model.0.")]
    assert excluded and all(float(back[n].abs().max()) == 0.0 for n in excluded)


def test_plans_check_their_compression() -> None:
    with pytest.raises(ValueError, match="compression needs send 'diff'"):
        parse_plan(tiny_plan_dict(compression={"mode": "int8"}))
    with pytest.raises(ValueError, match="needs topk_fraction"):
        parse_plan(tiny_plan_dict(send="diff", compression={"mode": "int8_topk"}))
    with pytest.raises(ValueError, match="applies to mode 'int8_topk' only"):
        parse_plan(tiny_plan_dict(send="diff", compression={"mode": "int8", "topk_fraction": 0.1}))
    with pytest.raises(ValueError, match="topk_fraction"):
        parse_plan(tiny_plan_dict(send="diff", compression={"mode": "int8_topk", "topk_fraction": 0}))
    with pytest.raises(EgressError, match="differs from the plan's send"):
        EgressGate(MemorySink(), Path("/nonexistent")).release(
            round_id="r-1", plan=_plan("r-1", mode="int8"), update={}, global_weights=None, kind="weights"
        )
