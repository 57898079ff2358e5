"""Generated brain-MRI-like data with tumour-like lesions, for the demo, the tests and the benchmarks.

Real hospital data never ships with the product, yet a federated-learning platform has to be shown
working on something that behaves like it: several sites whose scanners, protocols and patients
differ (non-IID data), a segmentation target that a small model can learn, DICOM series that look
like a PACS export, and made-up patient identities that let tests prove identity never leaves a site.

Everything is a pure function of ``(seed, site index, subject index)``: a site's profile (scanner,
protocol, patient population) depends on ``(seed, site index)`` only, a subject on the three of them,
so adding sites or subjects never changes the ones already generated.

Geometry follows DICOM: arrays are ``(I, J, K)`` = (column index, row index, slice index), axial
slices (``ImageOrientationPatient`` = 1,0,0,0,1,0), slices stacked along +S. The NIfTI affine is the
RAS+ form of exactly the geometry written into the DICOM headers, so a correct DICOM reader and the
NIfTI file give the same grid.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from scipy import ndimage

# Subjects per site in the reference study's real institutional split.
PAPER_SPLIT: tuple[int, ...] = (70, 27, 17, 12, 11, 9, 6, 6, 4, 3)
MODALITIES: tuple[str, ...] = ("flair", "t1", "t1gd", "t2")
# BraTS label values: necrotic / non-enhancing core, peritumoral oedema, enhancing tumour.
LABEL_NECROSIS, LABEL_OEDEMA, LABEL_ENHANCING = 1, 2, 4
TARGET_LABELS: tuple[int, ...] = (LABEL_NECROSIS, LABEL_OEDEMA, LABEL_ENHANCING)
DATASET_NAME = "brain"
DEFAULT_BASE_PORT = 8100
MAX_SITES = 99
MAX_SUBJECTS_PER_SITE = 999
MIN_SIZE, MAX_SIZE = 32, 512

Format = Literal["nifti", "dicom"]
_Vec = Sequence[float] | np.ndarray

# Clean (noise-free, unit-scale) intensity of each tissue per modality. FLAIR: oedema and tumour
# bright, CSF dark, grey matter above white matter; T1: white above grey, lesions dark; T1Gd: the
# enhancing rim lights up; T2: CSF and oedema bright.
_TISSUE: dict[str, dict[str, float]] = {
    "flair": {
        "scalp": 0.55, "skull": 0.04, "csf": 0.10, "gm": 0.48, "wm": 0.36,
        "oedema": 0.86, "enhancing": 0.80, "necrosis": 0.62,
    },
    "t1": {
        "scalp": 0.85, "skull": 0.06, "csf": 0.12, "gm": 0.45, "wm": 0.66,
        "oedema": 0.38, "enhancing": 0.42, "necrosis": 0.20,
    },
    "t1gd": {
        "scalp": 0.85, "skull": 0.06, "csf": 0.14, "gm": 0.47, "wm": 0.67,
        "oedema": 0.40, "enhancing": 0.98, "necrosis": 0.22,
    },
    "t2": {
        "scalp": 0.60, "skull": 0.05, "csf": 1.00, "gm": 0.58, "wm": 0.40,
        "oedema": 0.85, "enhancing": 0.70, "necrosis": 0.92,
    },
}  # fmt: skip

_SERIES: dict[str, dict[str, Any]] = {
    "flair": {"description": "AX T2 FLAIR", "sequence": "IR", "tr": 9000.0, "te": 120.0, "ti": 2500.0},
    "t1": {"description": "AX T1 SE", "sequence": "SE", "tr": 550.0, "te": 12.0, "ti": None},
    "t1gd": {"description": "AX T1 SE +C", "sequence": "SE", "tr": 550.0, "te": 12.0, "ti": None},
    "t2": {"description": "AX T2 TSE", "sequence": "SE", "tr": 4500.0, "te": 95.0, "ti": None},
}

# Made-up names, long and distinctive enough never to occur by chance in logs or API answers
# (tests search for them there).
_FIRST_NAMES_F = (
    "Jane", "Rosalind", "Philippa", "Henrietta", "Theodora", "Margarethe", "Josefina", "Annelie",
    "Dorothea", "Wilhelmina", "Cordelia", "Beatrix", "Lucinda", "Ingrid", "Octavia", "Leonora",
)  # fmt: skip
_FIRST_NAMES_M = (
    "John", "Bartholomew", "Cornelius", "Leopold", "Augustin", "Casimir", "Desmond", "Eustace",
    "Florian", "Gregorius", "Horatio", "Ignatius", "Lysander", "Mortimer", "Peregrin", "Thaddeus",
)  # fmt: skip
_LAST_NAMES = (
    "Doe", "Roe", "Smithee", "Dupontel", "Rossetti", "Jansenius", "Novakova", "Silveira",
    "Lindqvist", "Moreaux", "Kellerman", "Brandtner", "Okafor", "Tanakawa", "Haddadi", "Kowalczyk",
    "Fontainebleau", "Bianchetti", "Andersson", "Petrovic", "Alvarado", "Nakamura", "Oseiwa", "Horvath",
)  # fmt: skip
_MANUFACTURERS = (
    ("Examplon Medical", "Examplon Vista"),
    ("Acme Imaging", "Acme MR 7"),
    ("Imaginary Systems", "Phantom XR"),
    ("Fictive Healthcare", "Nova 3T"),
)


class SyntheticDataError(ValueError):
    """Arguments that cannot produce a data set; the message names the argument."""


# --------------------------------------------------------------------------------------------
# Site profiles


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


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise SyntheticDataError(f"seed must be a non-negative integer, got {seed!r}")


def _check_size(size: int) -> None:
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE or size % 8:
        raise SyntheticDataError(f"size must be a multiple of 8 from {MIN_SIZE} to {MAX_SIZE}, got {size!r}")


def site_profile(seed: int, site_index: int, *, size: int = 64) -> SiteProfile:
    """The deterministic profile of site number SITE_INDEX (1-based) for SEED at in-plane SIZE."""
    _check_seed(seed)
    _check_size(size)
    if not 1 <= site_index <= MAX_SITES:
        raise SyntheticDataError(f"site index must be from 1 to {MAX_SITES}, got {site_index}")
    rng = _rng(seed, site_index, 0xFED)
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


# --------------------------------------------------------------------------------------------
# Subjects


@dataclass(frozen=True)
class PatientIdentity:
    """A made-up patient: what a PACS export would carry, and what must never leave the site."""

    patient_id: str
    name: str  # DICOM person name, "Family^Given"
    sex: Literal["F", "M"]
    birth_date: str  # YYYYMMDD
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS
    accession: str
    institution: str


@dataclass(frozen=True)
class SliceGeometry:
    """The DICOM geometry of one axial series, with values exactly as written to the headers."""

    shape: tuple[int, int, int]  # (columns, rows, slices)
    spacing: tuple[float, float, float]  # (column spacing, row spacing, slice spacing) mm
    slice_thickness: float
    origin_lps: tuple[float, float, float]  # ImagePositionPatient of the first slice
    orientation: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.orientation, dtype=np.float64)
        return np.cross(o[:3], o[3:])

    def position(self, k: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice K, rounded as written (the origin and spacing have <= 3 decimals)."""
        p = np.asarray(self.origin_lps) + k * self.spacing[2] * self.normal
        return (round(float(p[0]), 4), round(float(p[1]), 4), round(float(p[2]), 4))

    def affine_lps(self) -> np.ndarray:
        o = np.asarray(self.orientation, dtype=np.float64)
        a = np.eye(4)
        a[:3, 0] = o[:3] * self.spacing[0]
        a[:3, 1] = o[3:] * self.spacing[1]
        a[:3, 2] = self.normal * self.spacing[2]
        a[:3, 3] = self.origin_lps
        return a

    def affine_ras(self) -> np.ndarray:
        """Voxel (i, j, k) -> RAS+ mm, the NIfTI convention."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps()


@dataclass
class SyntheticSubject:
    """One generated subject: stored pixel values per modality, the label map and the geometry."""

    site_index: int
    subject_index: int
    identity: PatientIdentity
    geometry: SliceGeometry
    stored: dict[str, np.ndarray]  # modality -> uint16 (I, J, K), as in the DICOM pixel data
    label: np.ndarray  # uint8 (I, J, K) with values in {0, 1, 2, 4}
    rescale_slope: float
    rescale_intercept: float
    lesions: int
    profile: SiteProfile = field(repr=False)

    @property
    def patient_id(self) -> str:
        return self.identity.patient_id

    @property
    def affine(self) -> np.ndarray:
        return self.geometry.affine_ras()

    def image(self, modality: str) -> np.ndarray:
        """Real-world values (stored * slope + intercept) as float32; exact, the slope is dyadic."""
        arr = self.stored[modality].astype(np.float32)
        return arr * np.float32(self.rescale_slope) + np.float32(self.rescale_intercept)

    @property
    def whole_tumour(self) -> np.ndarray:
        return np.isin(self.label, TARGET_LABELS)


@functools.lru_cache(maxsize=8)
def _id_permutation(seed: int) -> np.ndarray:
    # One random permutation of 0..99999 per seed: IDs look random yet never repeat.
    return _rng(seed, 0x9E).permutation(10**5)


def patient_identity(seed: int, site_index: int, subject_index: int) -> PatientIdentity:
    """A made-up identity; patient IDs are distinct across all sites and subjects for one seed."""
    if not 1 <= site_index <= MAX_SITES or not 0 <= subject_index < MAX_SUBJECTS_PER_SITE:
        raise SyntheticDataError(f"no identity for site {site_index} subject {subject_index}: out of range")
    rng = _rng(seed, site_index, subject_index, 0x1D)
    number = int(_id_permutation(seed)[site_index * 1000 + subject_index])
    sex: Literal["F", "M"] = "F" if rng.random() < 0.5 else "M"
    given = _FIRST_NAMES_F if sex == "F" else _FIRST_NAMES_M
    name = f"{_LAST_NAMES[int(rng.integers(len(_LAST_NAMES)))]}^{given[int(rng.integers(len(given)))]}"
    birth = f"{int(rng.integers(1935, 2004))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    study = f"{int(rng.integers(2012, 2025))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    time = f"{int(rng.integers(7, 20)):02d}{int(rng.integers(60)):02d}{int(rng.integers(60)):02d}"
    return PatientIdentity(
        patient_id=f"PAT-{number:05d}",
        name=name,
        sex=sex,
        birth_date=birth,
        study_date=study,
        study_time=time,
        accession=f"ACC{int(rng.integers(10**7, 10**8))}",
        institution=f"St. Example Hospital {site_index}",
    )


def _smooth(
    rng: np.random.Generator, shape: tuple[int, ...], sigma_mm: float, spacing: np.ndarray
) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation; correlation length in mm.

    Long correlation lengths are made on a coarser grid and interpolated up: the same kind of
    field at a fraction of the cost of a wide filter on the full grid.
    """
    factor = np.maximum(np.floor(sigma_mm / (1.5 * spacing)), 1).astype(int)
    coarse_shape = tuple(int(np.ceil(n / f)) + 1 if f > 1 else n for n, f in zip(shape, factor, strict=True))
    noise = rng.standard_normal(coarse_shape, dtype=np.float32)
    out = ndimage.gaussian_filter(
        noise, sigma=tuple(sigma_mm / (spacing * factor)), mode="reflect", truncate=3.0
    )
    if coarse_shape != tuple(shape):
        out = ndimage.zoom(out, [n / c for n, c in zip(shape, coarse_shape, strict=True)], order=1)
        if out.shape != tuple(shape):
            raise RuntimeError(f"smooth field came out {out.shape}, expected {shape}")
    std = float(out.std())
    return (out / std if std > 0 else out).astype(np.float32, copy=False)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cz, sz_ = np.cos(yaw), np.sin(yaw)
    cy, sy = np.cos(pitch), np.sin(pitch)
    cx, sx = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz_, 0], [sz_, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


class _Grid:
    """Voxel centres in head-centred, head-rotated LPS mm, with cheap access to local boxes."""

    def __init__(self, geometry: SliceGeometry, centre_mm: np.ndarray, rot: np.ndarray) -> None:
        self.shape = geometry.shape
        self.spacing = np.asarray(geometry.spacing, dtype=np.float64)
        self.centre = centre_mm
        self.rot = rot
        d = np.meshgrid(
            *[np.arange(n, dtype=np.float32) * np.float32(s) - np.float32(c)
              for n, s, c in zip(self.shape, self.spacing, centre_mm, strict=True)],
            indexing="ij", sparse=True,
        )  # fmt: skip
        r = rot.astype(np.float32)
        # q = (voxel mm - centre) @ rot, one full array per head axis.
        self.q = [(d[0] * r[0, a] + d[1] * r[1, a] + d[2] * r[2, a]).astype(np.float32) for a in range(3)]

    def box(self, centre: _Vec, radius: float) -> tuple[slice, slice, slice] | None:
        """Voxel index ranges covering a ball of RADIUS mm around CENTRE (head coordinates)."""
        vox = (self.rot @ np.asarray(centre, dtype=np.float64) + self.centre) / self.spacing
        half = radius / self.spacing
        lo = np.maximum(np.floor(vox - half).astype(int), 0)
        hi = np.minimum(np.ceil(vox + half).astype(int) + 1, self.shape)
        if np.any(hi <= lo):
            return None
        return (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))

    def radius(
        self,
        centre: _Vec,
        axes: _Vec,
        rot: np.ndarray,
        box: tuple[slice, slice, slice] | None = None,
    ) -> np.ndarray:
        """Normalised radius (1 on the surface) of a rotated ellipsoid, over the box or everywhere."""
        q = [qa[box] if box is not None else qa for qa in self.q]
        d = [q[b] - np.float32(centre[b]) for b in range(3)]
        total = np.zeros(q[0].shape, dtype=np.float32)
        for a in range(3):
            local = d[0] * np.float32(rot[0, a]) + d[1] * np.float32(rot[1, a]) + d[2] * np.float32(rot[2, a])
            total += (local / np.float32(axes[a])) ** 2
        return np.sqrt(total)

    def soft_ellipsoid(
        self,
        out: np.ndarray,
        centre: _Vec,
        axes: _Vec,
        rot: np.ndarray,
        width_mm: float,
    ) -> None:
        """OUT = max(OUT, partial-volume fraction of a solid ellipsoid with an edge WIDTH_MM wide)."""
        short, long_ = float(min(axes)), float(max(axes))
        box = self.box(np.asarray(centre), long_ * (1.0 + 6.0 * width_mm / short))
        if box is None:
            return
        frac = _sigmoid((1.0 - self.radius(centre, axes, rot, box)) * short / width_mm)
        np.maximum(out[box], frac, out=out[box])


