"""Weights on the coordinator side: safetensors only, through the agent's codec.

The coordinator decodes what agents send with the same checks the agents apply to what
they receive (finite values, size limit); no pickle is ever read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# Largest update the coordinator accepts from one site.
MAX_UPDATE_BYTES = 2 * 1024**3


def encode(state: dict[str, torch.Tensor]) -> bytes:
    from agent.exchange.codec import encode_weights

    return encode_weights(state)


def decode(
    data: bytes,
    *,
    max_bytes: int = MAX_UPDATE_BYTES,
    expected: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, torch.Tensor]:
    """Weights or an update as float32 tensors. A compressed update (int8, int8 top-k) decodes
    to the difference it stands for and needs EXPECTED, the model's names and shapes."""
    from agent.exchange.compression import decode_update

    return decode_update(data, expected=expected, max_bytes=max_bytes)


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (e.g. `--init-weights`); the error names the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read weights: {exc}") from None
    try:
        return decode(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def initial_weights(plan: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model the run starts from: the plan's registry model, initialised with the plan's seed."""
    from agent.training.plan import parse_plan
    from agent.training.registry import build_model, exchanged_state

    parsed = parse_plan(plan)
    torch.manual_seed(int(parsed.seed))
    return exchanged_state(build_model(parsed))
