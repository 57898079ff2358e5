"""Push versus pull: one FedAvg round of the same plan, with the same agents and the same data,
reached through their API (push) and through the coordinator's relay (pull, outbound mode).

Every agent runs in `connect.mode: both`: it listens for the push API and connects out to the
relay, so that the two modes differ only in the transport. The script alternates the modes
(push first in even repetitions, pull first in odd ones, so that a warming cache or a noisy
neighbour does not favour one) and reports, as medians of --repeats rounds:

* the round's wall time in each mode (the coordinator's `duration_s`: from sending the plan to
  the aggregated model, evaluation excluded) and the ratio pull / push of each pair; the goal is
  pull <= 1.05 x push + the coordinator's poll interval;
* the bytes on the wire per round in each mode (request and response bodies: in push mode what
  the coordinator's client sent and received, in pull mode what the relay served and received
  for the round's tasks, heartbeats and polls included).

It prints JSON and writes ``pull_push.png`` to --out.

    .venv/bin/python benchmarks/pull_push.py --out bench-out/pull_push [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
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

import yaml  # noqa: E402

from coordinator.demo_federation import default_plan, generate_federation  # noqa: E402
from coordinator.federation import Federation, parse_federation  # noqa: E402
from coordinator.local import LocalFederation, add_static_token  # noqa: E402
from coordinator.options import RunOptions  # noqa: E402
from coordinator.relay.server import RelayServer  # noqa: E402
from coordinator.relay.store import RelayStore  # noqa: E402
from coordinator.report import QuietReporter  # noqa: E402
from coordinator.runner import run_strategy  # noqa: E402
from coordinator.weights import initial_weights  # noqa: E402

TARGET_RATIO = 1.05
POLL_INTERVAL_S = 0.5
TIMEOUTS = {"connect": 5, "read": 60, "round": 1800, "evaluation": 1800}


def _plan(quick: bool) -> dict[str, Any]:
    """Quick: a tiny U-Net (a round is mostly orchestration). Default: a round of some seconds of
    training with a model of about 2 MB, where the transport's share is what it would be at a site."""
    if quick:
        plan = default_plan(size=32)
        plan["model"].update({"channels": [4, 8], "strides": [2], "num_res_units": 0})
        plan["data"].update({"samples_per_subject": 4})
        plan["batch_size"] = 8
        return plan
    plan = default_plan(size=96)
    plan["model"].update({"channels": [16, 32, 64, 128], "strides": [2, 2, 2]})
    plan["data"].update({"samples_per_subject": 32})
    plan["local_epochs"] = 3
    return plan


def _set_connect(config: Path, relay_url: str, token_file: Path) -> None:
    doc = yaml.safe_load(config.read_text())
    doc["device"] = "cpu"
    doc["connect"] = {"mode": "both", "coordinator_url": relay_url, "token_file": str(token_file)}
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


def _push_federation(root: Path, urls: dict[str, str], tokens: dict[str, str]) -> Federation:
    doc = {"agents": [{"name": n, "url": u, "token": tokens[n]} for n, u in urls.items()]}
    common = {"timeouts": TIMEOUTS, "poll_interval": POLL_INTERVAL_S, "min_sites": len(urls)}
    return parse_federation({**doc, **common}, source=root / "federation-push.yaml")


def _pull_federation(root: Path, names: list[str]) -> Federation:
    """The same sites as pull entries; the relay keeps its database and files in ROOT/relay."""
    doc = {
        "agents": [{"name": n, "pull": True} for n in names],
        "relay": {"listen": "127.0.0.1:0", "dir": "relay"},
    }
    common = {"timeouts": TIMEOUTS, "poll_interval": POLL_INTERVAL_S, "min_sites": len(names)}
    return parse_federation({**doc, **common}, source=root / "federation-pull.yaml")


def _round(
    fed: Federation, plan: dict[str, Any], out: Path, run_id: str, store: RelayStore | None
) -> dict[str, Any]:
    options = RunOptions(strategy="fedavg", rounds=1, run_id=run_id, evaluate=False, evaluate_final=False)
    t0 = time.monotonic()
    result = run_strategy(
        fed,
        plan,
        out,
        options,
        initial_weights=initial_weights(plan),
        reporter=QuietReporter(),
        relay_store=store,
    )
    wall = time.monotonic() - t0
    record = result.rounds[0]
    return {
        "round_s": float(record["duration_s"]),
        "run_s": round(wall, 3),
        "bytes": int(record["bytes_sent"]) + int(record["bytes_received"]),
        "bytes_to_sites": int(record["bytes_sent"]),
        "bytes_from_sites": int(record["bytes_received"]),
        "slowest_site_s": max(float(t["duration_s"]) for t in record["training"].values()),
        "model_sha256": record["model_sha256"],
    }


