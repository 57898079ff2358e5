"""Quantisation: the decoded mean is the weighted mean of the clipped updates within
`error_bound`, sums at the extremes never wrap, and bad inputs are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent.errors import SecAggError
from agent.exchange.secagg.quantize import (
    MODULUS,
    QuantParams,
    dequantize_sum,
    error_bound,
    flatten,
    quantize,
    scale_for,
    unflatten,
)


def _sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total += v
    return total


@pytest.mark.parametrize(("n", "max_weight", "clip"), [(3, 10, 1.0), (10, 1000, 0.05), (10, 70, 0.5)])
def test_decoded_mean_is_within_the_bound(n: int, max_weight: int, clip: float) -> None:
    rng = np.random.default_rng(n)
    params = QuantParams(n_sites=n, clip=clip, max_weight=max_weight)
    updates = [rng.normal(0, clip, 5000).astype(np.float32) for _ in range(n)]
    weights = [int(w) for w in rng.integers(1, max_weight + 1, n)]
    decoded = dequantize_sum(_sum([quantize(u, w, params).vector for u, w in zip(updates, weights)]), params)
    total = sum(weights)
    assert decoded.total_weight == total
    exact = sum(w * np.clip(u.astype(np.float64), -clip, clip) for u, w in zip(updates, weights)) / total
    err = np.abs(decoded.mean - exact).max()
    bound = error_bound(n, max_weight, clip, total)
    assert err <= bound
    assert err > bound / 100  # the bound is not loose by orders of magnitude


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_extremes_do_not_wrap(sign: float) -> None:
    n, max_weight, clip = 10, 1000, 0.1
    params = QuantParams(n_sites=n, clip=clip, max_weight=max_weight)
    update = np.full(8, sign * 5 * clip, dtype=np.float32)  # beyond the clip range: clipped
    q = quantize(update, max_weight, params)
    assert q.clipped == 8
    decoded = dequantize_sum(_sum([q.vector] * n), params)
    assert np.allclose(
        decoded.mean, sign * clip, rtol=0, atol=error_bound(n, max_weight, clip, n * max_weight)
    )


def test_negative_values_are_twos_complement_modulo_2_32() -> None:
    params = QuantParams(n_sites=1, clip=1.0, max_weight=1)
    q = quantize(np.array([-1.0, 0.0, 1.0], dtype=np.float32), 1, params)
    steps = round(params.scale)
    assert q.vector.tolist() == [MODULUS - steps, 0, steps, 1]


def test_the_clipped_count_is_reported() -> None:
    params = QuantParams(n_sites=2, clip=0.5, max_weight=4)
    q = quantize(np.array([0.4, -0.6, 0.7, 0.5], dtype=np.float32), 2, params)
    assert q.clipped == 2


@pytest.mark.parametrize(
    ("update", "weight", "message"),
    [
        (np.zeros(3, np.float32), 0, "site weight 0"),
        (np.zeros(3, np.float32), 11, "site weight 11"),
        (np.zeros(3, np.float32), True, "site weight True"),
        (np.array([0.0, np.nan], np.float32), 1, "NaN or Inf"),
        (np.zeros((2, 2), np.float32), 1, "1-D"),
        (np.zeros(3, np.int32), 1, "floating point"),
    ],
)
def test_bad_inputs_are_refused(update: np.ndarray, weight: int, message: str) -> None:
    with pytest.raises(SecAggError, match=message):
        quantize(update, weight, QuantParams(n_sites=3, clip=1.0, max_weight=10))


def test_parameters_that_cannot_carry_the_sum_are_refused() -> None:
    with pytest.raises(SecAggError, match="clip must be a positive"):
        QuantParams(n_sites=3, clip=float("inf"), max_weight=10)
    with pytest.raises(SecAggError, match="too large for 32-bit"):
        QuantParams(n_sites=1000, clip=1.0, max_weight=10**7)
    params = QuantParams(n_sites=3, clip=1.0, max_weight=10)
    bad = np.zeros(4, dtype=np.uint32)  # total weight 0: masks did not cancel, or not this round
    with pytest.raises(SecAggError, match="total weight 0"):
        dequantize_sum(bad, params)
    with pytest.raises(SecAggError, match="total weight must be positive"):
        error_bound(3, 10, 1.0, 0)


def test_the_scale_leaves_room_for_the_rounding_of_every_site() -> None:
    n, w, clip = 7, 33, 0.25
    scale = scale_for(n, w, clip)
    assert n * (w * clip * scale + 0.5) <= 2**31 - 1


def test_flatten_and_unflatten_in_sorted_name_order() -> None:
    state = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([9.0])}
    vector = flatten(state)
    assert vector.tolist() == [9.0, 0, 1, 2, 3, 4, 5]
    back = unflatten(vector, {k: tuple(v.shape) for k, v in state.items()})
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(SecAggError, match="does not fit"):
        unflatten(vector[:-1], {k: tuple(v.shape) for k, v in state.items()})
