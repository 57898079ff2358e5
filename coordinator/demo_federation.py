"""A demo federation on disk: sites with generated data, their agent configs, the federation file, a plan.

`fedsite demo` runs on it (coordinator/demo.py), `fedsite demo-data` writes it for people to run by
hand, and the tests and benchmarks start their local federations from it.

Why here, beside the demo, and not in ``agent.data.synthetic``: the data generator makes images of
made-up patients; what this module adds is what connects a coordinator to its agents: each site's
agent config, the coordinator's federation file (its format belongs to ``coordinator.federation``)
and a training plan. ``agent.data`` sits low in the agent's layers and must not know the
coordinator's file formats; the demo, which already drives both sides, is where that knowledge
lives. The `fedsite demo-data` command is command-line code, which may import the coordinator;
the data package's library modules never do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.data.synthetic.rendering import check_modalities
from agent.data.synthetic.seeding import MAX_SITES, MAX_SUBJECTS_PER_SITE, check_seed, check_size
from agent.data.synthetic.sites import site_profile
from agent.data.synthetic.subjects import generate_subject
from agent.data.synthetic.writers import Format, write_dicom_subject, write_nifti_subject
from agent.errors import SyntheticDataError

# Subjects per site in the reference study's real institutional split.
PAPER_SPLIT: tuple[int, ...] = (70, 27, 17, 12, 11, 9, 6, 6, 4, 3)
DATASET_NAME = "brain"
DEFAULT_BASE_PORT = 8100


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
    check_size(size)
    check_seed(seed)
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
    mods = check_modalities(modalities)
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
