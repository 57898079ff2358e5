"""The CUDA path, checked on a machine with a GPU: one prepared script, under 10 minutes.

Steps, each bounded in time and reported on its own (a failed step does not hide the others):

1. ``environment``: torch and CUDA versions, the GPU's name and memory.
2. ``amp_overhead``: the engine's AMP round against a bare MONAI AMP loop on the same data and
   model, for both of `benchmarks/round_overhead.py`'s configurations (2D U-Net at 128x128, 3D
   U-Net at 64^3; on the GPU with five times their epochs): the ratio engine/bare of wall time
   (target at most 1.05).
3. ``agent_round_3d``: FedAvg rounds through a real agent (`fedsite serve`, device cuda) of a 3D
   U-Net at 128^3 with four channels (the study's input: FLAIR, T1, T1Gd, T2), timed as the
   coordinator saw the site (plan sent to update received): the first round (cold) in training
   volumes per second; then, for `loader_threads` 0, auto and twice auto's most, two warm rounds
   of E and 3E epochs, whose difference gives the training rate alone and the fixed cost of a
   round (worker start, loading, validation, the egress gate); and, as the ceiling, bare
   training steps of the same model on batches already on the GPU.
4. ``fresh_worker_and_cancel``: a long 3D round; its worker (the pid in the site's job table) must
   be a fresh interpreter (``python -m agent.jobs.worker``), never a fork of a process that touched
   CUDA; once it trains it is cancelled, and the seconds from the cancel request to the status
   ``cancelled`` are measured (target: within 10 s).
5. ``cuda_wheelhouse`` (with ``--wheelhouse DIR``): what the Dockerfile does with a wheelhouse
   of `make wheelhouse TORCH_VARIANT=cuda` (built where the package index is reachable): a fresh
   virtual environment installs torch from DIR alone (pip's configuration of this machine left
   out), then the package from source against it, offline; its interpreter imports the engine,
   and on a GPU computes on it. Without DIR the step is reported as not run.

It prints JSON, writes ``gpu_check.json`` and ``gpu_check.png`` to --out, and exits 1 when a step
failed. Without a CUDA device it refuses to run, unless ``--allow-cpu``: then every step runs
small on the CPU, which checks the script itself (not the GPU path).

    .venv/bin/python benchmarks/gpu_check.py --out bench-out/gpu_check [--wheelhouse wheelhouse-cuda]
    .venv/bin/python benchmarks/gpu_check.py --out /tmp/gpu-dry --allow-cpu     # the script's own check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402
from sqlalchemy import select  # noqa: E402

from agent.config import load_config  # noqa: E402
from agent.db.engine import Database  # noqa: E402
from agent.jobs.models import RoundJob  # noqa: E402
from agent.jobs.states import JobKind  # noqa: E402
from agent.training.engine import AUTO_LOADER_THREADS  # noqa: E402
from agent.training.plan import MAX_EPOCHS, parse_plan  # noqa: E402
from agent.training.registry import build_model  # noqa: E402
from benchmarks import round_overhead  # noqa: E402
from benchmarks.pooled import fix_site_secret  # noqa: E402
from coordinator.client import AgentClient  # noqa: E402
from coordinator.demo_federation import default_plan, generate_federation  # noqa: E402
from coordinator.federation import parse_federation  # noqa: E402
from coordinator.local import THREAD_ENV_VARS, LocalFederation, add_static_token  # noqa: E402
from coordinator.options import RunOptions  # noqa: E402
from coordinator.report import QuietReporter  # noqa: E402
from coordinator.runner import run_strategy  # noqa: E402
from coordinator.weights import encode, initial_weights  # noqa: E402

MODALITIES = ("flair", "t1", "t1gd", "t2")
CANCEL_TARGET_S = 10.0
AMP_TARGET_RATIO = 1.05
# On the GPU, round_overhead's configurations train this many times their epochs.
GPU_EPOCH_FACTOR = 5


def _environment(device: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "device": device,
        "python": platform.python_version(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
        )
    return out


def _amp_overhead(device: str, small: bool, root: Path) -> dict[str, Any]:
    """`round_overhead`'s two configurations (2D U-Net at 128x128, 3D U-Net at 64^3). On the GPU
    with five times its epochs: its own two epochs last a fifth of a second there, and a ratio of
    such rounds measures the round's fixed costs (validation, the egress gate), not its steps."""
    out: dict[str, Any] = {"amp": device == "cuda", "target_ratio": AMP_TARGET_RATIO, "configs": []}
    for cfg in round_overhead._configs(quick=small):
        if not small:
            cfg = {**cfg, "epochs": cfg["epochs"] * GPU_EPOCH_FACTOR}
        out["configs"].append(round_overhead.run_config(cfg, 1 if small else 3, device, root / "amp"))
    return out


