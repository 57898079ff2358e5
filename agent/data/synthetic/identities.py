"""Made-up patient identities: what a PACS export would carry, and what must never leave a site.

Tests search logs and API answers for these names and IDs to prove that identity stays at the site.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np

from agent.data.synthetic.seeding import MAX_SITES, MAX_SUBJECTS_PER_SITE, random_stream
from agent.errors import SyntheticDataError

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


@functools.lru_cache(maxsize=8)
def _id_permutation(seed: int) -> np.ndarray:
    # One random permutation of 0..99999 per seed: IDs look random yet never repeat.
    return random_stream(seed, 0x9E).permutation(10**5)


def patient_identity(seed: int, site_index: int, subject_index: int) -> PatientIdentity:
    """A made-up identity; patient IDs are distinct across all sites and subjects for one seed."""
    if not 1 <= site_index <= MAX_SITES or not 0 <= subject_index < MAX_SUBJECTS_PER_SITE:
        raise SyntheticDataError(f"no identity for site {site_index} subject {subject_index}: out of range")
    rng = random_stream(seed, site_index, subject_index, 0x1D)
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
