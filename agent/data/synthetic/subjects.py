"""One generated subject: the anatomy, rendered for every modality asked for, with its identity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from agent.data.synthetic.anatomy import TARGET_LABELS, SliceGeometry, exam_geometry, generate_anatomy
from agent.data.synthetic.identities import PatientIdentity, patient_identity
from agent.data.synthetic.rendering import MODALITIES, check_modalities, quantise, render
from agent.data.synthetic.seeding import MAX_SUBJECTS_PER_SITE, random_stream
from agent.data.synthetic.sites import SiteProfile, site_profile
from agent.errors import SyntheticDataError


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
    mods = check_modalities(modalities)
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
    rng = random_stream(seed, site_index, subject_index, 0xA7)
    geometry = exam_geometry(profile, rng)
    anatomy = generate_anatomy(profile, rng, geometry)
    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    stored: dict[str, np.ndarray] = {}
    for modality in mods:
        # One stream per modality: the channels are independent of which others were asked for.
        mrng = random_stream(seed, site_index, subject_index, 0xB0 + MODALITIES.index(modality))
        values = render(modality, anatomy, profile, mrng, spacing)
        stored[modality] = quantise(values, profile.rescale_slope, profile.rescale_intercept)
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
