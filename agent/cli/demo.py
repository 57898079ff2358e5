"""`fedsite demo-data` (a ready-to-run federation of made-up sites) and `fedsite demo` (a whole
federation on this machine).

`demo-data` writes what a demo, a test or a benchmark needs and nothing a person must edit:
each site's data and agent config, the coordinator's federation file and a default training
plan. Writing them is `coordinator.demo_federation`'s job; this module parses the command line
and prints the summary.

The two commands are two Typer apps only so that `fedsite --help` keeps listing `demo-data`
beside `data` and `demo` after `coordinate`.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from agent.data.synthetic.rendering import MODALITIES
from agent.data.synthetic.writers import Format
from agent.errors import SyntheticDataError
from coordinator.demo_federation import (
    DEFAULT_BASE_PORT,
    PAPER_SPLIT,
    FederationLayout,
    SiteLayout,
    generate_federation,
)

demo_data_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
demo_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def parse_counts(text: str, *, what: str = "--subjects-per-site") -> list[int]:
    """'8,6,4' -> [8, 6, 4]; '5' -> [5]. Raises SyntheticDataError naming WHAT on bad input."""
    parts = [p.strip() for p in text.split(",")]
    counts: list[int] = []
    for part in parts:
        if not part.isdigit():
            raise SyntheticDataError(f"{what}: {part!r} is not a whole number (expected e.g. 8,6,4 or 5)")
        counts.append(int(part))
    return counts


def _resolve_counts(sites: int | None, subjects: str | None, paper_split: bool) -> tuple[int, list[int]]:
    if paper_split:
        if sites is not None and sites != len(PAPER_SPLIT):
            raise SyntheticDataError(
                f"--paper-split makes {len(PAPER_SPLIT)} sites; --sites {sites} contradicts it"
            )
        if subjects is not None:
            raise SyntheticDataError(
                "--paper-split fixes the subjects per site; leave out --subjects-per-site"
            )
        return len(PAPER_SPLIT), list(PAPER_SPLIT)
    n = 3 if sites is None else sites
    if n < 1:
        raise SyntheticDataError(f"--sites must be at least 1, got {n}")
    if subjects is None:
        return n, [6] * n
    counts = parse_counts(subjects)
    if len(counts) == 1:
        return n, counts * n
    if len(counts) != n:
        raise SyntheticDataError(
            f"--subjects-per-site lists {len(counts)} counts for {n} site(s); "
            "give one per site or a single number"
        )
    return n, counts


def _summary(layout: FederationLayout) -> str:
    lines = [
        f"Generated {len(layout.sites)} site(s) in {layout.root} "
        f"({layout.fmt}, {', '.join(layout.modalities)}, in-plane size {layout.size}, seed {layout.seed}):"
    ]

    def row(s: SiteLayout) -> str:
        shape = "x".join(str(n) for n in s.shape)
        spacing = "x".join(f"{v:g}" for v in s.spacing)
        tag = "  (outside the federation)" if s.outside else ""
        return (
            f"  {s.site_id:<8} {len(s.subjects):>3} subjects  {shape:>10} vox  {spacing:>17} mm  "
            f"port {s.port}  {s.config_path}{tag}"
        )

    lines += [row(s) for s in layout.sites]
    lines += [row(s) for s in layout.outside]
    total = sum(len(s.subjects) for s in layout.all_sites)
    lines += [
        f"  {total} subjects in all",
        f"Federation file: {layout.federation_path}",
        f"Default plan:    {layout.plan_path}",
        "Next, per site: `fedsite tokens add coordinator --role coordinator --config <site>/config.yaml`",
        "  (its last line is the token: put it in <site>/coordinator.token), then `fedsite serve --config "
        "<site>/config.yaml`.",
    ]
    return "\n".join(lines)


@demo_data_app.command("demo-data")
def demo_data(
    out: Path = typer.Argument(..., help="Folder to create (must be empty or missing unless --force)."),
    sites: int | None = typer.Option(None, "--sites", help="Number of sites in the federation (default 3)."),
    subjects_per_site: str | None = typer.Option(
        None,
        "--subjects-per-site",
        help="Subjects per site: one number for all, or one per site (8,6,4). Default 6.",
    ),
    paper_split: bool = typer.Option(
        False,
        "--paper-split",
        help="10 sites with 70, 27, 17, 12, 11, 9, 6, 6, 4, 3 subjects (the reference study).",
    ),
    extra_sites: int = typer.Option(
        0, "--extra-sites", min=0, help="Extra sites kept outside the federation (held-out test sites)."
    ),
    extra_subjects: int | None = typer.Option(
        None, "--extra-subjects", min=1, help="Subjects per extra site (default: median of the federation's)."
    ),
    fmt: str = typer.Option(
        "nifti", "--format", help="nifti or dicom (one series per subject and modality)."
    ),
    modalities: str = typer.Option(
        "flair", "--modalities", help=f"Comma-separated, from {','.join(MODALITIES)}."
    ),
    size: int = typer.Option(
        64, "--size", help="In-plane matrix size (multiple of 8; 128 for the paper setting)."
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="Same seed, same data."),
    base_port: int = typer.Option(
        DEFAULT_BASE_PORT, "--base-port", help="Site k's agent listens on base port + k."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Reuse a non-empty OUT: replaces its site-<k> folders, federation.yaml and plan.json.",
    ),
) -> None:
    """Generate brain-MRI-like data with tumour-like lesions for a federation of sites.

    Writes OUT/site-<k>/data/<patient-id>/ (images and seg.nii.gz), OUT/site-<k>/config.yaml,
    OUT/federation.yaml and OUT/plan.json. Sites differ like real institutions (scanner
    intensities, bias field, noise, contrast, resolution, lesion sizes and locations).
    """
    try:
        n_sites, counts = _resolve_counts(sites, subjects_per_site, paper_split)
        if fmt not in ("nifti", "dicom"):
            raise SyntheticDataError(f"--format must be nifti or dicom, got {fmt!r}")
        fmt_lit: Format = "dicom" if fmt == "dicom" else "nifti"
        mods = [m.strip().lower() for m in modalities.split(",") if m.strip()]
        layout = generate_federation(
            out,
            sites=n_sites,
            subjects_per_site=counts,
            fmt=fmt_lit,
            modalities=mods,
            size=size,
            seed=seed,
            extra_sites=extra_sites,
            extra_subjects=extra_subjects,
            base_port=base_port,
            force=force,
        )
    except SyntheticDataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(_summary(layout))


@demo_app.command("demo")
def demo(
    out: Path = typer.Option(
        Path("demo-out"), "--out", help="Folder for the generated sites and the results."
    ),
    sites: int = typer.Option(3, "--sites", min=1, max=10, help="Number of generated sites."),
    rounds: int = typer.Option(3, "--rounds", min=1, max=50, help="FedAvg rounds."),
    subjects: str | None = typer.Option(
        None, "--subjects-per-site", help="Subjects per site, comma-separated (default: 8,6,4,...)."
    ),
    size: int = typer.Option(32, "--size", min=16, max=256, help="Generated volume size (voxels per side)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the generated data and the model."),
) -> None:
    """Generate sites, start their agents, run FedAvg through them, verify their audit logs."""
    from coordinator.demo import run_demo
    from coordinator.errors import DemoError

    try:
        run_demo(out, sites=sites, rounds=rounds, subjects=subjects, size=size, seed=seed)
    except DemoError as exc:
        Console(stderr=True).print(f"[red]demo failed:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        Console(stderr=True).print("demo interrupted; every agent it started has been stopped")
        raise typer.Exit(130) from None
