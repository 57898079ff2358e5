"""Egress-gate behaviour that a mutation run (`make mutation`) showed no test noticed.

The global weights are checked like the update, every refusal says what it refused, the
audit record and the returned `Released` carry the whole release, and clipping acts exactly
when the difference is longer than the bound, however short both are.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agent.config import EgressConfig
from agent.errors import EgressError
from agent.exchange.codec import decode_weights
from agent.exchange.egress import EGRESS_ACTION, EgressGate
from agent.training.registry import expected_shapes
from tests.exchange.test_egress import LIMIT, MemorySink, _norm, _trained
from tests.fixtures.training import tiny_plan


def test_an_unknown_update_kind_is_named(tmp_path: Path) -> None:
    start, local = _trained()
    gate = EgressGate(MemorySink(), tmp_path / "outbox")
    with pytest.raises(EgressError) as err:
        gate.release(round_id="r", plan=tiny_plan(), update=local, global_weights=start, kind="all")  # type: ignore[arg-type]
    assert str(err.value) == "update kind 'all' must be 'weights' or 'diff'"


def test_global_weights_that_are_not_the_plans_model_are_refused(tmp_path: Path) -> None:
    start, local = _trained()
    name = sorted(start)[0]
    del start[name]
    sink = MemorySink()
    gate = EgressGate(sink, tmp_path / "outbox")
    with pytest.raises(EgressError) as err:
        gate.release(round_id="r", plan=tiny_plan(), update=local, global_weights=start, kind="weights")
    assert str(err.value) == f"update refused: missing tensors: {name!r}"
    assert sink.events == []


def test_an_encoding_failure_is_an_egress_error_naming_the_tensor(tmp_path: Path) -> None:
    start, local = _trained()
    name = sorted(local)[0]
    local[name] = local[name].clone()
    local[name].view(-1)[0] = 1e6  # beyond float16
    gate = EgressGate(MemorySink(), tmp_path / "outbox")
    with pytest.raises(EgressError) as err:
        gate.release(
            round_id="r",
            plan=tiny_plan(transfer_dtype="float16"),
            update=local,
            global_weights=start,
            kind="weights",
        )
    assert str(err.value) == f"update refused: tensor {name!r}: values overflow the transfer dtype float16"


def test_the_record_and_the_result_carry_the_whole_release(tmp_path: Path) -> None:
    start, local = _trained()
    sink = MemorySink()
    outbox = tmp_path / "not" / "yet" / "made"
    gate = EgressGate(sink, outbox, EgressConfig(clip_norm=1e9))
    plan = tiny_plan(transfer_dtype="float16")
    released = gate.release(round_id="r", plan=plan, update=local, global_weights=start, kind="weights")
    assert released.path == outbox / "r.safetensors" and released.path.is_file()
    [event] = sink.events
    details = event["details"]
    assert details["kind"] == "weights" and details["transfer_dtype"] == "float16"
    assert set(details) == {
        "round_id", "plan_hash", "kind", "tensors", "bytes", "sha256", "transfer_dtype", "filters"
    }  # fmt: skip
    assert released.filters == details["filters"] == {
        "clip_norm": {"max_norm": 1e9, "norm": pytest.approx(_norm({n: local[n] - start[n] for n in local})),
                      "clipped": False}
    }  # fmt: skip


def test_a_release_record_without_a_hash_serves_nothing(tmp_path: Path) -> None:
    sink = MemorySink()
    sink.append(EGRESS_ACTION, actor="someone", details={"round_id": "r"})
    with pytest.raises(EgressError) as err:
        EgressGate(sink, tmp_path / "outbox").read_released("r")
    assert str(err.value) == "round r: the release record carries no hash"


def test_a_short_difference_is_clipped_and_an_equal_one_is_left_alone(tmp_path: Path) -> None:
    start, _ = _trained()
    g = torch.Generator().manual_seed(5)
    local = {n: t + 1e-5 * torch.randn(t.shape, generator=g) for n, t in start.items()}
    norm = _norm({n: local[n] - start[n] for n in local})
    assert 0 < norm < 1
    plan = tiny_plan()
    sink = MemorySink()
    gate = EgressGate(sink, tmp_path / "outbox", EgressConfig(clip_norm=norm / 2))
    gate.release(round_id="a", plan=plan, update=local, global_weights=start, kind="weights")
    assert sink.events[-1]["details"]["filters"]["clip_norm"]["clipped"] is True
    sent = decode_weights(gate.read_released("a"), expected=expected_shapes(plan), max_bytes=LIMIT)
    assert _norm({n: sent[n].double() - start[n].double() for n in sent}) == pytest.approx(norm / 2, rel=1e-2)
    # No difference at all: nothing to scale, and no division by its zero length.
    gate.release(round_id="b", plan=plan, update=start, global_weights=start, kind="weights")
    assert sink.events[-1]["details"]["filters"]["clip_norm"] == {
        "max_norm": norm / 2,
        "norm": 0.0,
        "clipped": False,
    }
