"""How far one seed's result moves with the draw of the data: `paper_reproduction` runs that
differ only in `--sampling-seed-offset`, read together.

`paper_reproduction --sampling-seed-offset K` keeps each seed's initial weights and draws the data
anew (batches, crops, every epoch's seed, from the seed plus K). One run per seed cannot tell a
gap smaller than what the draw alone moves; several draws can. This reads the results.json of
such runs (every other setting equal; anything else is refused, naming the setting) and reports
per seed:

- every method's validation Dice inside the federation on each draw, its mean and range;
- each method's % of CDS on the same draw, and the % of CDS's mean over the draws that the
  method's mean reaches (the seed's estimate, with the standard error of the per-draw %);
- CDS's own range over the draws as a % of its mean: the noise floor of one run.

It prints JSON and writes ``draws.json`` and ``draws.png`` (% of CDS per seed and draw) to --out.

    .venv/bin/python -m benchmarks.draws RUN_DIR [RUN_DIR ...] --out bench-out/draws
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Settings that may differ between the runs read together: what a draw is, and where it went.
PER_RUN = frozenset({"sampling_seed_offset", "out"})
CDS = "CDS"


class DrawsError(ValueError):
    """Runs that cannot be read together; the message names the run and what is wrong."""


def load_run(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DrawsError(f"{path}: cannot read a paper_reproduction result ({exc})") from None
    if not isinstance(doc, dict) or doc.get("benchmark") != "paper_reproduction":
        raise DrawsError(f"{path}: not a paper_reproduction result")
    if CDS not in doc.get("methods", {}):
        raise DrawsError(f"{path}: has no CDS runs, so nothing to compare with (run --methods fl,cds)")
    return doc


def _by_seed(runs: Sequence[dict[str, Any]]) -> dict[int, float]:
    return {int(r["seed"]): float(r["inside"]) for r in runs}


def compare(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per seed and method, the Dice of every draw and the % of CDS on it (see the module doc)."""
    if len(docs) < 2:
        raise DrawsError("give at least two runs: one draw shows no spread")
    first = docs[0]["settings"]
    for doc in docs[1:]:
        for key in sorted(set(first) | set(doc["settings"])):
            if key not in PER_RUN and first.get(key) != doc["settings"].get(key):
                raise DrawsError(
                    f"{doc['settings'].get('out')}: setting {key} is {doc['settings'].get(key)!r}, "
                    f"{first.get('out')} has {first.get(key)!r}; only the draw may differ"
                )
    offsets = [int(doc["settings"].get("sampling_seed_offset", 0)) for doc in docs]
    if len(set(offsets)) != len(offsets):
        raise DrawsError(f"two runs share a draw: sampling seed offsets {offsets}")
    methods = [m for m in docs[0]["methods"] if all(m in doc["methods"] for doc in docs)]
    order = sorted(range(len(docs)), key=lambda i: offsets[i])
    dice = {m: [_by_seed(docs[i]["methods"][m]) for i in order] for m in methods}
    seeds = sorted(set.intersection(*(set(d) for m in methods for d in dice[m])))
    if not seeds:
        raise DrawsError("no seed ran in every run")
    per_seed: dict[str, Any] = {}
    for seed in seeds:
        cds = [d[seed] for d in dice[CDS]]
        cds_mean = statistics.fmean(cds)
        row: dict[str, Any] = {
            CDS: {
                "dice": cds,
                "mean": cds_mean,
                "min": min(cds),
                "max": max(cds),
                "range_pct_of_mean": 100 * (max(cds) - min(cds)) / cds_mean,
            }
        }
        for m in methods:
            if m == CDS:
                continue
            values = [d[seed] for d in dice[m]]
            pct = [100 * v / c for v, c in zip(values, cds, strict=True)]
            row[m] = {
                "dice": values,
                "mean": statistics.fmean(values),
                "pct_of_cds": pct,
                "pct_min": min(pct),
                "pct_max": max(pct),
                "pct_of_cds_mean": 100 * statistics.fmean(values) / cds_mean,
                "pct_standard_error": statistics.stdev(pct) / math.sqrt(len(pct)),
            }
        per_seed[str(seed)] = row
    summary = {
        m: {
            "pct_of_cds_mean_per_seed": [per_seed[str(s)][m]["pct_of_cds_mean"] for s in seeds],
            "seeds_within_0.5pct": sum(per_seed[str(s)][m]["pct_of_cds_mean"] >= 99.5 for s in seeds),
            "draws_within_0.5pct": sum(p >= 99.5 for s in seeds for p in per_seed[str(s)][m]["pct_of_cds"]),
        }
        for m in methods
        if m != CDS
    }
    return {
        "benchmark": "draws",
        "runs": [str(docs[i]["settings"].get("out")) for i in order],
        "sampling_seed_offsets": sorted(offsets),
        "seeds": seeds,
        "per_seed": per_seed,
        "summary": summary,
    }


def plot(report: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(report["summary"])
    seeds = report["seeds"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(methods))
    for k, m in enumerate(methods):
        for j, seed in enumerate(seeds):
            row = report["per_seed"][str(seed)][m]
            x = j + (k - (len(methods) - 1) / 2) * width
            ax.scatter([x] * len(row["pct_of_cds"]), row["pct_of_cds"], s=14, color=f"C{k}", alpha=0.6)
            ax.plot([x - width / 3, x + width / 3], [row["pct_of_cds_mean"]] * 2, color=f"C{k}", lw=2)
        ax.plot([], [], color=f"C{k}", lw=2, label=f"{m}: per draw (dots), of the means (bar)")
    ax.axhline(100, color="grey", lw=0.8)
    ax.axhline(99.5, color="grey", lw=0.8, ls="--", label="99.5% (within 0.5% of CDS)")
    ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    ax.set_ylabel("Dice inside, % of CDS on the same draw")
    ax.set_title(f"{len(report['sampling_seed_offsets'])} draws of the data per seed")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / "draws.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="paper_reproduction output folders (results.json)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/draws"))
    args = ap.parse_args(argv)
    try:
        report = compare([load_run(folder) for folder in args.runs])
    except DrawsError as exc:
        raise SystemExit(f"draws: {exc}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    report["png"] = str(plot(report, args.out))
    (args.out / "draws.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
