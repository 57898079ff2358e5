"""The exam's slice grid and the head on it: tissue fractions and the tumour label map.

The anatomy does not depend on the modalities asked for: every modality renders the same head,
so asking for more channels never changes the label or another channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from agent.data.synthetic.sites import SiteProfile

# BraTS label values: necrotic / non-enhancing core, peritumoral oedema, enhancing tumour.
LABEL_NECROSIS, LABEL_OEDEMA, LABEL_ENHANCING = 1, 2, 4
TARGET_LABELS: tuple[int, ...] = (LABEL_NECROSIS, LABEL_OEDEMA, LABEL_ENHANCING)

_Vec = Sequence[float] | np.ndarray


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


def exam_geometry(profile: SiteProfile, rng: np.random.Generator) -> SliceGeometry:
    """The slice grid of one exam: the site's protocol, shifted by where this patient lay."""
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


def smooth_field(
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
class Anatomy:
    """What lies in each voxel, before any scanner sees it."""

    fractions: dict[str, np.ndarray]  # tissue -> fraction in [0, 1], summing to <= 1 (rest: air)
    label: np.ndarray
    lesions: int


def generate_anatomy(profile: SiteProfile, rng: np.random.Generator, geometry: SliceGeometry) -> Anatomy:
    """A head with skull, CSF, ventricles, grey and white matter and 1 to 3 lesions on GEOMETRY.

    Lesion size, count and location follow the site's patient population (PROFILE); RNG is the
    subject's own stream, so the head depends on (seed, site, subject) only.
    """
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
    r_head += 0.012 * smooth_field(rng, shape, 12.0, spacing)

    def inside(boundary: float | np.ndarray) -> np.ndarray:
        return _sigmoid((boundary - r_head) * mean_axis / edge)

    head = inside(1.0)
    skull_in = inside(0.93)
    csf_in = inside(0.87)
    brain_boundary = 0.835 + 0.012 * smooth_field(rng, shape, 5.0, spacing)
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
    wm = _sigmoid((depth_mm - 7.0 - 3.5 * smooth_field(rng, shape, 4.0, spacing)) / 1.2)
    deep = np.zeros(shape, dtype=np.float32)
    for side in (-1.0, 1.0):
        grid.soft_ellipsoid(deep, (side * 10.0, 6.0, 0.0), (7.0, 11.0, 7.0), np.eye(3), 2.0)
    wm *= 1.0 - 0.85 * deep

    lesion_field = smooth_field(rng, shape, 3.5, spacing)
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
    return Anatomy(fractions=fractions, label=label, lesions=count)