def _plan_3d(size: int, small: bool) -> dict[str, Any]:
    plan = default_plan(modalities=MODALITIES, size=size)
    plan["model"].update(
        {
            "spatial_dims": 3,
            "channels": [8, 16] if small else [16, 32, 64, 128],
            "strides": [2] if small else [2, 2, 2],
            "num_res_units": 0 if small else 1,
        }
    )
    plan["data"].update({"spatial_dims": 3, "roi_size": [size] * 3, "samples_per_subject": 1 if small else 2})
    plan["batch_size"] = 1 if small else 2
    plan["local_epochs"] = 1 if small else 2
    return plan


class Site:
    """One generated site with four modalities and its agent, started on 127.0.0.1."""

    def __init__(self, root: Path, size: int, subjects: int, device: str) -> None:
        layout = generate_federation(
            root / "data", sites=1, subjects_per_site=[subjects], modalities=MODALITIES, size=size, seed=0
        )
        self.root = root
        self.config = layout.sites[0].config_path
        # The split (hence the number of training volumes) is then the same in every run.
        fix_site_secret(self.config, data_seed=0)
        self.token = add_static_token(self.config)
        # One agent alone on the machine, as at a site with a GPU: its worker loads and augments
        # volumes on the CPU with every core, not with the one thread a local federation of
        # many agents gives each.
        self.threads = os.cpu_count() or 1
        self.local = LocalFederation(root / "logs", env={key: str(self.threads) for key in THREAD_ENV_VARS})
        self.loader_threads: int | str = 0
        self.restart(device=device, loader_threads=0)

    def restart(self, **settings: Any) -> None:
        """(Re)start the agent with these top-level config SETTINGS changed."""
        self.local.stop()
        doc = yaml.safe_load(self.config.read_text())
        doc.update(settings)
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.loader_threads = doc.get("loader_threads", "auto")
        self.agent = self.local.start_many({"site-1": self.config}, ready_timeout=300)["site-1"]
        self.fed = parse_federation(
            {
                "agents": [{"name": "site-1", "url": self.agent.url, "token": self.token}],
                "poll_interval": 0.1,
                "timeouts": {"connect": 10, "read": 120, "round": 900, "evaluation": 900},
            },
            source=self.root / "federation.yaml",
        )

    def client(self) -> AgentClient:
        return AgentClient(self.fed.agents[0], timeouts=self.fed.timeouts, retries=self.fed.retries)

    def close(self) -> None:
        self.local.stop()


def _worker_command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _worker_of(site: Site, job: str, deadline: float) -> dict[str, Any]:
    """Wait until JOB runs; its worker's pid (from the site's job table) and command line."""
    db = Database(load_config(site.config).db_url)
    try:
        while time.monotonic() < deadline:
            with db.session() as session:
                row = session.execute(
                    select(RoundJob.status, RoundJob.worker_pid).where(
                        RoundJob.kind == JobKind.TRAIN, RoundJob.round_id == job
                    )
                ).one_or_none()
            if row is not None and row.status == "running" and row.worker_pid:
                return {"worker_pid": row.worker_pid, "worker_command": _worker_command(row.worker_pid)}
            if row is not None and row.status in ("completed", "failed", "cancelled", "interrupted"):
                break
            time.sleep(0.2)
    finally:
        db.dispose()
    raise RuntimeError(f"round {job} never ran with a worker process in sight")


def _site_round(site: Site, plan: dict[str, Any], root: Path, run_id: str, epochs: int) -> dict[str, Any]:
    """One FedAvg round of PLAN with EPOCHS local epochs through the site's agent."""
    plan = {**plan, "local_epochs": epochs}
    options = RunOptions(strategy="fedavg", rounds=1, run_id=run_id, evaluate=False, evaluate_final=False)
    result = run_strategy(
        site.fed,
        plan,
        root / run_id,
        options,
        initial_weights=initial_weights(plan),
        reporter=QuietReporter(),
    )
    record = result.rounds[0]["training"]["site-1"]
    volumes = int(record["num_samples"]) * plan["data"]["samples_per_subject"] * epochs
    # The site's job as the coordinator saw it: plan sent to update received.
    seconds = float(record["duration_s"])
    return {"epochs": epochs, "site_round_s": seconds, "training_volumes": volumes}


