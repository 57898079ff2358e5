"""Membership inference against what the site released: how well can an attacker tell the site's
training subjects from its held-out subjects, given the released model?

The report rebuilds the model the site released for a round (the global weights it received
plus the update that left through the egress gate, filters applied), scores every training
subject (members) and every validation subject (non-members, never trained on at this site)
and measures two attacks:

- ``loss``: the loss-threshold attack (Yeom et al. 2018): a subject whose loss under the
  released model is low is guessed to be a member. Score = -loss.
- ``calibrated``: the loss under the released model relative to the loss under the model the
  round started from (difficulty calibration, Watson et al. 2022): what the round itself
  taught about each subject. Score = loss_before - loss_after. Needs the global weights.

Each attack gives the ROC AUC with a stratified bootstrap interval (members and non-members
resampled separately, seeded), and the true-positive rate at 5% and 10% false-positive rate:
the numbers an admin reads before trusting a configuration. An AUC interval that contains
0.5 means the attack cannot tell members from non-members better than chance at this
sample size; a small site has wide intervals, which the report shows rather than hides.

Losses are per subject, over its whole volume, with the plan's loss: the subject is the unit
that DP protects here (`agent.training.dp`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agent.data import loading
from agent.training import dp as dp_sgd
from agent.training.engine import predict_volume, resolve_device
from agent.training.losses import make_loss
from agent.training.registry import build_model

if TYPE_CHECKING:
    from agent.data.catalog import ItemRef
    from agent.training.plan import Plan

FPR_POINTS = (0.05, 0.10)


@dataclass
class AttackResult:
    attack: str
    auc: float
    auc_low: float
    auc_high: float
    tpr_at_5_fpr: float
    tpr_at_10_fpr: float
    members: int
    nonmembers: int
    fpr: list[float] = field(default_factory=list, repr=False)
    tpr: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("fpr")
        out.pop("tpr")
        return out


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counted half (Mann-Whitney U / n m)."""
    m = np.asarray(members, dtype=np.float64)[:, None]
    n = np.asarray(nonmembers, dtype=np.float64)[None, :]
    return float(((m > n).sum() + 0.5 * (m == n).sum()) / (m.size * n.size))


def roc(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every threshold, from (0, 0) to (1, 1)."""
    thresholds = np.unique(np.concatenate([members, nonmembers]))[::-1]
    fpr = [0.0] + [float((nonmembers >= t).mean()) for t in thresholds]
    tpr = [0.0] + [float((members >= t).mean()) for t in thresholds]
    return np.asarray(fpr), np.asarray(tpr)


def tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The highest TPR among thresholds whose FPR is at most TARGET."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def attack(
    name: str,
    members: Sequence[float] | np.ndarray,
    nonmembers: Sequence[float] | np.ndarray,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
) -> AttackResult:
    """AUC (with a 95% stratified bootstrap interval) and TPR at low FPR of one attack's scores
    (higher score = "member")."""
    mem = np.asarray(members, dtype=np.float64)
    non = np.asarray(nonmembers, dtype=np.float64)
    if mem.size < 1 or non.size < 1:
        raise ValueError(
            f"membership inference needs members and non-members, got {mem.size} and {non.size} subjects"
        )
    rng = np.random.default_rng(seed)
    boots = [
        auc(rng.choice(mem, mem.size, replace=True), rng.choice(non, non.size, replace=True))
        for _ in range(bootstrap)
    ]
    low, high = np.percentile(boots, [2.5, 97.5]) if boots else (np.nan, np.nan)
    fpr, tpr = roc(mem, non)
    return AttackResult(
        attack=name,
        auc=auc(mem, non),
        auc_low=float(low),
        auc_high=float(high),
        tpr_at_5_fpr=tpr_at(fpr, tpr, FPR_POINTS[0]),
        tpr_at_10_fpr=tpr_at(fpr, tpr, FPR_POINTS[1]),
        members=int(mem.size),
        nonmembers=int(non.size),
        fpr=fpr.tolist(),
        tpr=tpr.tolist(),
    )


def subject_losses(
    plan: Plan,
    weights: Mapping[str, torch.Tensor],
    items: Sequence[ItemRef],
    *,
    cache_dir: Path,
    device: str = "cpu",
) -> np.ndarray:
    """The plan's loss of every subject's whole volume under WEIGHTS (as evaluation predicts it)."""
    dev = resolve_device(device)
    model = build_model(plan)
    if plan.privacy.dp is not None:
        model = dp_sgd.dp_model(model, plan.model.name)
    model.load_state_dict(dict(weights), strict=False)
    model.to(dev).eval()
    loss_fn = make_loss(plan.loss)
    out: list[float] = []
    with torch.inference_mode():
        for _key, image, label in loading.iter_val_volumes(list(items), plan.data, cache_dir=cache_dir):
            logits = predict_volume(plan, model, image, dev)
            out.append(float(loss_fn(logits[None], label[None].to(logits.device))))
    return np.asarray(out, dtype=np.float64)


def membership_report(
    plan: Plan,
    released: Mapping[str, torch.Tensor],
    members: Sequence[ItemRef],
    nonmembers: Sequence[ItemRef],
    *,
    cache_dir: Path,
    reference: Mapping[str, torch.Tensor] | None = None,
    device: str = "cpu",
    bootstrap: int = 1000,
    seed: int = 0,
) -> list[AttackResult]:
    """The loss attack, and the calibrated one when the REFERENCE weights (the model the round
    started from) are known, against the RELEASED weights."""
    after_m = subject_losses(plan, released, members, cache_dir=cache_dir, device=device)
    after_n = subject_losses(plan, released, nonmembers, cache_dir=cache_dir, device=device)
    results = [attack("loss", -after_m, -after_n, bootstrap=bootstrap, seed=seed)]
    if reference is not None:
        before_m = subject_losses(plan, reference, members, cache_dir=cache_dir, device=device)
        before_n = subject_losses(plan, reference, nonmembers, cache_dir=cache_dir, device=device)
        results.append(
            attack("calibrated", before_m - after_m, before_n - after_n, bootstrap=bootstrap, seed=seed)
        )
    return results


def released_weights(
    plan: Plan, update: Mapping[str, torch.Tensor], global_weights: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """The model the coordinator can rebuild: the update itself, or global + update for ``send: diff``."""
    if plan.send == "diff":
        if global_weights is None:
            raise ValueError("a 'diff' update needs the global weights it was computed against")
        return {name: global_weights[name] + update[name] for name in update}
    return {name: t.clone() for name, t in update.items()}


def write_roc(results: Sequence[AttackResult], path: Path, title: str) -> Path:
    """A ROC plot of the attacks (log-free, with the chance diagonal) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    for r in results:
        ax.step(
            r.fpr,
            r.tpr,
            where="post",
            label=f"{r.attack}: AUC {r.auc:.2f} [{r.auc_low:.2f}, {r.auc_high:.2f}]",
        )
    ax.set_xlabel("false-positive rate (non-members called members)")
    ax.set_ylabel("true-positive rate (members found)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
