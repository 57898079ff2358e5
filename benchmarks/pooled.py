"""CDS (centralised / pooled data): the upper bound of the reference study.

The same model, plan and epoch budget as the federated runs, trained in one process on the
union of every site's training split, with the agent's own catalog, loading and engine
code. Each site's configuration is scanned into a catalog database of this benchmark (not
the agent's), with the site's own secret, so the train/validation split of every subject
is exactly the one its agent uses.

    python -m benchmarks.pooled --data bench-out/paper/data --epochs 10 --out bench-out/cds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from agent.config import load_config
from agent.data.catalog import ItemRef, dataset_items, scan_datasets
from agent.db.engine import open_database
from agent.training.engine import EngineContext, evaluate, train_round
from agent.training.plan import parse_plan
from agent.training.registry import exchanged_state


@dataclass
class SiteSplit:
    site: str
    train: list[ItemRef]
    val: list[ItemRef]


def fix_site_secret(config: Path, data_seed: int) -> None:
    """Give a generated site a secret derived from the data seed, before its agent starts.

    The secret keys the subject pseudonyms, and the pseudonyms pick each subject's split:
    with the random secret an agent creates for itself, two runs on the same data would
    validate on different subjects and differ by a few Dice points for that alone. Every
    benchmark that reports a figure of a split calls it (the paper reproduction's tables were
    made with this derivation: changing it changes their splits).
    """
    cfg = load_config(config)
    path = cfg.site.secret_file or (cfg.work_dir / "site.secret")
    if cfg.site.secret is not None:
        raise RuntimeError(f"{config}: has an inline site.secret; expected a generated site")
    digest = hashlib.sha256(f"fedsite-paper-reproduction:{data_seed}:{cfg.site.id}".encode()).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(digest)


def site_splits(configs: Sequence[Path], dataset: str, db_dir: Path) -> list[SiteSplit]:
    """Each site's train and validation items, scanned into DB_DIR/<site>.db."""
    db_dir.mkdir(parents=True, exist_ok=True)
    out: list[SiteSplit] = []
    for path in configs:
        cfg = load_config(path)
        db = open_database(f"sqlite:///{(db_dir / f'{cfg.site.id}.db').as_posix()}")
        try:
            scan_datasets(cfg, db)
            out.append(
                SiteSplit(cfg.site.id, dataset_items(db, dataset, "train"), dataset_items(db, dataset, "val"))
            )
        finally:
            db.dispose()
    return out


@dataclass
class PooledResult:
    weights: dict[str, torch.Tensor]
    info: dict[str, Any]  # epochs, subjects, final training loss, duration (JSON-ready)
    snapshots: dict[int, dict[str, torch.Tensor]]  # epoch -> weights after it


def train_pooled(
    plan_doc: dict[str, Any],
    splits: Sequence[SiteSplit],
    *,
    epochs: int,
    initial: dict[str, torch.Tensor],
    work_dir: Path,
    cache_dir: Path,
    device: str = "cpu",
    progress: bool = True,
    snapshots: Sequence[int] = (),
) -> PooledResult:
    """Train the plan's model for EPOCHS epochs on the union of the sites' training items.

    The weights after each epoch named in SNAPSHOTS are kept as well: one run gives the
    learning curve.
    """
    plan = parse_plan({**plan_doc, "local_epochs": epochs, "send": "weights", "init": "global"})
    train = [item for s in splits for item in s.train]
    t0 = time.monotonic()

    def show(p: dict[str, Any]) -> None:
        if progress and p.get("step") == p.get("steps"):
            print(
                f"CDS epoch {p.get('epoch')}/{p.get('epochs')} loss {p.get('loss', float('nan')):.4f}",
                file=sys.stderr,
            )

    kept: dict[int, dict[str, torch.Tensor]] = {}

    def keep(epoch: int, model: torch.nn.Module) -> None:
        if epoch in snapshots:
            kept[epoch] = exchanged_state(model)

    ctx = EngineContext(
        device=device, work_dir=work_dir, cache_dir=cache_dir, progress=show, on_epoch_end=keep
    )
    result = train_round(plan, initial, train, [], ctx)
    info: dict[str, Any] = {
        "epochs": epochs,
        "num_train_subjects": len(train),
        "train_loss": result.metrics.get("train_loss"),
        "duration_s": round(time.monotonic() - t0, 3),
    }
    return PooledResult(result.update, info, kept)


def evaluate_in_process(
    plan_doc: dict[str, Any], weights: dict[str, torch.Tensor], splits: Sequence[SiteSplit], cache_dir: Path
) -> dict[str, dict[str, Any]]:
    """Dice of WEIGHTS on every site's validation split, in this process (for the standalone CLI)."""
    plan = parse_plan(plan_doc)
    out: dict[str, dict[str, Any]] = {}
    for s in splits:
        ctx = EngineContext(device="cpu", work_dir=cache_dir.parent / "eval", cache_dir=cache_dir)
        res = evaluate(plan, weights, s.val, ctx)
        out[s.site] = {"dice": res.metrics["dice"], "num_samples": res.num_samples}
    return out


def _outside_sites(federation: Path) -> set[str]:
    """Names listed under `outside:` in a generated federation file (none if there is no file)."""
    if not federation.is_file():
        return set()
    doc = yaml.safe_load(federation.read_text()) or {}
    return {str(a["name"]) for a in doc.get("outside") or [] if isinstance(a, dict) and "name" in a}


def main(argv: Sequence[str] | None = None) -> int:
    from coordinator.report import plot_dice_curves
    from coordinator.runner import weighted_dice
    from coordinator.weights import encode, initial_weights

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data",
        type=Path,
        required=True,
        help="Folder written by `fedsite demo-data` (site-<k>/config.yaml).",
    )
    ap.add_argument("--plan", type=Path, help="Plan JSON (default: DATA/plan.json).")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench-out/cds"))
    args = ap.parse_args(argv)
    plan_doc = json.loads((args.plan or args.data / "plan.json").read_text())
    configs = sorted(args.data.glob("site-*/config.yaml"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not configs:
        print(f"{args.data}: no site-<k>/config.yaml found", file=sys.stderr)
        return 2
    outside = _outside_sites(args.data / "federation.yaml")
    args.out.mkdir(parents=True, exist_ok=True)
    every = site_splits(configs, plan_doc["dataset"], args.out / "catalog")
    # Sites outside the federation only test: their data never joins the pool.
    splits = [s for s in every if s.site not in outside]
    pooled = train_pooled(
        plan_doc,
        splits,
        epochs=args.epochs,
        initial=initial_weights(plan_doc),
        work_dir=args.out / "work",
        cache_dir=args.out / "cache",
    )
    weights, info = pooled.weights, pooled.info
    (args.out / "cds.safetensors").write_bytes(encode(weights))
    per_site = evaluate_in_process(plan_doc, weights, splits, args.out / "cache")
    per_out = evaluate_in_process(
        plan_doc, weights, [s for s in every if s.site in outside], args.out / "cache"
    )
    doc = {
        "benchmark": "pooled",
        **info,
        "per_site": per_site,
        "weighted_dice": weighted_dice(per_site),
        "outside_per_site": per_out,
        "outside_weighted_dice": weighted_dice(per_out),
    }
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot_dice_curves(
        {"CDS per site": [(i + 1, v["dice"]) for i, v in enumerate(per_site.values())]},
        args.out / "cds_per_site.png",
        title="CDS: validation Dice per site",
        xlabel="site",
    )
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