def _training_rate(site: Site, plan: dict[str, Any], root: Path) -> dict[str, Any]:
    """Two warm rounds of E and 3E epochs: their difference is the training alone, in volumes per
    second, and the rest of the shorter round is what a round costs besides (the fixed cost)."""
    short = plan["local_epochs"]
    tag = f"w{site.loader_threads}"
    warm = _site_round(site, plan, root, f"gpu-3d-warm-{tag}", short)
    long = _site_round(site, plan, root, f"gpu-3d-long-{tag}", short * 3)
    extra_s = long["site_round_s"] - warm["site_round_s"]
    extra_volumes = long["training_volumes"] - warm["training_volumes"]
    rate = extra_volumes / extra_s if extra_s > 0 else None
    fixed_s = warm["site_round_s"] - warm["training_volumes"] / rate if rate else None
    return {
        "loader_threads": site.loader_threads,
        "warm_round": warm,
        "long_round": long,
        "training_volumes_per_s": round(rate, 3) if rate else None,
        "fixed_round_s": round(fixed_s, 2) if fixed_s is not None else None,
    }


def _agent_round_3d(site: Site, plan: dict[str, Any], root: Path, small: bool) -> dict[str, Any]:
    """The first round (cold: worker start, CUDA start, preprocessing into the site's cache); the
    training rate with batches loaded by the training process alone (`loader_threads: 0`), then,
    after a restart and a round that starts the new worker, with the default (`auto`) and with
    twice auto's most threads; and bare training steps of the same model on batches already on
    the GPU, the ceiling."""
    first = _site_round(site, plan, root, "gpu-3d-first", plan["local_epochs"])
    alone = _training_rate(site, plan, root)
    site.restart(loader_threads="auto")
    restarted = _site_round(site, plan, root, "gpu-3d-restarted", plan["local_epochs"])
    auto = _training_rate(site, plan, root)
    # Twice auto's most threads: whether its cap leaves speed unused on this machine.
    site.restart(loader_threads=2 * AUTO_LOADER_THREADS)
    restarted_more = _site_round(site, plan, root, "gpu-3d-restarted-more", plan["local_epochs"])
    more = _training_rate(site, plan, root)
    bare = _bare_3d_rate(plan, small)
    settings = (("loader_alone", alone), ("loader_auto", auto), ("loader_more", more))
    return {
        "first_round": first,
        # The first round as a whole, as a site sees it.
        "volumes_per_s": round(first["training_volumes"] / first["site_round_s"], 3),
        "loader_alone": alone,
        # The rounds that started the restarted agents' workers (a cold worker, a warm cache).
        "round_after_restart": restarted,
        "round_after_restart_more": restarted_more,
        "loader_auto": auto,
        "loader_more": more,
        "bare_volumes_per_s": bare["volumes_per_s"],
        "training_vs_bare": {
            key: round(rates["training_volumes_per_s"] / bare["volumes_per_s"], 3)
            for key, rates in settings
            if rates["training_volumes_per_s"]
        },
        "bare": bare,
        "roi": plan["data"]["roi_size"],
        "channels": len(MODALITIES),
        "batch_size": plan["batch_size"],
        "model_channels": plan["model"]["channels"],
        "cpu_threads": site.threads,
    }


def _bare_3d_rate(plan_doc: dict[str, Any], small: bool) -> dict[str, Any]:
    """The GPU's ceiling for the same model: training steps on batches already on the device (no
    loading, no augmentation), same loss, optimizer and mixed precision as the engine."""
    plan = parse_plan({**plan_doc, "round_id": "gpu-bare"})
    dev = torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")
    amp = dev.type == "cuda"
    torch.manual_seed(plan.seed)
    model = build_model(plan).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=plan.optimizer.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    roi = tuple(plan.data.roi_size)
    x = torch.randn((plan.batch_size, plan.model.argument("in_channels"), *roi), device=dev)
    labels = torch.rand((plan.batch_size, plan.model.argument("out_channels"), *roi), device=dev)
    y = (labels > 0.5).float()

    warmup, steps = (1, 2) if small else (5, 30)
    for _ in range(warmup):
        round_overhead.bare_step(model, opt, scaler, x, y)
    if amp:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        round_overhead.bare_step(model, opt, scaler, x, y)
    if amp:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {
        "steps": steps,
        "seconds": round(seconds, 3),
        "volumes_per_s": round(steps * plan.batch_size / seconds, 3),
    }
    if amp:
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _training_progress(client: AgentClient, job: str, deadline: float) -> dict[str, Any]:
    """Wait until JOB reports a training step; its progress then."""
    while time.monotonic() < deadline:
        status = client.round_status(job)
        if status.status != "running":
            raise RuntimeError(f"round {job} is {status.status} before it reported a training step")
        if isinstance(status.progress, dict) and status.progress.get("step"):
            return dict(status.progress)
        time.sleep(0.2)
    raise RuntimeError(f"round {job} reported no training step in time")


