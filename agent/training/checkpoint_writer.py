"""Epoch checkpoints written on a background thread, so that training does not wait for the disk.

After every epoch the engine (`agent.training.engine`) checkpoints the model, the optimizer
state and the round's bookkeeping, so that a round interrupted by a crash resumes where it
was. Serialising that (model and Adam state: 2.5 MB for `benchmarks/round_overhead.py`'s 2D
U-Net) and writing it with an fsync held the training thread about 9 ms per epoch on a 2-core
machine, and was most likely the larger part of the 15 ms per epoch by which the engine
trailed a bare training loop on an H200, where an epoch of that model lasts 50 ms. The step
that follows does not need the file, only a copy of the tensors it is about to change. So
the engine takes that copy (`snapshot`) and this writer serialises and writes it while the
next epoch trains.

What a round can rely on:

- One write at a time, in epoch order: `submit` first waits for the write before it, so at
  most one snapshot is held besides the model, and an older checkpoint never replaces a
  newer one.
- A write that fails raises its own error at the next `submit` or when the writer closes:
  the round fails with the cause, as when the write was inline, at most an epoch later.
- Leaving the writer's ``with`` block, by return or by exception (a cancel, a crash
  simulated in a test), waits for the write in flight: the last submitted checkpoint is
  whole on disk before ``train_round`` returns or raises. An exception that ends the block
  is never replaced by the write's error.
- A process killed mid-write leaves the previous checkpoint (the write is atomic), so the
  round resumes from one epoch earlier. Every epoch is seeded from ``(plan.seed, epoch)``,
  so its update is the one the uninterrupted round would have released.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import save

from agent.fileio import atomic_write_bytes


def snapshot(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of TENSOR that later steps cannot change: one copy from either device."""
    return tensor.detach().to("cpu", copy=True)


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Serialise TENSORS with METADATA as safetensors and write them atomically to PATH."""
    atomic_write_bytes(path, save(tensors, metadata=metadata))


class CheckpointWriter:
    """Writes one round's checkpoints to one path, on one background thread, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def __enter__(self) -> CheckpointWriter:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        return self

    def submit(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        """Write TENSORS (snapshots: nothing may change them) once the previous write is done."""
        if self._pool is None:
            raise RuntimeError("CheckpointWriter.submit outside its with block")
        self.wait()
        self._pending = self._pool.submit(write_checkpoint, self.path, tensors, metadata)

    def wait(self) -> None:
        """Wait for the write in flight; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, self._pool = self._pool, None
        try:
            if exc_type is None:
                self.wait()
            else:
                pending, self._pending = self._pending, None
                if pending is not None:
                    # Whole on disk, or failed: the exception that ended the block goes on.
                    pending.exception()
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
