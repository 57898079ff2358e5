"""Secure aggregation against plain FedAvg: each site's CPU time and bytes per round, in one run.

The reference study's model (a 2D U-Net on 128x128 FLAIR slices; here MONAI's UNet with five
levels of 32 to 512 channels and one residual unit each, 3.35 M exchanged values), 10 sites, the
protocol in this process (`agent.exchange.secagg`, every message through its JSON form, each
site's state in its own directory as at an agent). Training is the same in both modes and is
left out: what is measured is what each mode adds around a trained update.

Per site and round:

* plain FedAvg: encode the update as safetensors (float32), the bytes of the update sent and of
  the global weights received;
* secure: advertise (two X25519 pairs, an Ed25519 signature), share (verify 10 signatures, two
  Shamir splits, 9 sealed share pairs), quantise (clip, weight, scale, mod 2^32), mask (9 share
  ciphertexts opened, 10 ChaCha20 mask streams of the vector's length), encode the masked vector
  as safetensors (uint32), unmask; bytes: every message up and down plus the global weights.

CPU time is the process's (`time.process_time`) around each site's own calls, JSON parsing and
writing of its messages included; one process runs all sites in turn, so no site's work overlaps
another's. The coordinator's CPU (decode and average, or route, sum and unmask) is reported
apart. Two scenarios: every site stays, and one site drops before its masked input and one after
(the coordinator then rebuilds the dropped site's mask key and removes its masks from 8
survivors). HTTP headers are left out of the bytes (the secure round has 3 more round trips
per site: about 1-2 KB). Medians over --repeats rounds; prints JSON and writes
``secure_aggregation.json`` and ``secure_aggregation.png`` to --out.

    .venv/bin/python benchmarks/secure_aggregation.py --out bench-out/secagg [--repeats 5] [--quick]

Goal (the issue): under 1.5x the bytes and under 1 s of added CPU per site per round.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from safetensors.numpy import save as np_save  # noqa: E402

from agent.exchange.codec import decode_weights, encode_weights  # noqa: E402
from agent.exchange.secagg import (  # noqa: E402
    AdvertiseBundle,
    CoordinatorSecAgg,
    MaskRequest,
    QuantParams,
    ShareRequest,
    ShareResponse,
    SiteSecAgg,
    UnmaskRequest,
    UnmaskResponse,
    dequantize_sum,
    error_bound,
    flatten,
    generate_site_key,
    quantize,
    unflatten,
)
from agent.training.registry import exchanged_state, model_entry  # noqa: E402

TARGET_BYTES_RATIO = 1.5
TARGET_ADDED_CPU_S = 1.0
SITES = 10
CLIP = 0.05
MAX_WEIGHT = 1000
STEPS = ("advertise", "share", "quantize", "mask", "encode", "unmask")


def model_args(quick: bool) -> dict[str, Any]:
    """The study's 2D U-Net (full) or a tiny one (quick: for the benchmark's own test)."""
    if quick:
        return {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": [4, 8], "strides": [2]}
    return {
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 1,
        "channels": [32, 64, 128, 256, 512],
        "strides": [2, 2, 2, 2],
        "num_res_units": 1,
    }


def site_updates(
    args: dict[str, Any], n: int, seed: int
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Global weights and n plausible updates (small, differently scaled noise: a round's diffs)."""
    torch.manual_seed(seed)
    model = model_entry("unet").cls(**args)
    global_state = exchanged_state(model)
    g = torch.Generator().manual_seed(seed + 1)
    updates = [
        {k: torch.randn(v.shape, generator=g) * (0.002 * (i + 1)) for k, v in global_state.items()}
        for i in range(n)
    ]
    return global_state, updates


class Clock:
    """CPU seconds per (site, step), summed over the calls inside `step`."""

    def __init__(self) -> None:
        self.cpu: dict[str, dict[str, float]] = {}

    @contextmanager
    def step(self, site: str, name: str) -> Iterator[None]:
        start = time.process_time()
        try:
            yield
        finally:
            per = self.cpu.setdefault(site, {})
            per[name] = per.get(name, 0.0) + time.process_time() - start


