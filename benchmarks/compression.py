"""Compressed updates on the quick paper reproduction: bytes per round and final Dice per encoding.

The quick setting of `benchmarks/paper_reproduction.py` (10 sites of the study's split at scale
0.2 plus two outside sites, real agents over HTTP, 6 FedAvg rounds of 10 local epochs, seed 0)
runs FL once per encoding of the sites' updates, on the same agents and data, in one run:

* ``float32``: full weights in float32 (what every round sent before; the baseline);
* ``float16``: full weights in float16 (``transfer_dtype``);
* ``int8``: the difference to the global model in int8, one scale per output channel;
* ``int8_topk-F``: the difference's largest fraction F (--topk-fractions) of values per tensor
  in int8 with a bit mask of where they go, the rest kept at each site and added to its next
  difference (error feedback).

Per encoding it reports the size of the updates the sites released per round (the payloads,
kept by the coordinator with ``keep_updates``: what compression shrinks), everything on the wire
per round as the coordinator counted it (global weights down, updates up, and the status polls'
JSON, which on a model this small is a fair share), the ratios of both to float32, and the final
model's Dice inside the federation with its loss against float32. The goal: at most 0.25x the
float32 update bytes at a Dice loss of at most 0.005. Prints JSON and writes
``compression.png`` to --out.

    .venv/bin/python -m benchmarks.compression --out bench-out/compression [--topk-fractions 0.1,0.25]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks.paper_reproduction import (
    MethodRunner,
    federation_file,
    parse_args,
    prepare,
    settings_from,
)
from coordinator.local import LocalFederation, terminate_on_sigterm
from coordinator.options import RunOptions

GOAL_BYTES_RATIO = 0.25
GOAL_DICE_LOSS = 0.005


def variants(topk_fractions: list[float]) -> dict[str, dict[str, Any]]:
    """What each encoding changes in the plan."""
    out: dict[str, dict[str, Any]] = {
        "float32": {"send": "weights", "transfer_dtype": "float32"},
        "float16": {"send": "weights", "transfer_dtype": "float16"},
        "int8": {"send": "diff", "compression": {"mode": "int8", "scale": "channel"}},
    }
    for f in topk_fractions:
        out[f"int8_topk-{f:g}"] = {
            "send": "diff",
            "compression": {"mode": "int8_topk", "topk_fraction": f, "scale": "channel"},
        }
    return out


def _update_bytes(run_dir: Path) -> int:
    """The size of every update the sites released in a run (kept under RUN_DIR/updates)."""
    return sum(p.stat().st_size for p in (run_dir / "updates").glob("*.safetensors"))


def _chart(rows: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    bars = left.bar(names, [rows[n]["update_bytes_per_round"] / 1e6 for n in names], color="tab:blue")
    left.bar_label(bars, labels=[f"{rows[n]['update_bytes_ratio']:.3f}x" for n in names], fontsize=8)
    left.set_ylabel("MB of updates per round")
    left.set_title("update bytes (ratio to float32)")
    dice = [rows[n]["dice"] or 0.0 for n in names]
    bars = right.bar(names, dice, color="tab:green")
    right.bar_label(bars, labels=[f"{d:.4f}" for d in dice], fontsize=8)
    right.set_ylim(min(dice) - 0.05 if dice else 0, 1)
    right.set_ylabel("final Dice inside the federation")
    right.set_title("model quality")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/compression"))
    ap.add_argument(
        "--topk-fractions", default="0.1,0.25", help="int8_topk: fractions of values sent, comma-separated"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        fractions = [float(x) for x in args.topk_fractions.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--topk-fractions: {args.topk_fractions!r} is not a comma-separated list of numbers")
    if any(not 0 < f <= 1 for f in fractions):
        ap.error("--topk-fractions must each be in (0, 1]")
    s = settings_from(parse_args(["--quick", "--methods", "fl", "--out", str(args.out)]))
    console = Console(stderr=True)
    t0 = time.monotonic()
    s.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    with terminate_on_sigterm():
        layout = prepare(console, s)
        with LocalFederation(s.out / "logs") as local:
            agents = local.start_many({x.site_id: x.config_path for x in layout.all_sites})
            fed = federation_file(s, layout, agents)
            runner = MethodRunner(console, s, fed, layout)
            for name, change in variants(fractions).items():
                plan = {**copy.deepcopy(runner.seeded(args.seed)), **change}
                console.rule(f"[bold]FL with {name} updates")
                res, summary = runner.run_over_agents(
                    f"fl-{name}",
                    args.seed,
                    plan,
                    RunOptions(
                        strategy="fedavg",
                        rounds=s.rounds,
                        evaluate=False,
                        reseed_rounds=True,
                        run_id=f"fl-{name}-s{args.seed}",
                        keep_updates=True,
                    ),
                )
                n = len(res.doc["rounds"])
                rows[name] = {
                    "plan_change": change,
                    "dice": summary["inside"],
                    "dice_outside": summary["outside"],
                    "update_bytes_per_round": _update_bytes(res.out_dir) / n,
                    "wire_bytes_per_round": (summary["bytes_sent"] + summary["bytes_received"]) / n,
                    "duration_s": summary["duration_s"],
                }
                console.print(
                    f"{name}: Dice {summary['inside']}, {rows[name]['update_bytes_per_round']:.0f} B/round up"
                )
    base = rows["float32"]
    for row in rows.values():
        row["update_bytes_ratio"] = round(row["update_bytes_per_round"] / base["update_bytes_per_round"], 4)
        row["wire_bytes_ratio"] = round(row["wire_bytes_per_round"] / base["wire_bytes_per_round"], 4)
        both = isinstance(row["dice"], float) and isinstance(base["dice"], float)
        row["dice_loss"] = round(base["dice"] - row["dice"], 4) if both else None
    best = {
        name: row
        for name, row in rows.items()
        if name != "float32"
        and row["update_bytes_ratio"] <= GOAL_BYTES_RATIO
        and row["dice_loss"] is not None
        and row["dice_loss"] <= GOAL_DICE_LOSS
    }
    result = {
        "benchmark": "compression",
        "setting": "paper reproduction --quick, FedAvg, seed " + str(args.seed),
        "rounds": s.rounds,
        "topk_fractions": fractions,
        "by_encoding": rows,
        "goal": f"update bytes <= {GOAL_BYTES_RATIO} x float32 at a Dice loss <= {GOAL_DICE_LOSS}",
        "goal_met_by": sorted(best),
        "duration_s": round(time.monotonic() - t0, 1),
    }
    _chart(rows, s.out / "compression.png")
    (s.out / "compression.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
