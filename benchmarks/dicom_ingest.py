"""DICOM ingest speed: our series assembly versus dcm2niix on the same generated files.

For each series size, the script writes one single-frame MR series, then times (--repeats rounds,
each running the three below in turn, after one untimed warm-up of each so all read from the page
cache; ratios are taken within a round, and their median and range reported):

* ``ours_scan``: ``scan_dicom_folder`` -> volumes in memory (what the agent's catalog and loaders use);
* ``ours_nifti``: the same plus writing the volume as uncompressed NIfTI (like for like with dcm2niix);
* ``dcm2niix``: ``dcm2niix -z n`` writing uncompressed NIfTI, as a subprocess.

Wall-clock ratios are the target; CPU-second ratios are reported too, because on a shared machine the
wall clock mostly measures the other processes. Each side's output of the previous repeat is
deleted before its timing starts: what is timed is writing a new file, as a conversion does, and
not freeing the old one (which the kernel would charge to whichever side runs when memory is short).

``--cold`` drops the page cache before every timed run (Linux, as root), so the files come from
the disk: what an agent meets on its first read of a hospital's folder, and what the reader
threads are for.

It prints JSON with per-size times and the ratios ours/dcm2niix (target: at most 1.0, to volumes and
to NIfTI, on every size) and writes a bar chart ``dicom_ingest.png`` to --out.

    .venv/bin/python benchmarks/dicom_ingest.py --out bench-out/dicom_ingest [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.data.dicom import scan_dicom_folder  # noqa: E402
from agent.data.volume import write_nifti  # noqa: E402
from tests.fixtures.dicom import write_series  # noqa: E402  (the series writer the tests use)

FULL_SIZES = [(1000, 64, 64), (200, 256, 256), (300, 512, 512)]
QUICK_SIZES = [(200, 64, 64), (60, 256, 256), (30, 512, 512)]
TARGET_RATIO = 1.0


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# Per measured function: its wall-clock seconds and its CPU seconds, one of each per repeat.
Times = dict[str, tuple[list[float], list[float]]]

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def _drop_page_cache() -> None:
    os.sync()
    DROP_CACHES.write_text("1\n")


def _interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    *,
    cold: bool = False,
    before: dict[str, Callable[[], Any]] | None = None,
) -> Times:
    """Wall-clock and CPU seconds (this process, its threads and its children) of each of FNS.

    Each repeat runs every function once, in turn, so that a change in the machine's state (other
    processes, the page cache of a VM whose memory the host reclaims) falls on all of them alike
    and the ratios are taken within one repeat. BEFORE[name], where given, runs untimed before
    each run of fns[name]; COLD drops the page cache after it.
    """
    before = before or {}
    for name, fn in fns.items():
        before.get(name, lambda: None)()
        fn()  # warm-up: page cache, imports
    times: Times = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            before.get(name, lambda: None)()
            # The previous run's output still being written back to disk would slow this one (the
            # largest size writes 157 MB a run): flushed first, outside the timing, for each side.
            if cold:
                _drop_page_cache()
            else:
                os.sync()
            cpu0, start = _cpu_seconds(), time.perf_counter()
            fn()
            times[name][0].append(time.perf_counter() - start)
            times[name][1].append(_cpu_seconds() - cpu0)
    return times


def _ratios(ours: list[float], theirs: list[float]) -> dict[str, float]:
    """Median and range of the per-repeat ratios ours / theirs."""
    per_repeat = [a / max(b, 1e-9) for a, b in zip(ours, theirs, strict=True)]
    return {
        "median": round(statistics.median(per_repeat), 3),
        "min": round(min(per_repeat), 3),
        "max": round(max(per_repeat), 3),
    }


def _fresh(out: Path) -> None:
    """OUT, empty: the previous repeat's output deleted (untimed)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)


