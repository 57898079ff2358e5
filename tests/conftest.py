"""Shared test set-up: small thread counts, so that the suite behaves on a 2-core CI machine.

The tests mirror the package tree; helpers shared between areas live in `tests/fixtures/`,
and the pytest fixtures among them are registered here once (`pytest_plugins`), so that no
test imports a fixture by name.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)

pytest_plugins = ["tests.fixtures.db"]
