"""Preprocessed-data cache: epoch 1 (cold cache, DICOM decoded) versus later epochs (warm cache).

On generated DICOM subjects (one series per subject, one file per slice), the script times, as the
median of --repeats runs:

* ``cold``: `build_train_loader` with an empty cache directory plus one full epoch: every series is
  decoded, reoriented, normalised and written to the cache;
* ``warm_epoch``: the second epoch of that same loader (only cached arrays are read);
* ``warm_loader``: a new loader on the warm cache (the next round) plus one epoch.

It prints JSON with the times and the ratios cold / warm (target: at least 10) and writes a bar chart
``cache_epochs.png`` to --out.

    .venv/bin/python benchmarks/cache_epochs.py --out bench-out/cache_epochs [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from agent.config import load_config  # noqa: E402
from agent.data.catalog import dataset_items, scan_datasets  # noqa: E402
from agent.data.loading import DataSettings, build_train_loader  # noqa: E402
from agent.db.engine import open_database  # noqa: E402
from coordinator.demo_federation import generate_federation  # noqa: E402

TARGET_RATIO = 10.0


def _epoch(loader: Any) -> int:
    n = 0
    for batch in loader:
        n += int(batch["image"].shape[0])
    return n


def _chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["epoch 1\n(cold cache)", "epoch 2\n(same loader)", "next loader\n(warm cache)"]
    values = [result["cold_s"], result["warm_epoch_s"], result["warm_loader_s"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(names, values, color=["#c0504d", "#4f81bd", "#9bbb59"])
    for bar, v in zip(bars, values, strict=True):
        ax.annotate(f"{v:.3f} s", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
    ax.set_ylabel("seconds (median)")
    ax.set_title(
        f"{result['subjects']} DICOM subjects {result['shape']}: cold/warm = {result['ratio_epoch']:.1f}x"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/cache_epochs"))
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="in-plane matrix size of the generated series")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="4 subjects of 64x64, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.subjects, args.size, args.repeats = 4, 64, 2
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    work = Path(tempfile.mkdtemp(prefix="fedsite-cache-bench-"))
    try:
        layout = generate_federation(
            work / "fed", sites=1, subjects_per_site=[args.subjects], fmt="dicom", size=args.size, seed=0
        )
        cfg = load_config(layout.sites[0].config_path)
        db = open_database(cfg.db_url)
        scan_datasets(cfg, db)
        items = dataset_items(db, "brain")
        roi = min(128, args.size)
        settings = DataSettings(roi_size=[roi, roi], samples_per_subject=16)
        colds, warm_epochs, warm_loaders = [], [], []
        samples = 0
        for r in range(args.repeats):
            cache = work / f"cache-{r}"
            start = time.perf_counter()
            loader = build_train_loader(items, settings, batch_size=16, seed=r, cache_dir=cache)
            samples = _epoch(loader)
            colds.append(time.perf_counter() - start)
            start = time.perf_counter()
            _epoch(loader)
            warm_epochs.append(time.perf_counter() - start)
            start = time.perf_counter()
            _epoch(build_train_loader(items, settings, batch_size=16, seed=r, cache_dir=cache))
            warm_loaders.append(time.perf_counter() - start)
        cold = statistics.median(colds)
        warm_epoch = statistics.median(warm_epochs)
        warm_loader = statistics.median(warm_loaders)
        site = layout.sites[0]
        result: dict[str, Any] = {
            "benchmark": "cache_epochs",
            "subjects": len(items),
            "shape": list(site.shape),
            "slices_per_series": site.shape[2],
            "samples_per_epoch": samples,
            "roi_size": settings.roi_size,
            "repeats": args.repeats,
            "cold_s": round(cold, 4),
            "warm_epoch_s": round(warm_epoch, 4),
            "warm_loader_s": round(warm_loader, 4),
            "ratio_epoch": round(cold / warm_epoch, 2),
            "ratio_loader": round(cold / warm_loader, 2),
            "target_ratio": TARGET_RATIO,
            "meets_target": cold / warm_epoch >= TARGET_RATIO and cold / warm_loader >= TARGET_RATIO,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        }
        db.dispose()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    _chart(result, args.out / "cache_epochs.png")
    (args.out / "cache_epochs.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
