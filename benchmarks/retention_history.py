"""The retention pass after each job against the length of the agent's history.

An agent's job table grows by a row per round and is never emptied. The pass after each job
(`SiteService.apply_retention`) reads only the jobs in which something can have come due
since the last complete pass; the baseline, in the same run, is the full pass the agent makes
at start, which reads every stopped job. For each history length (--history, rows of
completed training rounds that ended two days ago and whose updates were fetched then, so
that nothing in them is due) both passes run --repeats times; the script prints the medians
and their ratio as JSON and writes ``retention_history.png`` to --out.

    .venv/bin/python benchmarks/retention_history.py --out bench-out/retention [--history 100,1000,5000]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from agent.config import load_config  # noqa: E402
from agent.db.base import utcnow  # noqa: E402
from agent.jobs.models import RoundJob  # noqa: E402
from agent.jobs.retention import apply_retention  # noqa: E402
from agent.service import SiteService  # noqa: E402
from coordinator.demo_federation import default_plan, generate_federation  # noqa: E402


def _add_history(service: SiteService, total: int) -> None:
    """Completed training rounds up to TOTAL rows, ended and fetched two days ago."""
    then = utcnow() - timedelta(days=2)
    plan = json.dumps(default_plan(size=32))
    with service.db.session() as s:
        have = s.query(RoundJob).count()
        s.add_all(
            RoundJob(
                round_id=f"past-{i}",
                kind="train",
                status="completed",
                dataset="site",
                plan_json=plan,
                plan_hash="0" * 64,
                job_dir=str(service.cfg.work_dir / "jobs" / f"past-{i}"),
                weights_path=str(service.cfg.work_dir / "jobs" / f"past-{i}" / "weights.safetensors"),
                started_at=then,
                finished_at=then,
                update_fetched_at=then,
            )
            for i in range(have, total)
        )
        s.commit()


def _median_s(run: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        report = run()
        times.append(time.perf_counter() - t0)
        if report.removed or not report.complete:
            raise RuntimeError(f"the pass deleted or failed to delete files: {report}")
    return statistics.median(times)


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["history"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ns, [r["full_pass_s"] * 1000 for r in rows], marker="o", label="full pass (at start)")
    ax.plot(ns, [r["narrowed_pass_s"] * 1000 for r in rows], marker="o", label="pass after a job")
    ax.set_xlabel("stopped jobs in the agent's history")
    ax.set_ylabel("ms per pass (median)")
    ax.set_title("Retention pass against history length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "retention_history.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/retention"))
    ap.add_argument("--history", default="100,1000,5000", help="history lengths, comma-separated, increasing")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    sizes = [int(n) for n in args.history.split(",")]
    if sizes != sorted(sizes) or sizes[0] < 1:
        ap.error("--history must be positive and increasing")
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="retention-") as tmp:
        layout = generate_federation(Path(tmp) / "data", sites=1, subjects_per_site=[2], size=32, seed=0)
        config_path = layout.sites[0].config_path
        doc = yaml.safe_load(config_path.read_text())
        doc["device"] = "cpu"
        config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        service = SiteService.open(load_config(config_path))
        try:
            rows = []
            for total in sizes:
                _add_history(service, total)

                def full() -> Any:
                    return apply_retention(service.store, service.gate, service.cfg)

                service.apply_retention()  # a complete pass: the next ones are narrowed
                full_s = _median_s(full, args.repeats)
                narrowed_s = _median_s(service.apply_retention, args.repeats)
                rows.append(
                    {
                        "history": total,
                        "full_pass_s": round(full_s, 4),
                        "narrowed_pass_s": round(narrowed_s, 4),
                        "narrowed_over_full": round(narrowed_s / full_s, 4),
                    }
                )
        finally:
            service.close()

    result = {
        "benchmark": "retention_history",
        "repeats": args.repeats,
        "by_history": rows,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }
    (args.out / "retention_history.json").write_text(json.dumps(result, indent=2))
    _plot(rows, args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