@dataclass
class _Anatomy:
    fractions: dict[str, np.ndarray]  # tissue -> fraction in [0, 1], summing to <= 1 (rest: air)
    label: np.ndarray
    lesions: int


def _anatomy(profile: SiteProfile, rng: np.random.Generator, geometry: SliceGeometry) -> _Anatomy:
    shape = geometry.shape
    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    centre = np.array([(n - 1) * s / 2.0 for n, s in zip(shape, spacing, strict=True)])
    centre += rng.normal(0.0, [4.0, 4.0, 5.0])
    grid = _Grid(geometry, centre, _rotation(*rng.normal(0.0, np.deg2rad([4.0, 3.0, 3.0]))))
    qx, _qy, qz = grid.q

    voxel = float(spacing.min())
    edge = 0.5 * voxel  # partial-volume edge width, mm
    head_axes = np.array([68.0, 86.0, 64.0]) * rng.uniform(0.92, 1.05, 3)
    mean_axis = float(head_axes.mean())
    r_head = grid.radius((0.0, 0.0, 0.0), head_axes, np.eye(3))
    r_head += 0.012 * _smooth(rng, shape, 12.0, spacing)

    def inside(boundary: float | np.ndarray) -> np.ndarray:
        return _sigmoid((boundary - r_head) * mean_axis / edge)

    head = inside(1.0)
    skull_in = inside(0.93)
    csf_in = inside(0.87)
    brain_boundary = 0.835 + 0.012 * _smooth(rng, shape, 5.0, spacing)
    brain = inside(brain_boundary)

    # Ventricles: two lateral horns tilted outwards plus a small third ventricle.
    vent_scale = rng.uniform(0.8, 1.25)
    vents = np.zeros(shape, dtype=np.float32)
    for side in (-1.0, 1.0):
        vc = (side * rng.uniform(7.0, 9.5), rng.uniform(-4.0, 4.0), rng.uniform(6.0, 12.0))
        ax = np.array([6.5, 25.0, 9.0]) * vent_scale * rng.uniform(0.9, 1.1, 3)
        grid.soft_ellipsoid(vents, vc, ax, _rotation(side * np.deg2rad(rng.uniform(4, 12)), 0.0, 0.0), edge)
    grid.soft_ellipsoid(vents, (0.0, 2.0, 0.0), (1.8, 10.0, 6.0), np.eye(3), edge)
    # Interhemispheric fissure above the ventricles.
    fissure = (np.exp(-((qx / 1.6) ** 2)) * _sigmoid((qz - 12.0) / 3.0)).astype(np.float32)
    parenchyma = brain * (1.0 - vents) * (1.0 - 0.8 * fissure)

    # Grey/white matter: cortex as a band under the brain surface whose depth follows a smooth
    # random field (gyri), plus deep grey nuclei.
    depth_mm = (brain_boundary - r_head) * mean_axis
    wm = _sigmoid((depth_mm - 7.0 - 3.5 * _smooth(rng, shape, 4.0, spacing)) / 1.2)
    deep = np.zeros(shape, dtype=np.float32)
    for side in (-1.0, 1.0):
        grid.soft_ellipsoid(deep, (side * 10.0, 6.0, 0.0), (7.0, 11.0, 7.0), np.eye(3), 2.0)
    wm *= 1.0 - 0.85 * deep

    lesion_field = _smooth(rng, shape, 3.5, spacing)
    count = int(rng.choice([1, 2, 3], p=np.asarray(profile.lesion_count_p) / sum(profile.lesion_count_p)))
    brain_axes = head_axes * 0.835
    outer_s = np.zeros(shape, dtype=np.float32)
    core_s = np.zeros(shape, dtype=np.float32)
    necro_s = np.zeros(shape, dtype=np.float32)
    outer_h = np.zeros(shape, dtype=bool)
    core_h = np.zeros(shape, dtype=bool)
    necro_h = np.zeros(shape, dtype=bool)
    pref = np.asarray(profile.lesion_direction)
    tissue_ok = parenchyma > 0.5
    for _ in range(count):
        # A lesion that would fall outside the brain tissue (into a ventricle, say) is placed
        # again, so that every subject has a non-empty target.
        for _attempt in range(20):
            d = pref + profile.lesion_spread * rng.standard_normal(3)
            d[2] = max(d[2], -0.25)
            d /= np.linalg.norm(d)
            c = d * rng.uniform(0.25, 0.6) * brain_axes
            radius = float(np.clip(profile.lesion_radius_mm * np.exp(rng.normal(0.0, 0.3)), 6.0, 32.0))
            halo = 1.0 + rng.uniform(4.0, 14.0) / radius
            has_necrosis = radius > 10.0 and rng.random() < 0.75
            parts = [
                (
                    c + rng.normal(0.0, radius * 0.35, 3),
                    radius * rng.uniform(0.55, 1.0, 3),
                    _rotation(*rng.uniform(0, np.pi, 3)),
                )
                for _part in range(int(rng.integers(2, 5)))
            ]
            # The union of a few perturbed ellipsoids: an irregular blob. Evaluated in a box that
            # holds its halo with margin; outside it every fraction below is ~0.
            reach = max(
                float(np.linalg.norm(pc - c)) + float(pax.max()) * (halo + 1.2) for pc, pax, _ in parts
            )
            box = grid.box(c, reach)
            if box is None:
                continue
            f: np.ndarray = np.full(outer_s[box].shape, np.inf, dtype=np.float32)
            for pc, pax, prot in parts:
                f = np.minimum(f, grid.radius(pc, pax, prot, box))
            f = f + 0.14 * lesion_field[box]
            if np.any((f < 1.0) & tissue_ok[box]):
                break
        else:
            raise RuntimeError("could not place a lesion inside the brain")
        assert box is not None
        width = edge / radius
        np.maximum(outer_s[box], _sigmoid((halo - f) / width), out=outer_s[box])
        np.maximum(core_s[box], _sigmoid((1.0 - f) / width), out=core_s[box])
        outer_h[box] |= f < halo
        core_h[box] |= f < 1.0
        if has_necrosis:
            np.maximum(necro_s[box], _sigmoid((0.5 - f) / width), out=necro_s[box])
            necro_h[box] |= f < 0.5

    label = np.zeros(shape, dtype=np.uint8)
    label[outer_h & tissue_ok] = LABEL_OEDEMA
    label[core_h & tissue_ok] = LABEL_ENHANCING
    label[necro_h & tissue_ok] = LABEL_NECROSIS

    lesion = outer_s * parenchyma
    core = core_s * parenchyma
    necrosis = necro_s * parenchyma
    healthy = parenchyma - lesion
    fractions = {
        "scalp": head - skull_in,
        "skull": skull_in - csf_in,
        "csf": (csf_in - brain) + brain * vents + brain * (1.0 - vents) * 0.8 * fissure,
        "wm": healthy * wm,
        "gm": healthy * (1.0 - wm),
        "oedema": lesion - core,
        "enhancing": core - necrosis,
        "necrosis": necrosis,
    }
    fractions = {k: np.clip(v, 0.0, 1.0).astype(np.float32) for k, v in fractions.items()}
    return _Anatomy(fractions=fractions, label=label, lesions=count)


