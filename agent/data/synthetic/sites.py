"""Site profiles: what makes one institution's images differ from another's (non-IID data).

A profile depends on ``(seed, site index)`` only, so adding sites never changes the existing ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from agent.data.synthetic.seeding import MAX_SITES, MIN_SIZE, check_seed, check_size, random_stream
from agent.errors import SyntheticDataError

_MANUFACTURERS = (
    ("Examplon Medical", "Examplon Vista"),
    ("Acme Imaging", "Acme MR 7"),
    ("Imaginary Systems", "Phantom XR"),
    ("Fictive Healthcare", "Nova 3T"),
)


@dataclass(frozen=True)
class SiteProfile:
    """What makes one institution's images differ from another's: scanner, protocol, patients."""

    seed: int
    index: int
    institution: str
    manufacturer: str
    model_name: str
    field_strength: float
    # Intensity: real value = scale * (clean ** gamma) * bias + noise + offset.
    scale: float
    offset: float
    gamma: float
    bias_strength: float
    noise: float  # Rician noise sigma relative to `scale`
    lesion_contrast: float  # how far lesions stand out from the brain on this site's FLAIR
    # Grid (mm): in-plane matrix and spacing, slice spacing and thickness, slice count.
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    slice_thickness: float
    # Stored pixel value -> real value, as DICOM RescaleSlope/RescaleIntercept and NIfTI scl_*.
    rescale_slope: float
    rescale_intercept: float
    # Patient population: lesion size, count and location.
    lesion_radius_mm: float
    lesion_count_p: tuple[float, float, float]
    lesion_direction: tuple[float, float, float]
    lesion_spread: float
    file_style: Literal["hex", "dcm", "im"]
    table_z: float

    @property
    def site_id(self) -> str:
        return f"site-{self.index}"


def site_profile(seed: int, site_index: int, *, size: int = 64) -> SiteProfile:
    """The deterministic profile of site number SITE_INDEX (1-based) for SEED at in-plane SIZE."""
    check_seed(seed)
    check_size(size)
    if not 1 <= site_index <= MAX_SITES:
        raise SyntheticDataError(f"site index must be from 1 to {MAX_SITES}, got {site_index}")
    rng = random_stream(seed, site_index, 0xFED)
    manufacturer, model_name = _MANUFACTURERS[int(rng.integers(len(_MANUFACTURERS)))]
    scale = float(np.exp(rng.uniform(np.log(250.0), np.log(2500.0))))
    # A rectangular field of view (fewer columns across the narrower left-right axis) is common.
    fov = float(rng.uniform(205.0, 240.0))
    matrix = max(MIN_SIZE, round(size * float(rng.uniform(0.875, 1.0)) / 4.0) * 4)
    ratio = float(rng.choice([1.0, 1.0, 0.875, 0.8125]))
    nx, ny = round(matrix * ratio / 4.0) * 4, matrix
    # Spacings rounded to 3 decimals so that DICOM decimal strings carry them exactly.
    sy = round(fov / ny, 3)
    sx = sy
    sz = round(float(rng.uniform(3.5, 5.0)) * 64.0 / size, 3)
    gap = float(rng.choice([0.0, 0.0, 0.1, 0.2]))
    thickness = round(sz / (1.0 + gap), 3)
    coverage = float(rng.uniform(140.0, 165.0))
    nz = round(coverage / sz)
    slope, intercept = [(1.0, 0.0), (0.5, 0.0), (2.0, 0.0), (1.5, 0.0), (0.25, 0.0), (1.0, 16.0)][
        int(rng.integers(6))
    ]
    counts = rng.dirichlet([4.0, 2.0, 1.0])
    direction = rng.standard_normal(3)
    direction[2] = abs(direction[2]) * 0.6  # supratentorial: mostly at or above the ventricles
    direction /= np.linalg.norm(direction)
    return SiteProfile(
        seed=seed,
        index=site_index,
        institution=f"St. Example Hospital {site_index}",
        manufacturer=manufacturer,
        model_name=model_name,
        field_strength=float(rng.choice([1.5, 3.0])),
        scale=round(scale, 2),
        offset=round(float(rng.uniform(0.0, 0.06)) * scale, 2),
        gamma=float(rng.uniform(0.75, 1.35)),
        bias_strength=float(rng.uniform(0.05, 0.35)),
        noise=float(rng.uniform(0.01, 0.045)),
        lesion_contrast=float(rng.uniform(0.75, 1.1)),
        shape=(nx, ny, nz),
        spacing=(sx, sy, sz),
        slice_thickness=thickness,
        rescale_slope=slope,
        rescale_intercept=intercept,
        lesion_radius_mm=float(rng.uniform(11.0, 21.0)),
        lesion_count_p=(float(counts[0]), float(counts[1]), float(counts[2])),
        lesion_direction=(float(direction[0]), float(direction[1]), float(direction[2])),
        lesion_spread=float(rng.uniform(0.35, 1.0)),
        file_style=("hex", "dcm", "im")[int(rng.integers(3))],
        table_z=round(float(rng.uniform(-90.0, -40.0)), 2),
    )
