"""fedsite_flower.aggregate, with numpy only, gives the coordinator's FedAvg mean bit for bit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from fedsite_flower.aggregate import AggregationError, SiteArrays, weighted_mean

from coordinator.aggregate import SiteUpdate
from coordinator.aggregate import weighted_mean as coordinator_mean

SHAPES = {"conv.weight": (4, 2, 3, 3), "conv.bias": (4,), "head.weight": (1, 4, 1, 1)}


def _sites(dtype: type = np.float32) -> list[SiteArrays]:
    rng = np.random.default_rng(11)
    # Sample counts whose shares are not exact in binary, values of mixed magnitude: the order
    # of the float additions shows in the last bits.
    counts = {"site-a": 7, "site-b": 3, "site-c": 13}
    return [
        SiteArrays(
            site,
            {
                name: (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3)).astype(dtype)
                for name, shape in SHAPES.items()
            },
            n,
        )
        for site, n in counts.items()
    ]


def _coordinator(sites: list[SiteArrays]) -> dict[str, np.ndarray]:
    updates = [
        SiteUpdate(
            s.site,
            {k: torch.from_numpy(np.asarray(v)).to(torch.float32) for k, v in s.arrays.items()},
            s.num_samples,
        )
        for s in sites
    ]
    return {k: v.numpy() for k, v in coordinator_mean(updates).items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_mean_is_the_coordinators_bit_for_bit_in_every_order(dtype: type) -> None:
    sites = _sites(dtype)
    want = _coordinator(sites)
    for order in itertools.permutations(sites):
        got = weighted_mean(list(order))
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == np.float32
            assert got[name].tobytes() == want[name].tobytes(), name


def test_the_sites_are_added_in_name_order_even_where_float64_loses_a_site() -> None:
    """Where a large value hides a small one in float64 (2**60 + 1), the order of the additions
    shows even after the cast to float32: the mean must add the sites in name order, as the
    coordinator does, not in the order they answered."""
    sites = [
        SiteArrays("site-a", {"w": np.array([2.0**62], np.float32)}, 1),
        SiteArrays("site-b", {"w": np.array([2.0], np.float32)}, 2),
        SiteArrays("site-c", {"w": np.array([-(2.0**62)], np.float32)}, 1),
    ]
    want = _coordinator(sites)["w"]
    assert want.tolist() == [0.0]  # 2**60 + 1 - 2**60, in name order
    for order in itertools.permutations(sites):
        assert weighted_mean(list(order))["w"].tobytes() == want.tobytes(), [s.site for s in order]


def test_flowers_own_order_dependent_sum_differs() -> None:
    """The reason for this module: Flower's running float32 sum in reply order changes bits."""
    sites = _sites()
    total = sum(s.num_samples for s in sites)

    def flower(order: tuple[SiteArrays, ...]) -> bytes:
        acc: dict[str, np.ndarray] = {}
        for s in order:
            for k, v in s.arrays.items():
                acc[k] = acc[k] + v * (s.num_samples / total) if k in acc else v * (s.num_samples / total)
        return b"".join(acc[k].tobytes() for k in sorted(acc))

    assert len({flower(order) for order in itertools.permutations(sites)}) > 1


def test_updates_that_cannot_be_averaged_are_refused_by_site_and_tensor() -> None:
    a, b, _ = _sites()
    with pytest.raises(AggregationError, match="no updates"):
        weighted_mean([])
    with pytest.raises(AggregationError, match="site-b: reported 0 training samples"):
        weighted_mean([a, SiteArrays("site-b", b.arrays, 0)])
    with pytest.raises(AggregationError, match=r"site-b: arrays differ from site-a's: missing conv\.bias"):
        weighted_mean([a, SiteArrays("site-b", {k: v for k, v in b.arrays.items() if k != "conv.bias"}, 3)])
    wrong = {**b.arrays, "conv.bias": np.zeros(5, np.float32)}
    with pytest.raises(
        AggregationError, match=r"site-b: tensor 'conv.bias' has shape \(5,\), site-a's \(4,\)"
    ):
        weighted_mean([a, SiteArrays("site-b", wrong, 3)])
    nan = {**b.arrays, "head.weight": np.full((1, 4, 1, 1), np.nan, np.float32)}
    with pytest.raises(AggregationError, match=r"site-b: tensor 'head\.weight' is not finite"):
        weighted_mean([a, SiteArrays("site-b", nan, 3)])
    with pytest.raises(AggregationError, match="two updates from one site"):
        weighted_mean([a, SiteArrays("site-a", b.arrays, 3)])