def plain_round(
    global_state: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]]
) -> dict[str, Any]:
    ids = [f"site-{i:02d}" for i in range(len(updates))]
    clock = Clock()
    down = len(encode_weights(global_state))
    blobs: dict[str, bytes] = {}
    for s, update in zip(ids, updates, strict=True):
        with clock.step(s, "encode"):
            blobs[s] = encode_weights(update)
    shapes = {k: tuple(v.shape) for k, v in global_state.items()}
    weights = {s: 10 + i for i, s in enumerate(ids)}
    start = time.process_time()
    total = sum(weights.values())
    mean: dict[str, torch.Tensor] = {}
    for s in ids:
        decoded = decode_weights(blobs[s], expected=shapes, max_bytes=1 << 31)
        for k, v in decoded.items():
            mean[k] = mean.get(k, torch.zeros_like(v)) + v * (weights[s] / total)
    coordinator_cpu = time.process_time() - start
    return {
        "site_cpu_s": {s: sum(c.values()) for s, c in clock.cpu.items()},
        "site_up_bytes": {s: len(b) for s, b in blobs.items()},
        "site_down_bytes": dict.fromkeys(ids, down),
        "coordinator_cpu_s": coordinator_cpu,
    }


def secure_round(
    work: Path,
    tag: str,
    global_state: dict[str, torch.Tensor],
    updates: list[dict[str, torch.Tensor]],
    *,
    threshold: int,
    drop_before: str | None = None,
    drop_after: str | None = None,
) -> dict[str, Any]:
    """One secure round among len(updates) sites; messages cross as JSON text (counted)."""
    ids = [f"site-{i:02d}" for i in range(len(updates))]
    keys = {s: generate_site_key() for s in ids}
    roster = {s: k.public_key() for s, k in keys.items()}
    down_global = len(encode_weights(global_state))
    length = sum(v.numel() for v in global_state.values()) + 1
    clock = Clock()
    up: dict[str, int] = dict.fromkeys(ids, 0)
    down: dict[str, int] = dict.fromkeys(ids, down_global)
    sites = {
        s: SiteSecAgg(
            work / tag / s,
            site_id=s,
            run_id="bench",
            round_id=tag,
            threshold=threshold,
            signing_key=keys[s],
            roster=roster,
        )
        for s in ids
    }
    agg = CoordinatorSecAgg(run_id="bench", round_id=tag, threshold=threshold, pinned=roster, length=length)
    coord = Clock()  # the coordinator's CPU, under the name "coordinator"
    c = "coordinator"

    for s in ids:
        with clock.step(s, "advertise"):
            text = sites[s].advertise().to_json()
        up[s] += len(text)
        with coord.step(c, c):
            agg.add_advertisement(AdvertiseBundle.from_json(text))
    with coord.step(c, c):
        share_text = agg.share_request().to_json()
    for s in ids:
        down[s] += len(share_text)
        with clock.step(s, "share"):
            text = sites[s].share(ShareRequest.from_json(share_text)).to_json()
        up[s] += len(text)
        with coord.step(c, c):
            agg.add_shares(ShareResponse.from_json(text))
    with coord.step(c, c):
        mask_texts = {s: r.to_json() for s, r in agg.mask_requests().items()}
    params = QuantParams(n_sites=len(ids), clip=CLIP, max_weight=MAX_WEIGHT)
    weights = {s: 10 + i for i, s in enumerate(ids)}
    for s, update in zip(ids, updates, strict=True):
        down[s] += len(mask_texts[s])
        if s == drop_before:
            continue
        with clock.step(s, "quantize"):
            q = quantize(flatten(update), weights[s], params)
        with clock.step(s, "mask"):
            masked = sites[s].mask(MaskRequest.from_json(mask_texts[s]), q.vector)
        with clock.step(s, "encode"):
            blob = np_save({"masked": masked})
        up[s] += len(blob)
        with coord.step(c, c):
            agg.add_masked(s, masked)
    with coord.step(c, c):
        unmask_text = agg.unmask_request().to_json()
    for s in json.loads(unmask_text)["survivors"]:
        down[s] += len(unmask_text)
        if s == drop_after:
            continue
        with clock.step(s, "unmask"):
            text = sites[s].unmask(UnmaskRequest.from_json(unmask_text)).to_json()
        up[s] += len(text)
        with coord.step(c, c):
            agg.add_unmask(UnmaskResponse.from_json(text))
    shapes = {k: tuple(v.shape) for k, v in global_state.items()}
    with coord.step(c, c):
        decoded = dequantize_sum(agg.result(), params)
        mean = unflatten(decoded.mean.astype(np.float32), shapes)
    # Check the result against the plain weighted mean of the clipped updates of the contributors.
    contributors = [i for i, s in enumerate(ids) if s != drop_before]
    total_w = sum(weights[ids[i]] for i in contributors)
    assert decoded.total_weight == total_w
    worst = 0.0
    for k in shapes:
        exact = (
            sum(updates[i][k].double().clamp(-CLIP, CLIP) * weights[ids[i]] for i in contributors) / total_w
        )
        worst = max(worst, float((mean[k].double() - exact).abs().max()))
    # The float32 model adds its own rounding (half an ulp of values up to CLIP) to the bound.
    bound = error_bound(len(ids), MAX_WEIGHT, CLIP, total_w) + CLIP * 2.0**-24
    if worst > bound:
        raise AssertionError(f"secure mean differs from the plain mean by {worst}, over the bound {bound}")
    full = [s for s in ids if s not in (drop_before, drop_after)]
    return {
        "site_cpu_s": {s: sum(clock.cpu[s].values()) for s in full},
        "site_steps_cpu_s": {s: clock.cpu[s] for s in full},
        "site_up_bytes": {s: up[s] for s in full},
        "site_down_bytes": {s: down[s] for s in full},
        "coordinator_cpu_s": coord.cpu[c][c],
        "max_abs_error": worst,
        "error_bound": bound,
    }


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of the per-site median (and max) CPU and bytes."""
    cpu = [_median(list(r["site_cpu_s"].values())) for r in rounds]
    cpu_max = [max(r["site_cpu_s"].values()) for r in rounds]
    up = [_median(list(r["site_up_bytes"].values())) for r in rounds]
    down = [_median(list(r["site_down_bytes"].values())) for r in rounds]
    out: dict[str, Any] = {
        "site_cpu_s": _median(cpu),
        "site_cpu_s_max": _median(cpu_max),
        "site_up_bytes": _median(up),
        "site_down_bytes": _median(down),
        "site_bytes": _median([u + d for u, d in zip(up, down, strict=True)]),
        "coordinator_cpu_s": _median([r["coordinator_cpu_s"] for r in rounds]),
    }
    if "site_steps_cpu_s" in rounds[0]:
        out["site_steps_cpu_s"] = {
            step: _median(
                [_median([c.get(step, 0.0) for c in r["site_steps_cpu_s"].values()]) for r in rounds]
            )
            for step in STEPS
        }
        out["max_abs_error"] = max(r["max_abs_error"] for r in rounds)
        out["error_bound"] = min(r["error_bound"] for r in rounds)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    plain, secure, dropout = result["plain"], result["secure"], result["secure_with_dropouts"]
    labels = ["plain FedAvg", "secure", "secure, 2 dropouts"]
    ax1.bar(labels[0], plain["site_cpu_s"], color="tab:gray")
    for label, summary in ((labels[1], secure), (labels[2], dropout)):
        bottom = 0.0
        for k, step in enumerate(STEPS):
            colour = plt.get_cmap("tab10")(k)
            value = summary["site_steps_cpu_s"][step]
            ax1.bar(label, value, bottom=bottom, color=colour, label=step if label == labels[1] else None)
            bottom += value
    ax1.axhline(
        plain["site_cpu_s"] + TARGET_ADDED_CPU_S, color="tab:red", ls="--", lw=1, label="goal: plain + 1 s"
    )
    ax1.set_ylabel("CPU seconds per site per round (median)")
    ax1.set_title("Site CPU around one update")
    ax1.legend(fontsize=7)
    mb = 1e6
    for i, summary in enumerate((plain, secure, dropout)):
        ax2.bar(
            i - 0.2,
            summary["site_up_bytes"] / mb,
            width=0.4,
            color="tab:blue",
            label="up" if i == 0 else None,
        )
        ax2.bar(
            i + 0.2,
            summary["site_down_bytes"] / mb,
            width=0.4,
            color="tab:orange",
            label="down" if i == 0 else None,
        )
    ax2.set_xticks(range(3), labels)
    ax2.set_ylabel("MB per site per round")
    ax2.set_title(f"Bytes: secure / plain = {result['ratios']['bytes']:.3f}")
    ax2.legend(fontsize=7)
    fig.suptitle(
        f"Secure aggregation vs FedAvg, {result['sites']} sites, {result['model_values'] / 1e6:.2f} M values"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "secagg")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sites", type=int, default=SITES)
    parser.add_argument("--quick", action="store_true", help="a tiny U-Net (seconds in all)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.sites < 3:
        parser.error("--repeats must be at least 1 and --sites at least 3")
    threshold = args.sites // 2 + 1  # the smallest strict majority, as the sites require
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    margs = model_args(args.quick)
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "secure": [], "secure_with_dropouts": []}
    with tempfile.TemporaryDirectory(prefix="fedsite-secagg-bench-") as tmp:
        work = Path(tmp)
        global_state, updates = site_updates(margs, args.sites, seed=0)
        secure_round(
            work, "warm-up", global_state, updates, threshold=threshold
        )  # imports, allocator, caches
        for rep in range(args.repeats):
            runs["plain"].append(plain_round(global_state, updates))
            runs["secure"].append(secure_round(work, f"r{rep}", global_state, updates, threshold=threshold))
            runs["secure_with_dropouts"].append(
                secure_round(
                    work,
                    f"d{rep}",
                    global_state,
                    updates,
                    threshold=threshold,
                    drop_before="site-01",
                    drop_after="site-03",
                )
            )
    plain, secure = summarise(runs["plain"]), summarise(runs["secure"])
    dropout = summarise(runs["secure_with_dropouts"])
    ratios = {
        "bytes": secure["site_bytes"] / plain["site_bytes"],
        "up_bytes": secure["site_up_bytes"] / plain["site_up_bytes"],
        "added_site_cpu_s": secure["site_cpu_s"] - plain["site_cpu_s"],
        "added_site_cpu_s_with_dropouts": dropout["site_cpu_s"] - plain["site_cpu_s"],
        "cpu": secure["site_cpu_s"] / plain["site_cpu_s"] if plain["site_cpu_s"] > 0 else None,
    }
    result: dict[str, Any] = {
        "benchmark": "secure_aggregation",
        "quick": args.quick,
        "sites": args.sites,
        "threshold": threshold,
        "repeats": args.repeats,
        "model": {"name": "unet", **margs},
        "model_values": sum(v.numel() for v in global_state.values()),
        "clip": CLIP,
        "max_weight": MAX_WEIGHT,
        "plain": plain,
        "secure": secure,
        "secure_with_dropouts": dropout,
        "ratios": ratios,
        "goals": {
            "bytes_ratio_below": TARGET_BYTES_RATIO,
            "added_cpu_s_below": TARGET_ADDED_CPU_S,
            "met": ratios["bytes"] < TARGET_BYTES_RATIO and ratios["added_site_cpu_s"] < TARGET_ADDED_CPU_S,
        },
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
    }
    (args.out / "secure_aggregation.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "secure_aggregation.png")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
