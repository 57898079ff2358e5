"""Secure FedAvg against plain FedAvg over HTTP, with real agents: one round of each, same sites,
same plan (sending differences), alternating which goes first.

Each site gets a secure-aggregation key and the roster; the secure round runs the whole protocol
through the agents' `/v1/rounds/{id}/secagg/...` routes (`coordinator.strategies.secure_fedavg`).
Reported per mode, as medians over --repeats pairs of rounds:

* bytes on the wire per round (request and response bodies between the coordinator and the
  sites: plan, weights, status polls, and for the secure round the protocol's messages and the
  masked updates), and the ratio secure / plain (goal: under 1.5);
* the round's wall time (results.json's `duration_s`: plan sent to aggregated model), and the
  ratio, after one uncounted warm-up round of each. On a shared machine the times carry the
  neighbours' noise; the bytes do not.

The in-process benchmark of the protocol's own CPU cost per site is `benchmarks/secure_aggregation.py`.
It prints JSON and writes ``secure_fedavg_http.png`` to --out.

    .venv/bin/python benchmarks/secure_fedavg_http.py --out bench-out/secure_http [--sites 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from agent.exchange.secagg import generate_site_key, public_key_b64, write_site_key  # noqa: E402
from coordinator.demo_federation import default_plan, generate_federation  # noqa: E402
from coordinator.federation import Federation, parse_federation  # noqa: E402
from coordinator.local import LocalFederation, add_static_token  # noqa: E402
from coordinator.options import RunOptions  # noqa: E402
from coordinator.report import QuietReporter  # noqa: E402
from coordinator.runner import run_strategy  # noqa: E402
from coordinator.weights import initial_weights  # noqa: E402

TARGET_BYTES_RATIO = 1.5
TIMEOUTS = {"connect": 5, "read": 120, "round": 1800, "evaluation": 1800}


def _plan(quick: bool, sites: int) -> dict[str, Any]:
    plan = default_plan(size=32)
    if quick:
        plan["model"].update({"channels": [4, 8], "strides": [2], "num_res_units": 0})
        plan["data"].update({"samples_per_subject": 4})
        plan["batch_size"] = 8
    else:
        plan["model"].update({"channels": [16, 32, 64, 128], "strides": [2, 2, 2]})
    plan["send"] = "diff"
    plan["aggregation"] = {"mode": "secure", "threshold": sites // 2 + 1, "clip": 0.5, "max_weight": 100_000}
    return plan


def _configure(configs: dict[str, Path], root: Path) -> dict[str, str]:
    """A key per site, the roster in every config; returns the public keys."""
    keys = {name: generate_site_key() for name in configs}
    public = {name: public_key_b64(key) for name, key in keys.items()}
    for name, path in configs.items():
        key_file = root / "keys" / f"{name}.key"
        key_file.parent.mkdir(parents=True, exist_ok=True)
        write_site_key(key_file, keys[name])
        doc = yaml.safe_load(path.read_text())
        doc["device"] = "cpu"
        doc["secure_aggregation"] = {
            "site_key_file": str(key_file),
            "peers": public,
            "min_threshold": 2,
            "min_sites": 2,
        }
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return public


def _round(fed: Federation, plan: dict[str, Any], strategy: str, out: Path, run_id: str) -> dict[str, Any]:
    run_plan = plan if strategy == "secure_fedavg" else {k: v for k, v in plan.items() if k != "aggregation"}
    options = RunOptions(strategy=strategy, rounds=1, run_id=run_id, evaluate=False, evaluate_final=False)
    result = run_strategy(
        fed, run_plan, out, options, initial_weights=initial_weights(run_plan), reporter=QuietReporter()
    )
    record = result.rounds[0]
    return {
        "round_s": float(record["duration_s"]),
        "bytes": int(record["bytes_sent"]) + int(record["bytes_received"]),
        "bytes_to_sites": int(record["bytes_sent"]),
        "bytes_from_sites": int(record["bytes_received"]),
        "slowest_site_s": max(float(t["duration_s"]) for t in record["training"].values()),
        "error_bound": (record.get("secure_aggregation") or {}).get("error_bound"),
    }


def _chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["plain", "secure"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    left.bar(modes, [result[m]["round_s_median"] for m in modes], color=["#4c72b0", "#55a868"])
    left.set_ylabel("seconds per round (median)")
    left.set_title(f"wall time: secure / plain = {result['time_ratio']:.3f}")
    right.bar(modes, [result[m]["bytes_median"] / 1024 for m in modes], color=["#4c72b0", "#55a868"])
    right.set_ylabel("KiB on the wire per round (bodies)")
    right.set_title(f"bytes: secure / plain = {result['bytes_ratio']:.4f}")
    fig.suptitle(f"{result['sites']} real agents over HTTP, {result['model_values']} model values")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "round_s_median": statistics.median(r["round_s"] for r in runs),
        "bytes_median": statistics.median(r["bytes"] for r in runs),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a tiny model: mostly orchestration")
    args = parser.parse_args(argv)
    if args.sites < 2:
        parser.error("--sites must be at least 2")
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="secure-http-"))
    plan = _plan(args.quick, args.sites)
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "secure": []}
    try:
        layout = generate_federation(
            root / "data", sites=args.sites, subjects_per_site=[6] * args.sites, size=32, seed=0
        )
        configs = {s.site_id: s.config_path for s in layout.sites}
        tokens = {name: add_static_token(path) for name, path in configs.items()}
        public = _configure(configs, root)
        with LocalFederation(root / "logs") as local:
            agents = local.start_many(configs)
            fed = parse_federation(
                {
                    "agents": [
                        {"name": n, "url": a.url, "token": tokens[n], "secagg_public_key": public[n]}
                        for n, a in agents.items()
                    ],
                    "timeouts": TIMEOUTS,
                    "poll_interval": 0.5,
                },
                source=root / "federation.yaml",
            )
            # One round of each first, not counted: the sites' first round pays for the worker's
            # start and the data cache.
            for mode in ("plain", "secure"):
                strategy = "secure_fedavg" if mode == "secure" else "fedavg"
                _round(fed, plan, strategy, root / f"{mode}-warmup", f"{mode}-warmup")
            for i in range(args.repeats):
                order = ["plain", "secure"] if i % 2 == 0 else ["secure", "plain"]
                for mode in order:
                    strategy = "secure_fedavg" if mode == "secure" else "fedavg"
                    runs[mode].append(_round(fed, plan, strategy, root / f"{mode}-{i}", f"{mode}-{i}"))
        values = sum(t.numel() for t in initial_weights(plan).values())
        result: dict[str, Any] = {
            "benchmark": "secure_fedavg_http",
            "sites": args.sites,
            "threshold": plan["aggregation"]["threshold"],
            "model_values": values,
            "repeats": args.repeats,
            "plain": _summary(runs["plain"]),
            "secure": _summary(runs["secure"]),
            "machine": {
                "python": platform.python_version(),
                "cpu": platform.processor() or platform.machine(),
            },
        }
        result["bytes_ratio"] = result["secure"]["bytes_median"] / result["plain"]["bytes_median"]
        result["time_ratio"] = result["secure"]["round_s_median"] / result["plain"]["round_s_median"]
        result["bytes_goal_met"] = result["bytes_ratio"] < TARGET_BYTES_RATIO
        _chart(result, args.out / "secure_fedavg_http.png")
        (args.out / "secure_fedavg_http.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