def _geometry(profile: SiteProfile, rng: np.random.Generator) -> SliceGeometry:
    nx, ny, nz = profile.shape
    sx, sy, sz = profile.spacing
    # Patient positioning differs a little per exam; values rounded to 2 decimals so that every
    # slice position is an exact short decimal string.
    x0 = round(-(nx - 1) * sx / 2.0 + float(rng.uniform(-3.0, 3.0)), 2)
    y0 = round(-(ny - 1) * sy / 2.0 + float(rng.uniform(-3.0, 3.0)), 2)
    z0 = round(profile.table_z + float(rng.uniform(-4.0, 4.0)), 2)
    return SliceGeometry(
        shape=(nx, ny, nz),
        spacing=(sx, sy, sz),
        slice_thickness=profile.slice_thickness,
        origin_lps=(x0, y0, z0),
    )


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """A smooth multiplicative field (exp of a random quadratic), like coil sensitivity."""
    coords = np.meshgrid(*[np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape], indexing="ij")
    x, y, z = coords
    terms = [x, y, z, x * y, x * z, y * z, x * x, y * y, z * z]
    coef = rng.normal(0.0, 1.0, len(terms)).astype(np.float32)
    field = sum((c * t for c, t in zip(coef, terms, strict=True)), np.zeros(shape, dtype=np.float32))
    field /= float(np.abs(field).max()) + 1e-6
    return np.exp(strength * field).astype(np.float32)


