"""The keys every generated value depends on: seeds, site and subject indices, sizes.

Each value comes from its own random stream, keyed by ``(seed, site, subject, purpose)``, rather
than from one generator consumed in order: that is what makes a subject independent of how many
sites, subjects or modalities are generated beside it.
"""

from __future__ import annotations

import numpy as np

from agent.errors import SyntheticDataError

MAX_SITES = 99
MAX_SUBJECTS_PER_SITE = 999
MIN_SIZE, MAX_SIZE = 32, 512


def random_stream(*key: int) -> np.random.Generator:
    """The random stream of KEY; the same key always gives the same numbers."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def check_seed(seed: int) -> None:
    """Refuse a seed that ``SeedSequence`` would reject or read differently (negative, not an int)."""
    if not isinstance(seed, int) or seed < 0:
        raise SyntheticDataError(f"seed must be a non-negative integer, got {seed!r}")


def check_size(size: int) -> None:
    """Refuse an in-plane size the site profiles cannot scale to (matrices are multiples of 4)."""
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE or size % 8:
        raise SyntheticDataError(f"size must be a multiple of 8 from {MIN_SIZE} to {MAX_SIZE}, got {size!r}")
