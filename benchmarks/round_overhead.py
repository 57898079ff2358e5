"""Round overhead: one local round through the engine versus a bare PyTorch/MONAI loop.

On generated brain-MRI-like subjects (NIfTI, preprocessed once into the shared on-disk cache
before anything is timed), for each configuration the script times, alternating, as the
median of --repeats runs:

* ``engine``: what the agent does for a round: decode the global weights from safetensors
  bytes (strict checks), ``train_round`` (seeded epochs, a checkpoint after each, progress
  and cancel hooks, the whole-volume validation), then the egress gate (name/shape/finite
  checks, encode, SHA-256, audit record, atomic write of the update);
* ``bare``: the same model from the same initial weights, the same optimizer, loss, data
  loader and number of epochs in a plain loop, the same whole-volume validation Dice in a
  plain loop, and ``safetensors.torch.save`` of the state dict at the end.

Configurations: a 2D U-Net on 128x128 slices and a small 3D U-Net on 64^3 patches. The
ratio engine / bare (target: at most 1.05) is reported for wall-clock time and for the
process's CPU time (on a shared machine the wall clock also measures the neighbours), with
training samples per second of each, and ``checkpoint_wait_ms``: how long each epoch's
checkpoint holds the engine's training thread (the write itself runs beside the next epoch).
It prints JSON and writes ``round_overhead.png`` to --out.

    .venv/bin/python benchmarks/round_overhead.py --out bench-out/round_overhead [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

from agent.data.catalog import ItemRef  # noqa: E402
from agent.data.loading import build_train_loader, iter_val_volumes  # noqa: E402
from agent.data.synthetic.subjects import generate_subject  # noqa: E402
from agent.data.synthetic.writers import write_nifti_subject  # noqa: E402
from agent.exchange.codec import decode_weights, encode_weights  # noqa: E402
from agent.exchange.egress import EgressGate  # noqa: E402
from agent.training import engine  # noqa: E402
from agent.training.engine import EngineContext, resolve_device, train_round  # noqa: E402
from agent.training.losses import log_dice_loss  # noqa: E402
from agent.training.plan import Plan, parse_plan  # noqa: E402
from agent.training.registry import build_model, exchanged_state, expected_shapes  # noqa: E402

TARGET_RATIO = 1.05
WEIGHTS_LIMIT = 1 << 30


class _MemoryAudit:
    """An audit sink in memory: the benchmark measures the engine, not the database."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def append(self, action: str, *, actor: str, details: dict[str, Any]) -> int:
        self.events.append({"action": action, "actor": actor, "details": details})
        return len(self.events)

    def find(self, action: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["action"] == action and all(e["details"].get(k) == v for k, v in match.items())
        ]