def _render(
    modality: str,
    anatomy: _Anatomy,
    profile: SiteProfile,
    rng: np.random.Generator,
    spacing: np.ndarray,
) -> np.ndarray:
    """Clean image of MODALITY on this site's scanner, in real-world units (float)."""
    table = dict(_TISSUE[modality])
    if modality == "flair":
        for key in ("oedema", "enhancing", "necrosis"):
            table[key] = table["wm"] + profile.lesion_contrast * (table[key] - table["wm"])
    shape = anatomy.label.shape
    clean = np.zeros(shape, dtype=np.float32)
    for tissue, frac in anatomy.fractions.items():
        clean += np.float32(table[tissue]) * frac
    # Tissue heterogeneity, then the scanner's point-spread function.
    clean *= 1.0 + 0.05 * _smooth(rng, shape, 1.5, spacing)
    clean = ndimage.gaussian_filter(np.clip(clean, 0.0, None), sigma=0.5)
    img = np.power(clean, profile.gamma) * _bias_field(rng, shape, profile.bias_strength) * profile.scale
    sigma = profile.noise * profile.scale
    # Magnitude images have Rician noise.
    real = img + np.float32(sigma) * rng.standard_normal(shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag) + np.float32(profile.offset)


def _quantise(values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    stored = np.rint((values - intercept) / slope)
    return np.clip(stored, 0, 65535).astype(np.uint16)


def _check_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    mods = tuple(modalities)
    if not mods:
        raise SyntheticDataError("modalities: at least one is needed, e.g. flair")
    unknown = [m for m in mods if m not in MODALITIES]
    if unknown:
        raise SyntheticDataError(f"modalities: unknown {', '.join(unknown)}; known: {', '.join(MODALITIES)}")
    if len(set(mods)) != len(mods):
        raise SyntheticDataError(f"modalities: listed twice in {', '.join(mods)}")
    return mods


def generate_subject(
    seed: int,
    site_index: int,
    subject_index: int,
    *,
    modalities: Sequence[str] = ("flair",),
    size: int = 64,
    profile: SiteProfile | None = None,
) -> SyntheticSubject:
    """Generate subject SUBJECT_INDEX (0-based) of site SITE_INDEX (1-based), in memory.

    The anatomy and lesions do not depend on MODALITIES, so asking for more channels never changes
    the FLAIR channel or the label of the same subject.
    """
    mods = _check_modalities(modalities)
    if profile is None:
        profile = site_profile(seed, site_index, size=size)
    elif (profile.seed, profile.index) != (seed, site_index):
        raise SyntheticDataError(
            f"profile is for seed {profile.seed} site {profile.index}, not {seed} {site_index}"
        )
    if not 0 <= subject_index < MAX_SUBJECTS_PER_SITE:
        raise SyntheticDataError(
            f"subject index must be from 0 to {MAX_SUBJECTS_PER_SITE - 1}, got {subject_index}"
        )
    rng = _rng(seed, site_index, subject_index, 0xA7)
    geometry = _geometry(profile, rng)
    anatomy = _anatomy(profile, rng, geometry)
    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    stored: dict[str, np.ndarray] = {}
    for modality in mods:
        # One stream per modality: the channels are independent of which others were asked for.
        mrng = _rng(seed, site_index, subject_index, 0xB0 + MODALITIES.index(modality))
        values = _render(modality, anatomy, profile, mrng, spacing)
        stored[modality] = _quantise(values, profile.rescale_slope, profile.rescale_intercept)
    return SyntheticSubject(
        site_index=site_index,
        subject_index=subject_index,
        identity=patient_identity(seed, site_index, subject_index),
        geometry=geometry,
        stored=stored,
        label=anatomy.label,
        rescale_slope=profile.rescale_slope,
        rescale_intercept=profile.rescale_intercept,
        lesions=anatomy.lesions,
        profile=profile,
    )


# --------------------------------------------------------------------------------------------
# Writers


def _gzip_bytes(data: bytes) -> bytes:
    # mtime=0 and no file name in the gzip header: the same input gives the same bytes.
    return gzip.compress(data, compresslevel=6, mtime=0)


def nifti_bytes(
    array: np.ndarray, affine: np.ndarray, *, slope: float = 1.0, intercept: float = 0.0
) -> bytes:
    """A gzipped NIfTI-1 file of ARRAY (stored dtype kept) with exactly this slope and intercept.

    nibabel recomputes scaling on save, so the two scl_ fields are written into the header bytes.
    """
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    raw = bytearray(img.to_bytes())
    endian = "<" if img.header.endianness == "<" else ">"
    struct.pack_into(f"{endian}ff", raw, 112, slope, intercept)
    return _gzip_bytes(bytes(raw))


def write_nifti_subject(subject: SyntheticSubject, folder: Path) -> list[Path]:
    """Write <folder>/<modality>.nii.gz per modality and <folder>/seg.nii.gz; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for modality, stored in subject.stored.items():
        path = folder / f"{modality}.nii.gz"
        data = nifti_bytes(
            stored, subject.affine, slope=subject.rescale_slope, intercept=subject.rescale_intercept
        )
        path.write_bytes(data)
        written.append(path)
    written.append(write_label(subject, folder))
    return written


def write_label(subject: SyntheticSubject, folder: Path) -> Path:
    """The label map as <folder>/seg.nii.gz on the image grid (uint8, values 0/1/2/4)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "seg.nii.gz"
    path.write_bytes(nifti_bytes(subject.label, subject.affine))
    return path


def _ds(value: float) -> str:
    """A DICOM decimal string of a value that has at most 4 decimals (exact, <= 16 characters)."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _uid(seed: int, *parts: object) -> UID:
    return generate_uid(entropy_srcs=["fedsite-synthetic", str(seed), *[str(p) for p in parts]])


def _file_names(rng: np.random.Generator, style: str, count: int) -> list[str]:
    names: set[str] = set()
    out: list[str] = []
    while len(out) < count:
        n = int(rng.integers(16**8))
        name = {"hex": f"{n:08X}", "dcm": f"{n:08x}.dcm", "im": f"IM_{n % 10**6:06d}"}[style]
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def write_dicom_series(subject: SyntheticSubject, modality: str, folder: Path) -> list[Path]:
    """Write one MR series (one file per slice, shuffled random file names) into FOLDER."""
    profile = subject.profile
    geometry = subject.geometry
    ident = subject.identity
    stored = subject.stored[modality]
    seed = profile.seed
    key = (profile.index, subject.subject_index)
    study_uid = _uid(seed, *key, "study")
    series_uid = _uid(seed, *key, modality, "series")
    frame_uid = _uid(seed, *key, "frame")
    series = _SERIES[modality]
    real = subject.image(modality)
    lo, hi = np.percentile(
        real[real > profile.offset * 1.5] if np.any(real > profile.offset * 1.5) else real, [1, 99]
    )
    rng = _rng(seed, profile.index, subject.subject_index, 0xD1 + MODALITIES.index(modality))
    names = _file_names(rng, profile.file_style, geometry.shape[2])
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for k in range(geometry.shape[2]):
        sop_uid = _uid(seed, *key, modality, "slice", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = folder / names[k]
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ident.study_date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ident.study_time
        ds.AccessionNumber = ident.accession
        ds.Modality = "MR"
        ds.Manufacturer = profile.manufacturer
        ds.InstitutionName = profile.institution
        ds.ReferringPhysicianName = "Referrer^Example"
        ds.StudyDescription = "MR BRAIN W/WO CONTRAST"
        ds.SeriesDescription = series["description"]
        ds.ManufacturerModelName = profile.model_name
        ds.PatientName = ident.name
        ds.PatientID = ident.patient_id
        ds.PatientBirthDate = ident.birth_date
        ds.PatientSex = ident.sex
        ds.BodyPartExamined = "BRAIN"
        ds.ScanningSequence = series["sequence"]
        ds.SequenceVariant = "SK"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = _ds(geometry.slice_thickness)
        ds.SpacingBetweenSlices = _ds(geometry.spacing[2])
        ds.RepetitionTime = _ds(series["tr"])
        ds.EchoTime = _ds(series["te"])
        if series["ti"] is not None:
            ds.InversionTime = _ds(series["ti"])
        ds.MagneticFieldStrength = _ds(profile.field_strength)
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = ident.accession[-6:]
        ds.SeriesNumber = 100 * (MODALITIES.index(modality) + 1) + 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        pos = geometry.position(k)
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.ImageOrientationPatient = [_ds(v) for v in geometry.orientation]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(np.dot(pos, geometry.normal)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = geometry.shape[1]
        ds.Columns = geometry.shape[0]
        # PixelSpacing is (between rows, between columns) = (J spacing, I spacing).
        ds.PixelSpacing = [_ds(geometry.spacing[1]), _ds(geometry.spacing[0])]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.WindowCenter = _ds(round(float(lo + hi) / 2.0, 1))
        ds.WindowWidth = _ds(round(max(float(hi - lo), 1.0), 1))
        ds.RescaleIntercept = _ds(subject.rescale_intercept)
        ds.RescaleSlope = _ds(subject.rescale_slope)
        ds.RescaleType = "US"
        # Pixel data is row-major (rows, columns) = (J, I): the transpose of our (I, J) slice.
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_dicom_subject(subject: SyntheticSubject, folder: Path) -> list[Path]:
    """Write <folder>/<modality>/ DICOM series per modality and <folder>/seg.nii.gz."""
    written: list[Path] = []
    for modality in subject.stored:
        written.extend(write_dicom_series(subject, modality, folder / modality))
    written.append(write_label(subject, folder))
    return written


# --------------------------------------------------------------------------------------------
# Federations: sites with data, agent configs, the federation file and a default plan


@dataclass(frozen=True)
class SiteLayout:
    """Where one generated site lives and how its agent is reached."""

    site_id: str
    index: int
    root: Path  # OUT/site-<k>
    config_path: Path  # OUT/site-<k>/config.yaml
    data_dir: Path  # OUT/site-<k>/data
    work_dir: Path  # OUT/site-<k>/work (created by the agent)
    token_file: Path  # OUT/site-<k>/coordinator.token (referenced, written later by whoever starts it)
    port: int
    url: str
    subjects: tuple[str, ...]  # made-up patient IDs = subject folder names; they never leave the site
    outside: bool  # True for extra sites kept outside the federation
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    institution: str


@dataclass(frozen=True)
class FederationLayout:
    """What `generate_federation` wrote."""

    root: Path
    sites: tuple[SiteLayout, ...]  # inside the federation, in order
    outside: tuple[SiteLayout, ...]  # extra sites, not in the federation's agents
    federation_path: Path
    plan_path: Path
    fmt: Format
    modalities: tuple[str, ...]
    size: int
    seed: int

    @property
    def config_paths(self) -> list[Path]:
        return [s.config_path for s in self.sites]

    @property
    def outside_config_paths(self) -> list[Path]:
        return [s.config_path for s in self.outside]

    @property
    def all_sites(self) -> tuple[SiteLayout, ...]:
        return self.sites + self.outside

    def site(self, site_id: str) -> SiteLayout:
        for s in self.all_sites:
            if s.site_id == site_id:
                return s
        raise KeyError(site_id)


def default_plan(
    *, modalities: Sequence[str] = ("flair",), size: int = 64, dataset: str = DATASET_NAME
) -> dict[str, Any]:
    """The default FedAvg plan for generated data: a small 2D U-Net on the axial slices."""
    return {
        "dataset": dataset,
        "model": {
            "name": "unet",
            "spatial_dims": 2,
            "in_channels": len(modalities),
            "out_channels": 1,
            "channels": [8, 16, 32],
            "strides": [2, 2],
            "num_res_units": 1,
        },
        "local_epochs": 1,
        "batch_size": 16,
        "optimizer": {"name": "adam", "lr": 0.001},
        "loss": "log_dice",
        "seed": 0,
        "send": "weights",
        "data": {
            "spatial_dims": 2,
            "roi_size": [size, size],
            "label_slice_fraction": 0.5,
            "samples_per_subject": 16,
        },
    }


def _yaml_str(value: str) -> str:
    # JSON strings are valid YAML double-quoted scalars.
    return json.dumps(value)


def site_config_text(
    *, site_id: str, site_name: str, fmt: Format, modalities: Sequence[str], port: int, outside: bool = False
) -> str:
    """The agent config of one generated site (YAML with comments); loads with `load_config`."""
    images = "{subject}/{modality}" if fmt == "dicom" else "{subject}/{modality}.nii.gz"
    images_note = (
        "DICOM: a folder per subject and modality holding one series."
        if fmt == "dicom"
        else "NIfTI: one file per subject and modality."
    )
    role = "kept outside the federation (held-out test site)" if outside else "member of the federation"
    mods = ", ".join(modalities)
    return f"""\
# fedsite agent configuration for {site_id}, {role}.
# Generated by `fedsite demo-data` for made-up data; check it with `fedsite config check config.yaml`.
# Relative paths are resolved against this file's folder.
site:
  id: {site_id}
  name: {_yaml_str(site_name)}
datasets:
  - name: {DATASET_NAME}
    format: {fmt}
    root: data
    modalities: [{mods}]
    # {images_note}
    images: {_yaml_str(images)}
    label: {_yaml_str("{subject}/seg.nii.gz")}
    # Whole tumour = necrosis (1) + oedema (2) + enhancing tumour (4), as in BraTS.
    target_labels: [1, 2, 4]
    val_fraction: 0.25
# Audit database, caches and released updates live here.
work_dir: work
device: auto
api:
  host: 127.0.0.1
  port: {port}
  # No tokens here: create one with `fedsite tokens add coordinator --role coordinator --config config.yaml`.
approval:
  policy: auto
"""


def federation_text(sites: Sequence[SiteLayout], outside: Sequence[SiteLayout], root: Path) -> str:
    """The federation file (coordinator format) for the generated sites; token files are relative."""

    def entry(s: SiteLayout) -> str:
        token = s.token_file.relative_to(root).as_posix()
        return f"  - name: {s.site_id}\n    url: {s.url}\n    token_file: {token}\n"

    text = (
        "# Federation of the generated sites, for `fedsite coordinate --federation federation.yaml`.\n"
        "# Paths are relative to this file. Each token file holds a coordinator token of that site's\n"
        "# agent (`fedsite tokens add coordinator --role coordinator --config site-<k>/config.yaml`).\n"
        "agents:\n" + "".join(entry(s) for s in sites)
    )
    if outside:
        text += (
            "# Sites that never train: they only test the final models (data the federation never saw).\n"
            "outside:\n" + "".join(entry(s) for s in outside)
        )
    text += "min_sites: 1\ntimeouts: {connect: 5, read: 30, round: 3600}\n"
    return text


_OWN_ENTRY = re.compile(r"site-\d+|federation\.yaml|plan\.json")


def _check_federation_args(
    *,
    sites: int,
    subjects_per_site: Sequence[int],
    fmt: str,
    size: int,
    seed: int,
    extra_sites: int,
    extra_subjects: Sequence[int],
    base_port: int,
) -> None:
    if not isinstance(sites, int) or sites < 1:
        raise SyntheticDataError(f"sites must be at least 1, got {sites!r}")
    if not isinstance(extra_sites, int) or extra_sites < 0:
        raise SyntheticDataError(f"extra_sites must be 0 or more, got {extra_sites!r}")
    if sites + extra_sites > MAX_SITES:
        raise SyntheticDataError(
            f"sites + extra_sites must be at most {MAX_SITES}, got {sites + extra_sites}"
        )
    if len(subjects_per_site) != sites:
        raise SyntheticDataError(
            f"subjects_per_site lists {len(subjects_per_site)} count(s) for {sites} site(s); "
            "give one per site or a single number for all"
        )
    if len(extra_subjects) != extra_sites:
        raise SyntheticDataError(
            f"extra_subjects lists {len(extra_subjects)} count(s) for {extra_sites} extra site(s)"
        )
    for what, counts in (("subjects_per_site", subjects_per_site), ("extra_subjects", extra_subjects)):
        for i, n in enumerate(counts):
            if not isinstance(n, int) or not 1 <= n <= MAX_SUBJECTS_PER_SITE:
                raise SyntheticDataError(f"{what}[{i}] must be from 1 to {MAX_SUBJECTS_PER_SITE}, got {n!r}")
    if fmt not in ("nifti", "dicom"):
        raise SyntheticDataError(f"format must be nifti or dicom, got {fmt!r}")
    _check_size(size)
    _check_seed(seed)
    if not isinstance(base_port, int) or base_port < 1 or base_port + sites + extra_sites > 65535:
        raise SyntheticDataError(
            f"base_port must be at least 1 and leave room for {sites + extra_sites} ports below 65536, "
            f"got {base_port!r}"
        )


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SyntheticDataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SyntheticDataError(
            f"{out}: folder exists and is not empty; choose another or pass force (--force)"
        )


def _write_site(
    root: Path,
    final_root: Path,
    *,
    seed: int,
    index: int,
    subjects: int,
    fmt: Format,
    modalities: tuple[str, ...],
    size: int,
    port: int,
    outside: bool,
) -> SiteLayout:
    """Generate one site under ROOT (a staging folder that will be moved to FINAL_ROOT)."""
    profile = site_profile(seed, index, size=size)
    site_id = profile.site_id
    site_dir = root / site_id
    data_dir = site_dir / "data"
    ids: list[str] = []
    for j in range(subjects):
        subject = generate_subject(seed, index, j, modalities=modalities, size=size, profile=profile)
        folder = data_dir / subject.patient_id
        if fmt == "dicom":
            write_dicom_subject(subject, folder)
        else:
            write_nifti_subject(subject, folder)
        ids.append(subject.patient_id)
    config = site_config_text(
        site_id=site_id,
        # Not the made-up InstitutionName of the DICOM headers: that is patient data, this is not.
        site_name=f"Demo site {index}",
        fmt=fmt,
        modalities=modalities,
        port=port,
        outside=outside,
    )
    (site_dir / "config.yaml").write_text(config)
    final_site = final_root / site_id
    return SiteLayout(
        site_id=site_id,
        index=index,
        root=final_site,
        config_path=final_site / "config.yaml",
        data_dir=final_site / "data",
        work_dir=final_site / "work",
        token_file=final_site / "coordinator.token",
        port=port,
        url=f"http://127.0.0.1:{port}",
        subjects=tuple(ids),
        outside=outside,
        shape=profile.shape,
        spacing=profile.spacing,
        institution=profile.institution,
    )


def generate_federation(
    out: Path,
    *,
    sites: int,
    subjects_per_site: Sequence[int],
    fmt: Format = "nifti",
    modalities: Sequence[str] = ("flair",),
    size: int = 64,
    seed: int = 0,
    extra_sites: int = 0,
    extra_subjects: Sequence[int] | int | None = None,
    base_port: int = DEFAULT_BASE_PORT,
    force: bool = False,
) -> FederationLayout:
    """Generate SITES sites (plus EXTRA_SITES held-out ones) with data, configs, federation file and plan.

    Site k (1-based) listens on BASE_PORT + k. Extra sites are numbered after the federation's
    (site-<sites+1>, ...) and have EXTRA_SUBJECTS subjects each (default: the median of
    SUBJECTS_PER_SITE). Everything is written to a staging folder next to OUT first and moved into
    place at the end, so an interrupted run leaves OUT as it was. With FORCE, an existing OUT keeps
    its other files but loses its site-<k> folders (data, work folders, tokens), federation.yaml
    and plan.json.
    """
    out = Path(out)
    mods = _check_modalities(modalities)
    counts = list(subjects_per_site)
    if extra_subjects is None:
        default_extra = int(np.median(counts)) if counts else 1
        extras = [max(1, default_extra)] * (extra_sites if isinstance(extra_sites, int) else 0)
    elif isinstance(extra_subjects, int):
        extras = [extra_subjects] * (extra_sites if isinstance(extra_sites, int) else 0)
    else:
        extras = list(extra_subjects)
    _check_federation_args(
        sites=sites,
        subjects_per_site=counts,
        fmt=fmt,
        size=size,
        seed=seed,
        extra_sites=extra_sites,
        extra_subjects=extras,
        base_port=base_port,
    )
    _prepare_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        inside: list[SiteLayout] = []
        held_out: list[SiteLayout] = []
        todo = [(k, counts[k - 1], False) for k in range(1, sites + 1)]
        todo += [(sites + e, extras[e - 1], True) for e in range(1, extra_sites + 1)]
        for index, n_subjects, is_outside in todo:
            site = _write_site(
                staging,
                out,
                seed=seed,
                index=index,
                subjects=n_subjects,
                fmt=fmt,
                modalities=mods,
                size=size,
                port=base_port + index,
                outside=is_outside,
            )
            (held_out if is_outside else inside).append(site)
        (staging / "federation.yaml").write_text(federation_text(inside, held_out, out))
        (staging / "plan.json").write_text(
            json.dumps(default_plan(modalities=mods, size=size), indent=2) + "\n"
        )
        _move_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return FederationLayout(
        root=out,
        sites=tuple(inside),
        outside=tuple(held_out),
        federation_path=out / "federation.yaml",
        plan_path=out / "plan.json",
        fmt=fmt,
        modalities=mods,
        size=size,
        seed=seed,
    )


def _move_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        staging.rename(out)
        return
    # --force on a used folder: drop what an earlier run generated, keep anything else.
    for entry in out.iterdir():
        if _OWN_ENTRY.fullmatch(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    for entry in staging.iterdir():
        entry.rename(out / entry.name)