def _fresh_worker_and_cancel(site: Site, plan: dict[str, Any], device: str) -> dict[str, Any]:
    # As many epochs as a plan may ask: the round must still be training when the cancel comes,
    # however fast the GPU (50 epochs of the small CPU plan finished within 3 s).
    long_plan = {**plan, "local_epochs": MAX_EPOCHS, "round_id": "gpu-cancel"}
    weights = encode(initial_weights(plan))
    with site.client() as client:
        job = client.start_round(long_plan, weights)
        worker = _worker_of(site, job, time.monotonic() + 300)
        # Cancel once it reports a training step: a cancel of a job that is still loading data
        # proves less.
        progress = _training_progress(client, job, time.monotonic() + 300)
        t0 = time.monotonic()
        client.cancel_round(job)
        final = "running"
        while time.monotonic() - t0 < 120:
            final = client.round_status(job).status
            if final in ("cancelled", "failed", "completed", "interrupted"):
                break
            time.sleep(0.1)
        seconds = time.monotonic() - t0
    fresh = " -m agent.jobs.worker" in f" {worker['worker_command']}"
    # With a GPU in sight the agent must start workers as fresh interpreters (CUDA does not
    # survive a fork); on the CPU it forks them from its fork server.
    expected_fresh = device == "cuda"
    return {
        **worker,
        "progress_at_cancel": progress,
        "fresh_interpreter": fresh,
        "fresh_interpreter_expected": expected_fresh,
        "cancel_status": final,
        "cancel_s": round(seconds, 2),
        "cancel_target_s": CANCEL_TARGET_S,
        "ok": fresh == expected_fresh and final == "cancelled" and seconds <= CANCEL_TARGET_S,
    }


def _offline_pip_env() -> dict[str, str]:
    """The environment for pip in the fresh venv: this machine's pip configuration left out (its
    find-links or extra indexes would let pip take a wheel from elsewhere than the wheelhouse)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _project_source(dest: Path) -> Path:
    """The package's sources, copied: pip builds in the tree it is given, and that is not ours."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for package in ("agent", "coordinator"):
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _cuda_wheelhouse(wheelhouse: Path, root: Path, device: str) -> dict[str, Any]:
    """What the Dockerfile does with a `TORCH_VARIANT=cuda` wheelhouse, in a fresh venv: torch
    from the wheelhouse alone, then the package built from source against it, offline; then the
    venv's interpreter imports the training engine and, on a GPU, computes on it."""
    torch_wheels = sorted(wheelhouse.glob("torch-*.whl"))
    if not torch_wheels:
        raise RuntimeError(
            f"{wheelhouse}: no torch wheel (build it with `make wheelhouse TORCH_VARIANT=cuda`)"
        )
    venv = root / "venv-cuda"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheelhouse)]
    env = _offline_pip_env()
    t0 = time.monotonic()
    subprocess.run([*pip, "torch"], check=True, timeout=900, env=env)
    torch_s = time.monotonic() - t0
    source = _project_source(Path(tempfile.mkdtemp(prefix="src-", dir=root)))
    t0 = time.monotonic()
    subprocess.run([*pip, str(source)], check=True, timeout=900, env=env)
    project_s = time.monotonic() - t0
    probe = (
        "import json, torch, agent.training.engine; "
        "ok = torch.cuda.is_available() and float((torch.ones(8, device='cuda') * 2).sum()) == 16.0; "
        "print(json.dumps([torch.__version__, torch.version.cuda, torch.cuda.is_available(), ok]))"
    )
    out = subprocess.run([py, "-I", "-c", probe], check=True, timeout=300, capture_output=True, text=True)
    version, cuda, available, computed = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "wheel": torch_wheels[-1].name,
        "wheels": len(list(wheelhouse.glob("*.whl"))),
        "wheelhouse_gib": round(sum(w.stat().st_size for w in wheelhouse.glob("*.whl")) / 2**30, 2),
        "install_torch_s": round(torch_s, 1),
        "install_project_s": round(project_s, 1),
        "torch": version,
        "cuda_build": cuda,
        "cuda_available": available,
        "computed_on_gpu": computed,
        "ok": cuda is not None and (bool(computed) or device != "cuda"),
    }


