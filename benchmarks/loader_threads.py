"""The time per batch of the training loader with `loader_threads`, against loading alone.

For small windows a batch's copying is short, and what the threads cost around it shows. On
generated NIfTI subjects, each repeat times epochs through `loading.batches`, as the engine
runs them (a new loader per epoch), in three ways:

* ``no_threads``: `loader_threads: 0`, the baseline: every sample placed by the training thread;
* ``threads_per_epoch``: THREADS placing threads started at the epoch's first batch and stopped
  with the epoch (what the engine does);
* ``threads_per_batch``: the same threads stopped after every batch, so every batch starts them
  again (what the engine did before they were kept for the epoch).

The batches are the same in all three (tests/data/test_loading.py). It prints JSON with the
medians of --repeats repeats in ms per batch and the ratios to the baseline, per case (2D slices,
3D patches), and writes ``loader_threads.png`` to --out.

    .venv/bin/python benchmarks/loader_threads.py --out bench-out/loader_threads [--threads 2] [--repeats 7]
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.config import load_config  # noqa: E402
from agent.data import loading  # noqa: E402
from agent.data.catalog import ItemRef, dataset_items, scan_datasets  # noqa: E402
from agent.data.loading import DataSettings, build_train_loader  # noqa: E402
from agent.db.engine import open_database  # noqa: E402
from coordinator.demo_federation import generate_federation  # noqa: E402

WAYS = ("no_threads", "threads_per_epoch", "threads_per_batch")
CASES = {"2d": DataSettings(spatial_dims=2, roi_size=[32, 32], samples_per_subject=16)}
CASES["3d"] = DataSettings(spatial_dims=3, roi_size=[16, 16, 16], samples_per_subject=16)


def _restarting(loader: Any) -> Iterator[Any]:
    """Batches of LOADER with its placing threads stopped after each: the next one starts them."""
    samples = loader.dataset
    assert isinstance(samples, loading.TrainSamples)
    for batch in loading.batches(loader, ahead=False):
        yield batch
        samples.close()


def _ms_per_batch(
    items: list[ItemRef], settings: DataSettings, cache: Path, way: str, threads: int, seed: int, epochs: int
) -> float:
    batches = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        loader = build_train_loader(
            items,
            settings,
            batch_size=2,
            seed=seed * 1000 + epoch,
            cache_dir=cache,
            threads=0 if way == "no_threads" else threads,
        )
        stream = _restarting(loader) if way == "threads_per_batch" else loading.batches(loader, ahead=False)
        for _ in stream:
            batches += 1
    return 1000 * (time.perf_counter() - start) / batches


def _chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.27
    for k, way in enumerate(WAYS):
        values = [result["cases"][case]["ms_per_batch"][way] for case in CASES]
        xs = [i + (k - 1) * width for i in range(len(CASES))]
        bars = ax.bar(xs, values, width, label=way.replace("_", " "))
        for bar, v in zip(bars, values, strict=True):
            ax.annotate(
                f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8
            )
    ax.set_xticks(range(len(CASES)), [f"{c}: {CASES[c].roi_size}" for c in CASES])
    ax.set_ylabel("ms per batch of 2 (median)")
    ax.set_title(f"loader threads: {result['threads']}, {result['machine']['cpus']} CPUs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/loader_threads"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per repeat (a new loader each)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    for name, least in {"threads": 2, "subjects": 1, "epochs": 1, "repeats": 1}.items():
        if getattr(args, name) < least:
            raise SystemExit(f"--{name} is {getattr(args, name)}; it must be at least {least}")

    work = Path(tempfile.mkdtemp(prefix="fedsite-loader-bench-"))
    try:
        layout = generate_federation(
            work / "fed", sites=1, subjects_per_site=[args.subjects], size=64, seed=0
        )
        cfg = load_config(layout.sites[0].config_path)
        db = open_database(cfg.db_url)
        scan_datasets(cfg, db)
        items = dataset_items(db, "brain")
        cases: dict[str, Any] = {}
        for case, settings in CASES.items():
            cache = work / f"cache-{case}"
            _ms_per_batch(items, settings, cache, "no_threads", args.threads, 0, 1)  # fills the cache
            times: dict[str, list[float]] = {way: [] for way in WAYS}
            for r in range(args.repeats):
                for way in WAYS:  # interleaved, so that the machine's load falls on all three alike
                    times[way].append(
                        _ms_per_batch(items, settings, cache, way, args.threads, r, args.epochs)
                    )
            ms = {way: round(statistics.median(v), 4) for way, v in times.items()}
            cases[case] = {
                "roi_size": settings.roi_size,
                "ms_per_batch": ms,
                "ratio_to_no_threads": {way: round(ms[way] / ms["no_threads"], 3) for way in WAYS},
                "per_batch_over_per_epoch": round(ms["threads_per_batch"] / ms["threads_per_epoch"], 3),
            }
        db.dispose()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {
        "benchmark": "loader_threads",
        "subjects": args.subjects,
        "batch_size": 2,
        "threads": args.threads,
        "epochs_per_repeat": args.epochs,
        "repeats": args.repeats,
        "cases": cases,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    _chart(result, args.out / "loader_threads.png")
    (args.out / "loader_threads.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
