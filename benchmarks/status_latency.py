"""Status polls while a round trains: what a coordinator's polling costs the agent, and how the
worker's training affects it.

One agent on generated data (`fedsite serve` on 127.0.0.1). The script polls
``GET /v1/rounds/{id}`` sequentially, --polls times in each phase, both phases --repeats times:

* ``training``: while a long round trains in the worker (the poll's round is that one);
* ``idle``: the baseline, with no job running (the poll's round is a finished one).

For each phase it reports p50 and p99 of the agent's own time (its ``Server-Timing`` header, which
a busy client machine does not inflate) and of the time the client saw, and the ratio training /
idle of the p99s. The goal is an agent-side p99 under 100 ms while training. It prints JSON and
writes ``status_latency.png`` to --out.

    .venv/bin/python benchmarks/status_latency.py --out bench-out/status_latency [--polls 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import yaml  # noqa: E402

from coordinator.demo_federation import default_plan, generate_federation  # noqa: E402
from coordinator.local import LocalFederation, add_static_token  # noqa: E402
from coordinator.weights import encode, initial_weights  # noqa: E402

GOAL_P99_S = 0.1
PHASES = ("training", "idle")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _poll(client: httpx.Client, round_id: str, polls: int, expect: str) -> tuple[list[float], list[float]]:
    """POLLS sequential status reads of ROUND_ID: the agent's and the client's seconds of each."""
    agent: list[float] = []
    seen: list[float] = []
    for _ in range(polls):
        t0 = time.perf_counter()
        r = client.get(f"/v1/rounds/{round_id}")
        seen.append(time.perf_counter() - t0)
        r.raise_for_status()
        if r.json()["status"] != expect:
            raise RuntimeError(f"round {round_id} is {r.json()['status']}, the phase needs it {expect}")
        agent.append(float(r.headers["server-timing"].removeprefix("app;dur=")) / 1000.0)
    return agent, seen


def _start_round(client: httpx.Client, plan: dict[str, Any], round_id: str) -> None:
    files: dict[str, tuple[str | None, bytes | str, str]] = {
        "plan": (None, json.dumps({**plan, "round_id": round_id}), "application/json"),
        "weights": ("w.safetensors", encode(initial_weights(plan)), "application/octet-stream"),
    }
    client.post("/v1/rounds", files=files).raise_for_status()


def _wait(
    client: httpx.Client, round_id: str, until: tuple[str, ...], timeout: float = 600
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/v1/rounds/{round_id}").json()
        if body["status"] in until and (body["status"] != "running" or body.get("progress")):
            return body
        time.sleep(0.2)
    raise RuntimeError(f"round {round_id} did not reach {until} within {timeout:g} s")


def _chart(samples: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for phase in PHASES:
        values = sorted(v * 1000 for v in samples[phase])
        ax.plot(values, [i / len(values) for i in range(len(values))], label=phase)
    ax.axvline(GOAL_P99_S * 1000, color="grey", linestyle="--", label="goal: p99 < 100 ms")
    ax.set_xscale("log")
    ax.set_xlabel("agent time per status poll (ms, Server-Timing)")
    ax.set_ylabel("fraction of polls")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "status_latency")
    parser.add_argument("--polls", type=int, default=500, help="status reads per phase and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.polls < 1 or args.repeats < 1:
        parser.error("--polls and --repeats must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    plan = default_plan(size=64)
    plan["local_epochs"] = 1000  # longer than the polls take; cancelled when they are done
    work = Path(tempfile.mkdtemp(prefix="fedsite-status-latency-"))
    agent_s: dict[str, list[float]] = {p: [] for p in PHASES}
    client_s: dict[str, list[float]] = {p: [] for p in PHASES}
    try:
        (site,) = generate_federation(work / "data", sites=1, subjects_per_site=[6], size=64, seed=0).sites
        doc = yaml.safe_load(site.config_path.read_text())
        doc["device"] = "cpu"
        site.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        token = add_static_token(site.config_path)
        with LocalFederation(work / "logs") as local:
            agent = local.start_many({site.site_id: site.config_path}, ready_timeout=300)[site.site_id]
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=agent.url, headers=headers, timeout=60) as client:
                short = {**plan, "local_epochs": 1}
                _start_round(client, short, "r-done")
                _wait(client, "r-done", ("completed",))
                for rep in range(args.repeats):
                    # Nothing runs now (the last long round was cancelled, and a cancel answers
                    # once its worker stopped): the baseline.
                    polled = _poll(client, "r-done", args.polls, "completed")
                    agent_s["idle"] += polled[0]
                    client_s["idle"] += polled[1]
                    round_id = f"r-long-{rep}"
                    _start_round(client, plan, round_id)
                    _wait(client, round_id, ("running",))
                    polled = _poll(client, round_id, args.polls, "running")
                    agent_s["training"] += polled[0]
                    client_s["training"] += polled[1]
                    client.post(f"/v1/rounds/{round_id}/cancel").raise_for_status()
        summary: dict[str, Any] = {
            phase: {
                "polls": len(agent_s[phase]),
                "agent_p50_ms": round(_percentile(agent_s[phase], 0.5) * 1000, 3),
                "agent_p99_ms": round(_percentile(agent_s[phase], 0.99) * 1000, 3),
                "client_p50_ms": round(_percentile(client_s[phase], 0.5) * 1000, 3),
                "client_p99_ms": round(_percentile(client_s[phase], 0.99) * 1000, 3),
            }
            for phase in PHASES
        }
        idle_p99 = summary["idle"]["agent_p99_ms"]
        result = {
            "benchmark": "status_latency",
            **summary,
            "agent_p99_ratio_training_over_idle": (
                round(summary["training"]["agent_p99_ms"] / idle_p99, 3) if idle_p99 > 0 else None
            ),
            "goal": f"agent p99 while training < {GOAL_P99_S * 1000:g} ms",
            "goal_met": summary["training"]["agent_p99_ms"] < GOAL_P99_S * 1000,
            "machine": {"platform": platform.platform(), "python": platform.python_version()},
        }
        _chart(agent_s, args.out / "status_latency.png")
        (args.out / "status_latency.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
