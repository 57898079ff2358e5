"""The image of an anatomy on a site's scanner, per modality: real-world values, then stored pixels.

Tissue contrasts per modality, then the site's intensity response, coil bias field, Rician noise
and rescale slope: the differences between sites that a federation has to cope with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from agent.data.synthetic.anatomy import Anatomy, smooth_field
from agent.data.synthetic.sites import SiteProfile
from agent.errors import SyntheticDataError

MODALITIES: tuple[str, ...] = ("flair", "t1", "t1gd", "t2")

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


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """A smooth multiplicative field (exp of a random quadratic), like coil sensitivity."""
    coords = np.meshgrid(*[np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape], indexing="ij")
    x, y, z = coords
    terms = [x, y, z, x * y, x * z, y * z, x * x, y * y, z * z]
    coef = rng.normal(0.0, 1.0, len(terms)).astype(np.float32)
    field = sum((c * t for c, t in zip(coef, terms, strict=True)), np.zeros(shape, dtype=np.float32))
    field /= float(np.abs(field).max()) + 1e-6
    return np.exp(strength * field).astype(np.float32)


def render(
    modality: str,
    anatomy: Anatomy,
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
    clean *= 1.0 + 0.05 * smooth_field(rng, shape, 1.5, spacing)
    clean = ndimage.gaussian_filter(np.clip(clean, 0.0, None), sigma=0.5)
    img = np.power(clean, profile.gamma) * _bias_field(rng, shape, profile.bias_strength) * profile.scale
    sigma = profile.noise * profile.scale
    # Magnitude images have Rician noise.
    real = img + np.float32(sigma) * rng.standard_normal(shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag) + np.float32(profile.offset)


def quantise(values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Real values -> stored uint16 pixel values, as a scanner writes them with this slope and intercept."""
    stored = np.rint((values - intercept) / slope)
    return np.clip(stored, 0, 65535).astype(np.uint16)


def check_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    """MODALITIES as a tuple, refused when empty, unknown or repeated (the message names which)."""
    mods = tuple(modalities)
    if not mods:
        raise SyntheticDataError("modalities: at least one is needed, e.g. flair")
    unknown = [m for m in mods if m not in MODALITIES]
    if unknown:
        raise SyntheticDataError(f"modalities: unknown {', '.join(unknown)}; known: {', '.join(MODALITIES)}")
    if len(set(mods)) != len(mods):
        raise SyntheticDataError(f"modalities: listed twice in {', '.join(mods)}")
    return mods
