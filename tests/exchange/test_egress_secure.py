"""The egress gate in a secure-aggregation round: the update is held at the site, only the
masked vector is released (once), and each is served only while it matches its record."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from agent.errors import EgressError
from agent.exchange.codec import decode_masked, decode_weights
from agent.exchange.egress import EGRESS_ACTION, HELD_ACTION, EgressGate
from tests.exchange.test_egress import MemorySink, _trained
from tests.fixtures.training import tiny_plan

SECURE = {"mode": "secure", "threshold": 2, "clip": 0.5, "max_weight": 100}


def _gate(tmp_path: Path) -> tuple[EgressGate, MemorySink]:
    sink = MemorySink()
    return EgressGate(sink, tmp_path / "work" / "outbox"), sink


def test_a_secure_rounds_update_is_held_not_released(tmp_path: Path) -> None:
    gate, sink = _gate(tmp_path)
    plan = tiny_plan(send="diff", aggregation=SECURE, round_id="r1")
    start, local = _trained()
    diff = {n: local[n] - start[n] for n in local}
    held = gate.release(round_id="r1", plan=plan, update=diff, global_weights=start, kind="diff")
    assert held.held and held.path == tmp_path / "work" / "secagg" / "r1" / "update.safetensors"
    assert stat.S_IMODE(held.path.stat().st_mode) == 0o600
    assert not gate.path_for("r1").exists() and not sink.find(EGRESS_ACTION)
    [event] = sink.find(HELD_ACTION, round_id="r1")
    assert event["details"]["sha256"] == held.sha256
    back = decode_weights(gate.read_held("r1"), expected=None, max_bytes=1 << 26)
    assert all(bool((back[n] == diff[n]).all()) for n in diff)
    with pytest.raises(EgressError, match="no update was released"):
        gate.read_released("r1")
    held.path.write_bytes(held.path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(EgressError, match="does not match the hash recorded"):
        gate.read_held("r1")


def test_the_masked_vector_is_released_once_and_served_as_recorded(tmp_path: Path) -> None:
    gate, sink = _gate(tmp_path)
    plan = tiny_plan(send="diff", aggregation=SECURE, round_id="r2")
    masked = np.arange(1, 11, dtype=np.uint32) * np.uint32(400_000_000)
    released = gate.release_masked(round_id="r2", plan=plan, masked=masked, details={"survivors": 3})
    [event] = sink.find(EGRESS_ACTION, round_id="r2")
    assert event["details"]["kind"] == "masked" and event["details"]["sha256"] == released.sha256
    data = gate.read_released("r2")
    assert (decode_masked(data, length=10, max_bytes=1 << 20) == masked).all()
    with pytest.raises(EgressError, match="a round releases once"):
        gate.release_masked(round_id="r2", plan=plan, masked=masked + np.uint32(1), details={})
    plain = tiny_plan(round_id="r3")
    with pytest.raises(EgressError, match="secure round only"):
        gate.release_masked(round_id="r3", plan=plain, masked=masked, details={})
