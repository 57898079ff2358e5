"""Shared test set-up: small thread counts, so that the suite behaves on a 2-core CI machine.

The tests mirror the package tree; helpers shared between areas live in `tests/fixtures/`,
and the pytest fixtures among them are registered here once (`pytest_plugins`), so that no
test imports a fixture by name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)

pytest_plugins = ["tests.fixtures.db"]


@pytest.fixture(autouse=True)
def ample_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The doctor's disk check sees 100 GiB free, whatever the host has.

    A test that expects a clean check would otherwise fail on a host with under 1 GiB free
    (a CI runner's disk shared with other jobs). The tests of the disk check itself patch
    `free_space` to the figure they need, and test the real one by the reference they import.
    """
    from agent import doctor

    def plenty(_path: Path) -> int:
        return 100 << 30

    monkeypatch.setattr(doctor, "free_space", plenty)
    yield