def _configs(quick: bool) -> list[dict[str, Any]]:
    if quick:
        return [
            {
                "name": "unet2d_128",
                "size": 128,
                "subjects": (2, 1),
                "model": {"spatial_dims": 2, "channels": [8, 16, 32, 64], "strides": [2, 2, 2]},
                "roi": [128, 128],
                "batch": 8,
                "samples": 8,
                "epochs": 2,
            },
            {
                "name": "unet3d_64",
                "size": 64,
                "subjects": (2, 1),
                "model": {"spatial_dims": 3, "channels": [4, 8, 16], "strides": [2, 2]},
                "roi": [64, 64, 64],
                "batch": 1,
                "samples": 2,
                "epochs": 2,
            },
        ]
    return [
        {
            "name": "unet2d_128",
            "size": 128,
            "subjects": (4, 2),
            "model": {
                "spatial_dims": 2,
                "channels": [16, 32, 64, 128],
                "strides": [2, 2, 2],
                "num_res_units": 1,
            },
            "roi": [128, 128],
            "batch": 16,
            "samples": 16,
            "epochs": 2,
        },
        {
            "name": "unet3d_64",
            "size": 64,
            "subjects": (4, 2),
            "model": {"spatial_dims": 3, "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
            "roi": [64, 64, 64],
            "batch": 2,
            "samples": 4,
            "epochs": 2,
        },
    ]


def _plan(cfg: dict[str, Any], round_id: str) -> Plan:
    dims = cfg["model"]["spatial_dims"]
    return parse_plan(
        {
            "dataset": "brain",
            "round_id": round_id,
            "model": {"name": "unet", "in_channels": 1, "out_channels": 1, **cfg["model"]},
            "local_epochs": cfg["epochs"],
            "batch_size": cfg["batch"],
            "optimizer": {"name": "adam", "lr": 5e-4},
            "loss": "log_dice",
            "seed": 0,
            "data": {
                "spatial_dims": dims,
                "roi_size": cfg["roi"],
                "samples_per_subject": cfg["samples"],
                "label_slice_fraction": 0.5,
            },
        }
    )


def _items(root: Path, size: int, train: int, val: int) -> tuple[list[ItemRef], list[ItemRef]]:
    out: dict[str, list[ItemRef]] = {"train": [], "val": []}
    for index in range(train + val):
        subject = generate_subject(0, 1, index, size=size)
        folder = root / f"subject-{index:02d}"
        files = write_nifti_subject(subject, folder)
        split = "train" if index < train else "val"
        out[split].append(
            ItemRef(
                dataset="brain",
                subject_key=f"s{index}",
                split=split,  # type: ignore[arg-type]
                images={"flair": folder / "flair.nii.gz"},
                label=folder / "seg.nii.gz",
                fmt="nifti",
                checksum=hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest(),
                target_labels=(1, 2, 4),
            )
        )
    return out["train"], out["val"]


def _engine_round(
    plan: Plan, blob: bytes, train: list[ItemRef], val: list[ItemRef], work: Path, cache: Path, device: str
) -> dict[str, Any]:
    weights = decode_weights(blob, expected=expected_shapes(plan), max_bytes=WEIGHTS_LIMIT)
    ctx = EngineContext(device=device, work_dir=work / "round", cache_dir=cache)
    result = train_round(plan, weights, train, val, ctx)
    gate = EgressGate(_MemoryAudit(), work / "outbox")
    assert plan.round_id is not None
    released = gate.release(
        round_id=plan.round_id,
        plan=plan,
        update=result.update,
        global_weights=result.global_weights,
        kind=plan.send,
    )
    return {"dice": result.metrics["dice"], "bytes": released.nbytes}


def bare_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: torch.Tensor,
    y: torch.Tensor,
) -> None:
    """One plain training step, with float16 autocast and the scaler on CUDA (as the engine)."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=x.device.type, dtype=torch.float16, enabled=x.device.type == "cuda"):
        loss = log_dice_loss(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def _bare_round(
    plan: Plan,
    start: dict[str, torch.Tensor],
    train: list[ItemRef],
    val: list[ItemRef],
    cache: Path,
    device: str,
) -> dict[str, Any]:
    dev = torch.device(device)
    amp = dev.type == "cuda"
    torch.manual_seed(plan.seed)
    model = build_model(plan)
    model.load_state_dict(start, strict=False)
    model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=plan.optimizer.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    loader = build_train_loader(train, plan.data, batch_size=plan.batch_size, seed=plan.seed, cache_dir=cache)
    for _ in range(plan.local_epochs):
        model.train()
        for batch in loader:
            bare_step(model, opt, scaler, batch["image"].to(dev), batch["label"].to(dev))
    model.eval()
    scores = []
    roi = list(plan.data.roi_size)
    with torch.inference_mode(), torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=amp):
        for _, image, label in iter_val_volumes(val, plan.data, cache_dir=cache):
            if plan.data.spatial_dims == 3:
                logits = torch.as_tensor(
                    sliding_window_inference(image[None].to(dev), roi, plan.batch_size, model, overlap=0.25)
                )[0]
            else:
                slices = image.permute(3, 0, 1, 2)
                parts = [
                    torch.as_tensor(
                        sliding_window_inference(
                            slices[i : i + plan.batch_size].to(dev), roi, plan.batch_size, model
                        )
                    )
                    for i in range(0, slices.shape[0], plan.batch_size)
                ]
                logits = torch.cat(parts).permute(1, 2, 3, 0)
            pred, target = logits.float() > 0, label.to(logits.device) > 0.5
            denom = int(pred.sum()) + int(target.sum())
            scores.append(1.0 if denom == 0 else 2.0 * int((pred & target).sum()) / denom)
    data = st_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    return {"dice": float(np.mean(scores)), "bytes": len(data)}


def _timed(fn: Callable[[], dict[str, Any]], device: str) -> tuple[float, float, dict[str, Any]]:
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, out


@contextlib.contextmanager
def _checkpoint_waits() -> Iterator[list[float]]:
    """The seconds each epoch's checkpoint step holds the training thread, while the block runs.

    The step snapshots the model and optimizer state and hands them to the background writer
    (`agent.training.checkpoint_writer`); what the writer then spends is off the training path.
    """
    waits: list[float] = []
    original = engine._Trainer.save_checkpoint

    def timed(self: Any, *args: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        try:
            original(self, *args, **kwargs)
        finally:
            waits.append(time.perf_counter() - t0)

    engine._Trainer.save_checkpoint = timed  # type: ignore[method-assign]
    try:
        yield waits
    finally:
        engine._Trainer.save_checkpoint = original  # type: ignore[method-assign]


def run_config(cfg: dict[str, Any], repeats: int, device: str, root: Path) -> dict[str, Any]:
    data = root / cfg["name"] / "data"
    cache = root / cfg["name"] / "cache"
    train, val = _items(data, cfg["size"], *cfg["subjects"])
    plan = _plan(cfg, "bench")
    torch.manual_seed(1)
    start = exchanged_state(build_model(plan))
    blob = encode_weights(start)
    # Preprocess once (both paths read the same cache) and warm up kernels and allocators.
    _bare_round(plan, start, train, val, cache, device)
    _engine_round(plan, blob, train, val, root / cfg["name"] / "warm", cache, device)
    samples = len(train) * cfg["samples"] * cfg["epochs"]
    runs: dict[str, list[tuple[float, float]]] = {"engine": [], "bare": []}
    dice: dict[str, float] = {}
    waits: list[float] = []
    for i in range(repeats):
        work = root / cfg["name"] / f"run{i}"
        order = ("engine", "bare") if i % 2 == 0 else ("bare", "engine")
        for which in order:
            if which == "engine":
                with _checkpoint_waits() as round_waits:
                    wall, cpu, out = _timed(
                        functools.partial(_engine_round, plan, blob, train, val, work, cache, device), device
                    )
                waits.extend(round_waits)
            else:
                wall, cpu, out = _timed(lambda: _bare_round(plan, start, train, val, cache, device), device)
            runs[which].append((wall, cpu))
            dice[which] = out["dice"]
        shutil.rmtree(work, ignore_errors=True)
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()
    }
    return {
        "config": cfg["name"],
        "model": cfg["model"],
        "roi_size": cfg["roi"],
        "batch_size": cfg["batch"],
        "epochs": cfg["epochs"],
        "train_subjects": len(train),
        "val_subjects": len(val),
        "train_samples": samples,
        "engine_wall_s": round(med["engine"][0], 3),
        "bare_wall_s": round(med["bare"][0], 3),
        "engine_cpu_s": round(med["engine"][1], 3),
        "bare_cpu_s": round(med["bare"][1], 3),
        "ratio_wall": round(med["engine"][0] / med["bare"][0], 3),
        "ratio_cpu": round(med["engine"][1] / med["bare"][1], 3) if med["bare"][1] > 0 else None,
        "engine_samples_per_s": round(samples / med["engine"][0], 2),
        "bare_samples_per_s": round(samples / med["bare"][0], 2),
        # What the engine's per-epoch checkpoint costs the training thread (the write itself
        # runs beside the next epoch).
        "checkpoint_wait_ms": round(1000 * statistics.median(waits), 2),
        "dice_engine": round(dice["engine"], 4),
        "dice_bare": round(dice["bare"], 4),
        "runs_wall_s": {k: [round(w, 3) for w, _ in v] for k, v in runs.items()},
    }


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(results))
    for ax, kind, label in ((axes[0], "wall", "wall-clock"), (axes[1], "cpu", "process CPU")):
        ax.bar(x - 0.2, [r[f"bare_{kind}_s"] for r in results], 0.4, label="bare PyTorch/MONAI loop")
        ax.bar(x + 0.2, [r[f"engine_{kind}_s"] for r in results], 0.4, label="fedsite round (engine + gate)")
        for i, r in enumerate(results):
            ratio = r[f"ratio_{kind}"]
            if ratio is not None:
                ax.text(i + 0.2, r[f"engine_{kind}_s"], f"x{ratio:.3f}", ha="center", va="bottom")
        ax.set_xticks(x, [r["config"] for r in results])
        ax.set_ylabel(f"{label} seconds per round (median)")
        ax.set_title(f"{label} (target ratio <= {TARGET_RATIO})")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/round_overhead"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller models and data, for CI smoke runs")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device).type
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="round-overhead-"))
    try:
        results = [run_config(cfg, args.repeats, device, root) for cfg in _configs(args.quick)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    png = args.out / "round_overhead.png"
    _plot(results, png)
    report = {
        "benchmark": "round_overhead",
        "target_ratio": TARGET_RATIO,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "quick": args.quick,
        "results": results,
        "within_target": all(r["ratio_wall"] <= TARGET_RATIO for r in results),
        "within_target_cpu": all((r["ratio_cpu"] or 0) <= TARGET_RATIO for r in results),
        "png": str(png),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