def _step(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    t0 = time.monotonic()
    try:
        report[name] = {"ok": True, **fn()}
    except Exception as exc:
        report[name] = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "trace": traceback.format_exc()[-2000:],
        }
    report[name]["step_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps({name: {k: v for k, v in report[name].items() if k != "trace"}}), file=sys.stderr)


def _chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    amp = report.get("amp_overhead", {})
    if amp.get("ok"):
        names = [c["config"] for c in amp["configs"]]
        x = range(len(names))
        axes[0].bar([i - 0.2 for i in x], [c["engine_wall_s"] for c in amp["configs"]], 0.4, label="engine")
        axes[0].bar([i + 0.2 for i in x], [c["bare_wall_s"] for c in amp["configs"]], 0.4, label="bare MONAI")
        axes[0].set_xticks(
            list(x), [f"{n}\nratio {c['ratio_wall']:.2f}" for n, c in zip(names, amp["configs"], strict=True)]
        )
        axes[0].set_title("a round, AMP (median wall time)")
        axes[0].set_ylabel("seconds")
        axes[0].legend()
    r3 = report.get("agent_round_3d", {})
    if r3.get("ok"):
        labels = [
            "first round\n(whole)",
            "training,\nloader 0",
            "training,\nloader auto",
            f"training,\nloader {r3['loader_more']['loader_threads']}",
            "bare steps\n(on GPU)",
        ]
        values = [
            r3["volumes_per_s"],
            r3["loader_alone"]["training_volumes_per_s"] or 0.0,
            r3["loader_auto"]["training_volumes_per_s"] or 0.0,
            r3["loader_more"]["training_volumes_per_s"] or 0.0,
            r3["bare_volumes_per_s"],
        ]
        axes[1].bar(labels, values, color=["tab:green", "tab:olive", "tab:blue", "tab:cyan", "tab:gray"])
        axes[1].set_title("3D U-Net 128^3 x4 through the agent")
        axes[1].set_ylabel("training volumes per second")
    fig.suptitle(f"gpu_check on {report['environment'].get('gpu', report['environment']['device'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "gpu_check")
    parser.add_argument("--wheelhouse", type=Path, help="a TORCH_VARIANT=cuda wheelhouse to install from")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="run small on the CPU (checks the script only)"
    )
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print(
            "gpu_check: no CUDA device here; this script checks the GPU path (--allow-cpu checks the script)"
        )
        return 2
    device = "cuda" if cuda else "cpu"
    small = not cuda
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="fedsite-gpu-check-"))
    report: dict[str, Any] = {"benchmark": "gpu_check", "environment": _environment(device), "small": small}
    try:
        _step(report, "amp_overhead", lambda: _amp_overhead(device, small, root))
        size = 32 if small else 128
        plan = _plan_3d(size, small)
        site: Site | None = None
        try:
            site = Site(root / "site", size, subjects=3 if small else 6, device=device)
            started = site
            _step(report, "agent_round_3d", lambda: _agent_round_3d(started, plan, root, small))
            _step(report, "fresh_worker_and_cancel", lambda: _fresh_worker_and_cancel(started, plan, device))
        except Exception as exc:
            report["agent_round_3d"] = {
                "ok": False,
                "error": f"site did not start: {type(exc).__name__}: {exc}",
            }
        finally:
            if site is not None:
                site.close()
        if args.wheelhouse is not None:
            wheelhouse = args.wheelhouse
            _step(report, "cuda_wheelhouse", lambda: _cuda_wheelhouse(wheelhouse, root, device))
        else:
            report["cuda_wheelhouse"] = {"ok": None, "note": "not run: no --wheelhouse given"}
        report["all_ok"] = all(
            step.get("ok") is not False
            for key, step in report.items()
            if isinstance(step, dict) and "ok" in step
        )
        _chart(report, args.out / "gpu_check.png")
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        print(json.dumps({k: v for k, v in report.items()}, indent=2, default=str))
        return 0 if report["all_ok"] else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
