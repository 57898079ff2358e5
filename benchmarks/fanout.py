"""Fan-out: what the coordinator adds to a FedAvg round as the number of agents grows.

For each federation size N (default 1, 2, 4, 8, 16) the script runs FedAvg rounds of a tiny plan
over the first N of a set of real agents (each its own process, on 127.0.0.1, with generated
data) and measures per round:

* ``orchestration_s``: the coordinator's round wall time (results.json ``duration_s``: from
  sending the plan to the aggregated model, evaluation excluded) minus the slowest site's job
  time as the site itself recorded it (its job row's ``finished_at - started_at``: worker start,
  training and the egress gate). What is left is the coordinator's share: sending plan and
  weights, status polls, downloads, hash checks, decoding and aggregation, and the wait between
  a site finishing and the coordinator noticing (at most one poll interval);
* where that share goes: the longest wait of a job in a site's queue (``site_queue_s_max``) and
  the most a site's job took as the coordinator saw it beyond the site's own queue and run
  (``transport_s_max``);
* the coordinator's own CPU seconds per round (``coordinator_cpu_s``: this process's CPU time,
  all its threads, between one round's end and the next). Unlike the wall time it does not grow
  when the agents and the coordinator share too few cores: it is what the coordinator itself
  costs, whatever the machine. The RSS sampler below runs in this process and is included;
* the agents' CPU seconds per round (``agents_cpu_s``): the N agents' processes, their fork
  servers and workers together (Linux /proc; absent elsewhere). On a machine with fewer cores
  than agents this, divided by the cores, is what bounds the round's wall time;
* the coordinator's resident memory: the peak of this process's RSS during the N-agent rounds
  (sampled every 20 ms), and its growth over the RSS before the first round.

The first round of every N is a warm-up and not counted; medians of --repeats rounds are
reported with their min and max. The goal: orchestration flat within 1 s per round from 1 agent
to the most that fit. Prints JSON and writes ``fanout.png`` (orchestration and memory against N).

    .venv/bin/python benchmarks/fanout.py --out bench-out/fanout [--sites 1,2,4,8,16] [--repeats 3]
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
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from sqlalchemy import select  # noqa: E402

from agent.config import load_config  # noqa: E402
from agent.db.engine import Database  # noqa: E402
from agent.jobs.models import RoundJob  # noqa: E402
from agent.jobs.states import JobKind  # noqa: E402
from coordinator.demo_federation import default_plan, generate_federation  # noqa: E402
from coordinator.federation import Federation, parse_federation  # noqa: E402
from coordinator.local import LocalFederation, add_static_token  # noqa: E402
from coordinator.options import RunOptions  # noqa: E402
from coordinator.report import QuietReporter  # noqa: E402
from coordinator.runner import run_strategy  # noqa: E402
from coordinator.weights import initial_weights  # noqa: E402

GOAL_SPREAD_S = 1.0
POLL_INTERVAL_S = 0.2
TIMEOUTS = {"connect": 10, "read": 120, "round": 1800, "evaluation": 1800}


def _plan() -> dict[str, Any]:
    """A tiny U-Net on 32x32 slices: a round is mostly orchestration, as the benchmark wants."""
    plan = default_plan(size=32)
    plan["model"].update({"channels": [4, 8], "strides": [2], "num_res_units": 0})
    plan["data"].update({"samples_per_subject": 4})
    plan["batch_size"] = 8
    return plan


def _rss_mb() -> float:
    """This process's resident set size in MiB (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakRss:
    """Samples this process's RSS in a thread while the block runs; `peak_mb` is the largest seen."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.every_s = every_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, _rss_mb())
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())


def _tree_cpu_s(roots: Collection[int]) -> float | None:
    """CPU seconds (user and system, with their reaped children's) of the processes ROOTS and
    all their descendants, from /proc; None where there is no /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    used: dict[int, float] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        # "pid (comm) state ppid ... utime stime cutime cstime ...": comm may hold spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry)
        parent[pid] = int(fields[1])
        used[pid] = sum(int(f) for f in fields[11:15]) / tick
    total = 0.0
    for pid, cpu in used.items():
        p = pid
        while p > 1 and p not in roots:
            p = parent.get(p, 0)
        if p in roots:
            total += cpu
    return total


class CpuPerRound(QuietReporter):
    """Records, at the end of every round, this process's CPU seconds (all threads) and those of
    the agents' process trees (AGENT_PIDS)."""

    def __init__(self, agent_pids: Collection[int] = ()) -> None:
        super().__init__()
        self.agent_pids = set(agent_pids)
        self.at_round_end: list[float] = []
        self.agents_at_round_end: list[float | None] = []

    def round_done(self, record: dict[str, Any]) -> None:
        self.at_round_end.append(time.process_time())
        self.agents_at_round_end.append(_tree_cpu_s(self.agent_pids))


def _site_job_times(databases: dict[str, Database], site: str, round_id: str) -> tuple[float, float]:
    """The site's own times for the round's job, from its job table: (queued, running) seconds."""
    with databases[site].session() as session:
        row = session.execute(
            select(RoundJob.created_at, RoundJob.started_at, RoundJob.finished_at).where(
                RoundJob.kind == JobKind.TRAIN, RoundJob.round_id == round_id
            )
        ).one()
    created, started, finished = row
    if started is None or finished is None:
        raise RuntimeError(f"{site}: round {round_id} has no start or end time")
    return (started - created).total_seconds(), (finished - started).total_seconds()


def _federation(root: Path, urls: dict[str, str], tokens: dict[str, str]) -> Federation:
    doc = {
        "agents": [{"name": n, "url": u, "token": tokens[n]} for n, u in urls.items()],
        "timeouts": TIMEOUTS,
        "poll_interval": POLL_INTERVAL_S,
        "min_sites": len(urls),
    }
    return parse_federation(doc, source=root / f"federation-{len(urls)}.yaml")


def _measure(
    fed: Federation,
    plan: dict[str, Any],
    out: Path,
    repeats: int,
    databases: dict[str, Database],
    agent_pids: Collection[int],
) -> dict[str, Any]:
    n = len(fed.names)
    options = RunOptions(
        strategy="fedavg", rounds=repeats + 1, run_id=f"fanout-{n}", evaluate=False, evaluate_final=False
    )
    before = _rss_mb()
    cpu = CpuPerRound(agent_pids)
    with PeakRss() as rss:
        result = run_strategy(fed, plan, out, options, initial_weights=initial_weights(plan), reporter=cpu)
    if len(cpu.at_round_end) != len(result.rounds):
        raise RuntimeError(f"{len(result.rounds)} rounds ran but {len(cpu.at_round_end)} were reported")
    rounds = []
    # The first round warms caches, imports and fork servers; round i's CPU is from round i-1's end.
    for i, record in enumerate(result.rounds[1:], start=1):
        times = {
            site: _site_job_times(databases, site, str(t["round_id"]))
            for site, t in record["training"].items()
        }
        slowest = max(running for _queued, running in times.values())
        # Where the rest goes: the wait in a site's queue before its worker took the job, and
        # what the coordinator saw of a site beyond the site's own queue and run (sending the
        # plan and weights, polling, downloading and checking the update).
        beyond = [float(t["duration_s"]) - sum(times[site]) for site, t in record["training"].items()]
        rounds.append(
            {
                "round_s": float(record["duration_s"]),
                "slowest_site_s": round(slowest, 3),
                "orchestration_s": round(float(record["duration_s"]) - slowest, 3),
                "site_queue_s_max": round(max(q for q, _r in times.values()), 3),
                "transport_s_max": round(max(beyond), 3),
                "coordinator_cpu_s": round(cpu.at_round_end[i] - cpu.at_round_end[i - 1], 3),
            }
        )
        now, then = cpu.agents_at_round_end[i], cpu.agents_at_round_end[i - 1]
        if now is not None and then is not None:
            rounds[-1]["agents_cpu_s"] = round(now - then, 3)
    orch = [r["orchestration_s"] for r in rounds]
    return {
        "agents": n,
        "rounds": rounds,
        "orchestration_s_median": round(statistics.median(orch), 3),
        "orchestration_s_min": min(orch),
        "orchestration_s_max": max(orch),
        "round_s_median": round(statistics.median(r["round_s"] for r in rounds), 3),
        "slowest_site_s_median": round(statistics.median(r["slowest_site_s"] for r in rounds), 3),
        "site_queue_s_max_median": round(statistics.median(r["site_queue_s_max"] for r in rounds), 3),
        "transport_s_max_median": round(statistics.median(r["transport_s_max"] for r in rounds), 3),
        "coordinator_cpu_s_median": round(statistics.median(r["coordinator_cpu_s"] for r in rounds), 3),
        "agents_cpu_s_median": (
            round(statistics.median(r["agents_cpu_s"] for r in rounds), 3)
            if all("agents_cpu_s" in r for r in rounds)
            else None
        ),
        "coordinator_rss_peak_mb": round(rss.peak_mb, 1),
        "coordinator_rss_growth_mb": round(rss.peak_mb - before, 1),
    }


def _chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["by_agents"]
    ns = [r["agents"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    med = [r["orchestration_s_median"] for r in rows]
    low = [r["orchestration_s_median"] - r["orchestration_s_min"] for r in rows]
    high = [r["orchestration_s_max"] - r["orchestration_s_median"] for r in rows]
    ax.errorbar(ns, med, yerr=[low, high], marker="o", capsize=3, label="orchestration per round")
    ax.plot(ns, [r["slowest_site_s_median"] for r in rows], "s--", label="slowest site's job")
    ax.plot(ns, [r["coordinator_cpu_s_median"] for r in rows], "d-.", label="coordinator CPU per round")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("agents")
    ax.set_ylabel("seconds (median, min-max)")
    twin = ax.twinx()
    twin.plot(
        ns, [r["coordinator_rss_peak_mb"] for r in rows], "^:", color="tab:red", label="coordinator RSS"
    )
    twin.set_ylabel("coordinator peak RSS (MiB)")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    ax.set_title("FedAvg round: the coordinator's share against the number of agents")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "fanout")
    parser.add_argument("--sites", default="1,2,4,8,16", help="federation sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="counted rounds per size (median reported)")
    args = parser.parse_args(argv)
    try:
        sizes = sorted({int(s) for s in args.sites.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--sites: {args.sites!r} is not a comma-separated list of numbers")
    if not sizes or sizes[0] < 1 or args.repeats < 1:
        parser.error("--sites must name sizes of at least 1 and --repeats must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    plan = _plan()
    work = Path(tempfile.mkdtemp(prefix="fedsite-fanout-"))
    try:
        most = sizes[-1]
        layout = generate_federation(work / "data", sites=most, subjects_per_site=[2] * most, size=32, seed=0)
        configs = {s.site_id: s.config_path for s in layout.sites}
        for path in configs.values():
            doc = yaml.safe_load(path.read_text())
            doc["device"] = "cpu"
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
        tokens = {name: add_static_token(path) for name, path in configs.items()}
        databases = {name: Database(load_config(path).db_url) for name, path in configs.items()}
        rows = []
        with LocalFederation(work / "logs") as local:
            agents = local.start_many(configs, ready_timeout=600)
            names = list(configs)
            for n in sizes:
                chosen = names[:n]
                fed = _federation(work, {s: agents[s].url for s in chosen}, tokens)
                pids = [agents[s].process.pid for s in chosen]
                rows.append(_measure(fed, plan, work / f"run-{n}", args.repeats, databases, pids))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "rounds"}), file=sys.stderr)
        for db in databases.values():
            db.dispose()
        medians = [r["orchestration_s_median"] for r in rows]
        spread = max(medians) - min(medians)
        cpu_medians = [r["coordinator_cpu_s_median"] for r in rows]
        result: dict[str, Any] = {
            "benchmark": "fanout",
            "repeats": args.repeats,
            "poll_interval_s": POLL_INTERVAL_S,
            "plan": {k: plan[k] for k in ("model", "local_epochs", "batch_size")},
            "by_agents": rows,
            "orchestration_spread_s": round(spread, 3),
            "goal": f"orchestration per round flat within {GOAL_SPREAD_S} s across the sizes",
            "goal_met": spread <= GOAL_SPREAD_S,
            "coordinator_cpu_spread_s": round(max(cpu_medians) - min(cpu_medians), 3),
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
            },
        }
        _chart(result, args.out / "fanout.png")
        (args.out / "fanout.json").write_text(json.dumps(result, indent=2))
        print(
            json.dumps(
                {k: v for k, v in result.items() if k != "by_agents"}
                | {
                    "orchestration_s_by_agents": {r["agents"]: r["orchestration_s_median"] for r in rows},
                    "coordinator_cpu_s_by_agents": {r["agents"]: r["coordinator_cpu_s_median"] for r in rows},
                    "agents_cpu_s_by_agents": {r["agents"]: r["agents_cpu_s_median"] for r in rows},
                    "coordinator_rss_peak_mb_by_agents": {
                        r["agents"]: r["coordinator_rss_peak_mb"] for r in rows
                    },
                },
                indent=2,
            )
        )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