def _run_dcm2niix(folder: Path, out: Path) -> None:
    proc = subprocess.run(
        ["dcm2niix", "-z", "n", "-x", "n", "-f", "%s", "-o", str(out), str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not list(out.glob("*.nii")):
        raise RuntimeError(f"dcm2niix failed on {folder}: {proc.stdout[-500:]} {proc.stderr[-500:]}")


def _ours_scan(folder: Path, workers: int | None) -> None:
    scan = scan_dicom_folder(folder, workers=workers)
    if len(scan.volumes) != 1:
        raise RuntimeError(f"{folder}: expected one volume, found {len(scan.volumes)}")


def _ours_nifti(folder: Path, out: Path, workers: int | None) -> None:
    scan = scan_dicom_folder(folder, workers=workers)
    for n, volume in enumerate(scan.volumes):
        write_nifti(volume, out / f"{n:03d}.nii")


def _chart(results: list[dict[str, Any]], path: Path, page_cache: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["name"] for r in results]
    series = [
        ("ours: to volumes", "ours_scan_s"),
        ("ours: to NIfTI", "ours_nifti_s"),
        ("dcm2niix -z n", "dcm2niix_s"),
    ]
    width = 0.27
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n, (label, key) in enumerate(series):
        xs = [i + (n - 1) * width for i in range(len(results))]
        bars = ax.bar(xs, [r[key] for r in results], width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(results)), labels)
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"DICOM series ingest: fedsite vs dcm2niix ({page_cache} page cache)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("bench-out/dicom_ingest"), help="folder for the PNG and JSON"
    )
    parser.add_argument("--quick", action="store_true", help="small series, for a smoke run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument(
        "--workers", type=int, default=None, help="reader processes (default: CPUs, at most 8)"
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="where to write the series (default: a temp dir)"
    )
    parser.add_argument(
        "--cold", action="store_true", help="drop the page cache before every timed run (Linux, root)"
    )
    args = parser.parse_args(argv)
    if shutil.which("dcm2niix") is None:
        print("dcm2niix is not installed (Debian package dcm2niix)", file=sys.stderr)
        return 2
    if args.cold and not os.access(DROP_CACHES, os.W_OK):
        print(f"--cold needs to write {DROP_CACHES} (Linux, as root)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    data_root = args.data or Path(tempfile.mkdtemp(prefix="fedsite-dicom-bench-"))
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    results: list[dict[str, Any]] = []
    try:
        for slices, rows, cols in sizes:
            name = f"{slices}x{rows}x{cols}"
            folder = data_root / name / "series"
            if not folder.exists():
                write_series(
                    folder, n_slices=slices, rows=rows, cols=cols, slice_spacing=1.0, seed=slices, smooth=True
                )
            scratch = data_root / name / "out"
            times = _interleaved(
                {
                    "ours_scan": partial(_ours_scan, folder, args.workers),
                    "ours_nifti": partial(_ours_nifti, folder, scratch / "ours", args.workers),
                    "dcm2niix": partial(_run_dcm2niix, folder, scratch / "dcm2niix"),
                },
                args.repeats,
                cold=args.cold,
                before={
                    "ours_nifti": partial(_fresh, scratch / "ours"),
                    "dcm2niix": partial(_fresh, scratch / "dcm2niix"),
                },
            )
            median = {name: statistics.median(walls) for name, (walls, _) in times.items()}
            median_cpu = {name: statistics.median(cpus) for name, (_, cpus) in times.items()}
            ours_scan, ours_nifti, theirs = median["ours_scan"], median["ours_nifti"], median["dcm2niix"]
            scan_ratio = _ratios(times["ours_scan"][0], times["dcm2niix"][0])
            nifti_ratio = _ratios(times["ours_nifti"][0], times["dcm2niix"][0])
            size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
            results.append(
                {
                    "name": name,
                    "slices": slices,
                    "rows": rows,
                    "cols": cols,
                    "megabytes": round(size_mb, 1),
                    "ours_scan_s": round(ours_scan, 4),
                    "ours_nifti_s": round(ours_nifti, 4),
                    "dcm2niix_s": round(theirs, 4),
                    # Medians of the per-repeat ratios, with their range.
                    "ratio_scan": scan_ratio["median"],
                    "ratio_nifti": nifti_ratio["median"],
                    "ratio_scan_range": [scan_ratio["min"], scan_ratio["max"]],
                    "ratio_nifti_range": [nifti_ratio["min"], nifti_ratio["max"]],
                    "ours_scan_cpu_s": round(median_cpu["ours_scan"], 4),
                    "ours_nifti_cpu_s": round(median_cpu["ours_nifti"], 4),
                    "dcm2niix_cpu_s": round(median_cpu["dcm2niix"], 4),
                    "ratio_nifti_cpu": _ratios(times["ours_nifti"][1], times["dcm2niix"][1])["median"],
                }
            )
            print(
                f"{name}: ours {ours_scan:.3f}s / {ours_nifti:.3f}s (NIfTI), dcm2niix {theirs:.3f}s",
                file=sys.stderr,
            )
    finally:
        if args.data is None:
            shutil.rmtree(data_root, ignore_errors=True)
    worst = max(r["ratio_nifti"] for r in results)
    worst_scan = max(r["ratio_scan"] for r in results)
    worst_cpu = max(r["ratio_nifti_cpu"] for r in results)
    report = {
        "benchmark": "dicom_ingest",
        "repeats": args.repeats,
        "workers": args.workers,
        "page_cache": "cold" if args.cold else "warm",
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "target_ratio": TARGET_RATIO,
        "worst_ratio_scan": worst_scan,
        "worst_ratio_nifti": worst,
        "worst_ratio_nifti_cpu": worst_cpu,
        "meets_target": max(worst, worst_scan) <= TARGET_RATIO,
        "sizes": results,
    }
    _chart(results, args.out / "dicom_ingest.png", report["page_cache"])
    (args.out / "dicom_ingest.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