def _chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ["push", "pull"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    times = [result[m]["round_s_median"] for m in modes]
    spread = [
        [t - result[m]["round_s_min"] for t, m in zip(times, modes, strict=True)],
        [result[m]["round_s_max"] - t for t, m in zip(times, modes, strict=True)],
    ]
    left.bar(modes, times, yerr=spread, capsize=6, color=["#4c72b0", "#dd8452"])
    left.set_ylabel("seconds per FedAvg round (median, min-max)")
    left.set_title(f"wall time: pull / push = {result['ratio_median']:.3f}")
    kib = [result[m]["bytes_median"] / 1024 for m in modes]
    right.bar(modes, kib, color=["#4c72b0", "#dd8452"])
    right.set_ylabel("KiB on the wire per round (bodies)")
    right.set_title("bytes per round")
    fig.suptitle(f"{result['sites']} sites, same agents and plan; poll interval {POLL_INTERVAL_S} s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["round_s"] for r in runs]
    sizes = [r["bytes"] for r in runs]
    return {
        "round_s_median": statistics.median(times),
        "round_s_min": min(times),
        "round_s_max": max(times),
        "bytes_median": statistics.median(sizes),
        "bytes_min": min(sizes),
        "bytes_max": max(sizes),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "pull_push")
    parser.add_argument("--quick", action="store_true", help="a tiny plan (seconds per round)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per mode (default 5, quick 3)")
    parser.add_argument("--sites", type=int, default=2)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    if repeats < 1 or args.sites < 1:
        parser.error("--repeats and --sites must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    plan = _plan(args.quick)
    work = Path(tempfile.mkdtemp(prefix="fedsite-pull-push-"))
    try:
        subjects = [4 if args.quick else 10] * args.sites
        layout = generate_federation(
            work / "data",
            sites=args.sites,
            subjects_per_site=subjects,
            size=plan["data"]["roi_size"][0],
            seed=0,
        )
        configs = {s.site_id: s.config_path for s in layout.sites}
        push_tokens = {name: add_static_token(path) for name, path in configs.items()}
        pull_fed = _pull_federation(work, list(configs))
        assert pull_fed.relay is not None
        store = RelayStore.from_settings(pull_fed.relay)
        for name in configs:
            token_file = work / "relay-tokens" / f"{name}.token"
            token_file.parent.mkdir(exist_ok=True)
            token_file.write_text(store.add_site(name) + "\n")
            token_file.chmod(0o600)
        with RelayServer(store, "127.0.0.1", 0) as relay, LocalFederation(work / "logs") as local:
            for name, path in configs.items():
                _set_connect(path, relay.url, work / "relay-tokens" / f"{name}.token")
            agents = local.start_many(configs, ready_timeout=300)
            push_fed = _push_federation(work, {n: a.url for n, a in agents.items()}, push_tokens)
            runs: dict[str, list[dict[str, Any]]] = {"push": [], "pull": []}
            # One round of each mode first, not counted: caches, imports and the fork server warm up.
            _round(push_fed, plan, work / "warm-push", "warm-push", None)
            _round(pull_fed, plan, work / "warm-pull", "warm-pull", store)
            for rep in range(repeats):
                for mode in ("push", "pull") if rep % 2 == 0 else ("pull", "push"):
                    fed, relay_store = (push_fed, None) if mode == "push" else (pull_fed, store)
                    runs[mode].append(_round(fed, plan, work / f"{mode}-{rep}", f"{mode}-{rep}", relay_store))
        store.close()
        ratios = [
            p["round_s"] / q["round_s"]
            for p, q in zip(runs["pull"], runs["push"], strict=True)
            if q["round_s"] > 0
        ]
        push, pull = _summary(runs["push"]), _summary(runs["pull"])
        result: dict[str, Any] = {
            "benchmark": "pull_push",
            "quick": args.quick,
            "sites": args.sites,
            "repeats": repeats,
            "poll_interval_s": POLL_INTERVAL_S,
            "plan": {k: plan[k] for k in ("model", "local_epochs", "batch_size")},
            "push": push,
            "pull": pull,
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "bytes_ratio": pull["bytes_median"] / push["bytes_median"],
            "goal": f"pull <= {TARGET_RATIO} x push + {POLL_INTERVAL_S} s",
            "goal_met": pull["round_s_median"] <= TARGET_RATIO * push["round_s_median"] + POLL_INTERVAL_S,
            # Same plan, same data, same seed: the two modes must aggregate the same model.
            "same_models": len({r["model_sha256"] for r in runs["push"] + runs["pull"]}) == 1,
            "machine": {"platform": platform.platform(), "python": platform.python_version()},
        }
        _chart(result, args.out / "pull_push.png")
        (args.out / "pull_push.json").write_text(json.dumps(result, indent=2))
        print(
            json.dumps(
                {k: v for k, v in result.items() if k not in ("push", "pull")}
                | {
                    "push_round_s": push["round_s_median"],
                    "pull_round_s": pull["round_s_median"],
                    "push_bytes": push["bytes_median"],
                    "pull_bytes": pull["bytes_median"],
                },
                indent=2,
            )
        )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
