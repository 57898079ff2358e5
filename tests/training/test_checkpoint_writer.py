"""Epoch checkpoints written in the background: in order, one at a time, whole when a round
stops, failures raised, and training not held up by the disk."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from agent.training import checkpoint_writer
from agent.training.checkpoint_writer import CheckpointWriter, snapshot
from agent.training.engine import CHECKPOINT_NAME, train_round
from tests.fixtures.training import context, initial_weights, make_items, tiny_plan

WAIT_S = 10.0


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata() or {}


def test_a_snapshot_is_a_copy_that_later_steps_cannot_change() -> None:
    live = torch.arange(4.0)
    copy = snapshot(live)
    live.add_(1.0)
    assert torch.equal(copy, torch.arange(4.0))


def test_the_last_submitted_checkpoint_is_on_disk_when_the_block_ends(tmp_path: Path) -> None:
    path = tmp_path / CHECKPOINT_NAME
    with CheckpointWriter(path) as writer:
        for epoch in (1, 2, 3):
            writer.submit({"model.w": torch.full((3,), float(epoch))}, {"epoch": str(epoch)})
    assert _meta(path)["epoch"] == "3"
    assert torch.equal(load_file(str(path))["model.w"], torch.full((3,), 3.0))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_one_write_at_a_time_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    release = {e: threading.Event() for e in ("1", "2")}
    second_started = threading.Event()
    original = checkpoint_writer.write_checkpoint

    def slow(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        started.append(metadata["epoch"])
        if metadata["epoch"] == "2":
            second_started.set()
        assert release[metadata["epoch"]].wait(WAIT_S)
        original(path, tensors, metadata)

    monkeypatch.setattr(checkpoint_writer, "write_checkpoint", slow)
    path = tmp_path / CHECKPOINT_NAME
    with CheckpointWriter(path) as writer:
        writer.submit({"w": torch.zeros(1)}, {"epoch": "1"})
        second = threading.Thread(target=writer.submit, args=({"w": torch.ones(1)}, {"epoch": "2"}))
        second.start()
        # The second submit waits for the first write: it has not started, nor returned.
        second.join(0.3)
        assert second.is_alive() and started == ["1"]
        release["1"].set()
        second.join(WAIT_S)
        assert not second.is_alive() and second_started.wait(WAIT_S) and started == ["1", "2"]
        release["2"].set()
    assert _meta(path)["epoch"] == "2"


def _full_disk(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every checkpoint write fails as on a full disk; the path to give the writer."""
    monkeypatch.setattr(checkpoint_writer, "write_checkpoint", _full_disk)
    return tmp_path / CHECKPOINT_NAME


def test_a_failed_write_is_raised_at_the_next_submit_and_at_the_end(full_disk: Path) -> None:
    with pytest.raises(OSError, match="No space left"), CheckpointWriter(full_disk) as writer:
        writer.submit({"w": torch.zeros(1)}, {"epoch": "1"})
        with pytest.raises(OSError, match="No space left"):
            writer.submit({"w": torch.zeros(1)}, {"epoch": "2"})
        # Raised once: the next write is taken, and its failure ends the block.
        writer.submit({"w": torch.zeros(1)}, {"epoch": "3"})
    assert not full_disk.exists()


def test_an_exception_that_ends_the_block_is_kept_over_a_failed_write(full_disk: Path) -> None:
    with pytest.raises(KeyError, match="the round's own error"), CheckpointWriter(full_disk) as writer:
        writer.submit({"w": torch.zeros(1)}, {"epoch": "1"})
        raise KeyError("the round's own error")


def test_a_block_ended_by_an_exception_still_finishes_the_write_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = checkpoint_writer.write_checkpoint
    go = threading.Event()

    def slow(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        assert go.wait(WAIT_S)
        original(path, tensors, metadata)

    monkeypatch.setattr(checkpoint_writer, "write_checkpoint", slow)
    path = tmp_path / CHECKPOINT_NAME
    threading.Timer(0.2, go.set).start()
    with pytest.raises(RuntimeError, match="cancelled"), CheckpointWriter(path) as writer:
        writer.submit({"w": torch.zeros(1)}, {"epoch": "4"})
        raise RuntimeError("cancelled")
    assert _meta(path)["epoch"] == "4"


def test_submit_outside_the_block_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="outside its with block"):
        CheckpointWriter(tmp_path / CHECKPOINT_NAME).submit({"w": torch.zeros(1)}, {})


def test_the_next_epoch_trains_while_the_checkpoint_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write of epoch 1 waits until epoch 2 has begun training: inline, it would wait in vain."""
    original = checkpoint_writer.write_checkpoint
    epoch_two_started = threading.Event()
    overlapped: dict[str, bool] = {}

    def write_after_epoch_two_starts(
        path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> None:
        if metadata["epoch"] == "1":
            overlapped["epoch 1"] = epoch_two_started.wait(WAIT_S)
        original(path, tensors, metadata)

    def progress(event: dict[str, Any]) -> None:
        if event["epoch"] == 2:
            epoch_two_started.set()

    monkeypatch.setattr(checkpoint_writer, "write_checkpoint", write_after_epoch_two_starts)
    items = make_items(tmp_path / "site", train=2, val=1)
    plan = tiny_plan(local_epochs=2)
    # Report at every step, so that epoch 2's first step is seen.
    monkeypatch.setattr("agent.training.engine.PROGRESS_INTERVAL_S", 0.0)
    ctx = context(tmp_path, "overlap", progress=progress)
    result = train_round(plan, initial_weights(plan), *items, ctx)
    assert overlapped == {"epoch 1": True}
    # The last epoch's checkpoint is whole on disk when the round returns.
    assert _meta(ctx.work_dir / CHECKPOINT_NAME)["epoch"] == "2"
    assert result.metrics["epochs_run"] == 2.0
