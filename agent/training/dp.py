"""DP-SGD for one round, with Opacus: subject-level sampling, per-subject clipping, noise, accounting.

Opacus does the privacy-critical parts (per-sample gradients through ``GradSampleModule``,
clipping and Gaussian noise through ``DPOptimizer``, ε through its RDP / PRV accountants);
this module decides what one "sample" is. The privacy unit is the **subject** (patient), not
the slice: a subject's 2D slices or 3D patches are not independent records, and counting
them as such would understate ε by the number of slices per subject. So each step

1. samples every training subject independently with probability ``sample_rate`` (Poisson
   sampling, which the accountants assume), from a generator seeded by the operating system,
   never by the plan: a coordinator that knew the draw (or the noise) would undo the privacy;
2. draws ``subject_slices`` slices/patches of each sampled subject (the data pipeline's
   labelled/unlabelled mix) and computes the per-slice gradients with Opacus's hooks;
3. sums each subject's per-slice gradients into one per-subject gradient (the gradient of the
   subject's own loss over its slices) and hands those to Opacus's ``DPOptimizer``, which
   clips each to ``max_grad_norm``, adds N(0, (noise_multiplier * max_grad_norm)^2) and
   divides by the expected number of subjects per step. The noise is drawn in Opacus's secure
   mode, which resists the floating-point attack on the Gaussian mechanism.

One step therefore is the subsampled Gaussian mechanism on subjects, and the accountant's
history ``(noise_multiplier, sample_rate, steps)`` gives the subject-level (ε, δ).

The number of noisy steps a round may take is fixed when the site accepts the round (the
ledger reserves them); the step counter is written to the job folder *before* each step, so
that a round that is cancelled, crashes or is resumed is charged every step it took, and a
resumed round never takes more steps than were reserved.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from agent.errors import EngineError, ModelError, PlanError, TrainingCancelled
from agent.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from agent.data.loading import TrainSamples
    from agent.training.plan import Plan

Accountant = Literal["rdp", "prv"]
DEFAULT_DELTA = 1e-5
STEPS_FILE = "dp_steps.json"
ROUND_FILE = "dp_round.json"


@dataclass(frozen=True)
class DPRound:
    """What the site accepted for one DP round: the mechanism and the most steps it may take."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    subject_slices: int
    delta: float
    accountant: Accountant

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DPRound:
        return cls(**json.loads(text))


def schedule(plan: Plan, num_subjects: int) -> tuple[float, int]:
    """(sample_rate, steps) of a DP round of PLAN on NUM_SUBJECTS training subjects.

    The expected number of subjects per step is ``batch_size // subject_slices``; an epoch is
    ``round(1 / sample_rate)`` steps, as Opacus counts epochs.
    """
    dp = plan.privacy.dp
    if dp is None:
        raise PlanError("privacy.dp: the plan does not train with DP")
    if num_subjects < 1:
        raise PlanError(f"privacy.dp: dataset {plan.dataset!r} has no training subjects")
    expected = max(1, plan.batch_size // dp.subject_slices)
    rate = min(1.0, expected / num_subjects)
    per_epoch = max(1, round(1.0 / rate))
    return rate, per_epoch * plan.local_epochs


def epsilon(history: Sequence[tuple[float, float, int]], delta: float, accountant: Accountant) -> float:
    """ε at DELTA of HISTORY, a list of (noise_multiplier, sample_rate, steps), by Opacus's accountant."""
    from opacus.accountants import create_accountant

    kept = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not kept:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = kept
    return float(acc.get_epsilon(delta=delta))


def resolve(plan: Plan, num_subjects: int, *, delta: float, accountant: Accountant) -> DPRound:
    """The round's mechanism: the plan's noise, or the noise that makes this round alone cost
    ``target_epsilon`` at DELTA (Opacus's `get_noise_multiplier`, with the site's accountant)."""
    dp = plan.privacy.dp
    if dp is None:
        raise PlanError("privacy.dp: the plan does not train with DP")
    rate, steps = schedule(plan, num_subjects)
    if dp.noise_multiplier is not None:
        sigma = float(dp.noise_multiplier)
    else:
        from opacus.accountants.utils import get_noise_multiplier

        assert dp.target_epsilon is not None  # one of the two, by the plan's validator
        try:
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=dp.target_epsilon,
                    target_delta=delta,
                    sample_rate=rate,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=0.01,
                )
            )
        except ValueError as exc:
            raise PlanError(
                f"privacy.dp.target_epsilon: {dp.target_epsilon} cannot be reached with sample rate "
                f"{rate:.4g} and {steps} steps at delta {delta:g} ({exc})"
            ) from None
    return DPRound(
        noise_multiplier=sigma,
        sample_rate=rate,
        steps=steps,
        max_grad_norm=float(dp.max_grad_norm),
        subject_slices=dp.subject_slices,
        delta=delta,
        accountant=accountant,
    )


# ----------------------------------------------------------------------------- models


def dp_model(model: nn.Module, name: str) -> nn.Module:
    """MODEL as Opacus can train it: unchanged when its validator finds nothing, else the
    validator's fix (batch norm becomes group norm); a ModelError naming the problem when
    even the fix cannot be trained with DP."""
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if not problems:
        return model
    try:
        fixed = ModuleValidator.fix(model)
    except Exception as exc:  # the fix builds new layers, which may refuse the channel counts
        raise ModelError(
            f"privacy.dp: model {name!r} cannot train with DP ({_first_line(problems[0])}), and Opacus "
            f"cannot convert it ({type(exc).__name__}: {exc}); choose a model with instance or group norm"
        ) from None
    left = ModuleValidator.validate(fixed, strict=False)
    if left:
        raise ModelError(
            f"privacy.dp: model {name!r} cannot train with DP: {_first_line(left[0])}; "
            "choose a model with instance or group norm"
        )
    return fixed


def _first_line(problem: Exception) -> str:
    text = str(problem).strip()
    return text.split(". ")[0] if text else type(problem).__name__


def check_plan_model(plan: Plan) -> None:
    """Refuse at submission a DP plan whose model Opacus can neither train nor convert.

    Built on the meta device: no memory and no compute."""
    from agent.training.registry import build_model

    with torch.device("meta"):
        model = build_model(plan)
    dp_model(model, plan.model.name)


def complete_state(
    trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The exchanged state of the plan's model from a converted model's: entries that the
    conversion removed (batch norm's running statistics) keep their values from START. Those
    statistics are computed from the data without noise, so DP training never updates them."""
    out = {name: start[name].clone() for name in start}
    out.update({name: t for name, t in trained.items() if name in start})
    return out


# ----------------------------------------------------------------------------- training


class StepCounter:
    """The noisy steps a round has taken, kept in its job folder and written before each step."""

    def __init__(self, work_dir: Path) -> None:
        self.path = Path(work_dir) / STEPS_FILE
        self.taken = read_steps(work_dir)

    def start_step(self) -> None:
        self.taken += 1
        atomic_write_bytes(self.path, json.dumps({"steps": self.taken}).encode())


def read_steps(work_dir: Path) -> int:
    """The steps recorded in WORK_DIR (0 when none were taken)."""
    path = Path(work_dir) / STEPS_FILE
    try:
        return int(json.loads(path.read_text())["steps"])
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"the DP step counter {path.name} is unreadable ({exc})") from None


class DPTrainer:
    """The DP-SGD loop of one round (see the module docstring)."""

    def __init__(
        self,
        plan: Plan,
        dpr: DPRound,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        samples: TrainSamples,
        work_dir: Path,
        device: torch.device,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        seed: int | None = None,
    ) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        self.plan = plan
        self.dpr = dpr
        self.samples = samples
        self.device = device
        self.loss_fn = loss_fn
        self.num_subjects = samples.num_subjects
        self.per_epoch = max(1, dpr.steps // plan.local_epochs)
        self.counter = StepCounter(work_dir)
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        # Private randomness: from the operating system, never from the plan's seed (SEED is
        # for tests and benchmarks only).
        base = secrets.randbits(62) if seed is None else seed
        self.sampling = torch.Generator().manual_seed(base)
        noise = torch.Generator(device=device).manual_seed(base + 1)
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=dpr.noise_multiplier,
            max_grad_norm=dpr.max_grad_norm,
            expected_batch_size=max(1, round(dpr.sample_rate * self.num_subjects)),
            loss_reduction="mean",
            generator=noise,
            # Each noise value as the sum of four Gaussian draws, halved (Opacus's secure mode,
            # after Holohan and Braghin, 2021): one draw's floating-point value shows which
            # draws are possible and so leaks the value it was added to (Jin et al., 2021). Four
            # draws per value cost little beside the per-subject gradients.
            secure_mode=True,
        )
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def exhausted(self) -> bool:
        return self.counter.taken >= self.dpr.steps

    def _batch(self, subjects: list[int], draw: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.dpr.subject_slices
        n = len(self.samples)
        items = [self.samples[draw * n + s * k + j] for s in subjects for j in range(k)]
        x = torch.stack([it["image"] for it in items]).to(self.device)
        y = torch.stack([it["label"] for it in items]).to(self.device)
        return x, y

    def step(self, draw: int) -> float | None:
        """One noisy step; the mean per-subject loss, or None when no subject was sampled."""
        chosen = torch.rand(self.num_subjects, generator=self.sampling) < self.dpr.sample_rate
        subjects = [int(i) for i in torch.nonzero(chosen).flatten()]
        self.counter.start_step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value: float | None = None
        if subjects:
            x, y = self._batch(subjects, draw)
            k = self.dpr.subject_slices
            out = self.module(x)
            losses = [
                self.loss_fn(out[i * k : (i + 1) * k], y[i * k : (i + 1) * k]) for i in range(len(subjects))
            ]
            total = torch.stack(losses).sum()
            total.backward()
            for p in self.params:
                gs = p.grad_sample
                if gs is None:
                    gs = torch.zeros((len(subjects) * k, *p.shape), device=p.device)
                p.grad_sample = gs.reshape(len(subjects), k, *p.shape).sum(dim=1)
            loss_value = float(total.detach()) / len(subjects)
        else:
            # An empty Poisson draw is still a step of the mechanism: noise only.
            for p in self.params:
                p.grad_sample = torch.zeros((1, *p.shape), device=p.device)
        self.optimizer.step()
        return loss_value

    def run_epoch(
        self,
        epoch: int,
        should_stop: Callable[[], bool],
        report: Callable[[int, int, float], None],
    ) -> tuple[float, int]:
        """Up to one epoch of noisy steps (fewer when the reserved steps run out)."""
        self.module.train()
        total, counted, step = 0.0, 0, 0
        for step in range(1, self.per_epoch + 1):
            if self.exhausted():
                step -= 1
                break
            if should_stop():
                raise TrainingCancelled(f"cancelled in epoch {epoch} at step {step}")
            loss = self.step((epoch - 1) * self.per_epoch + step)
            if loss is not None:
                total += loss
                counted += 1
            report(step, self.per_epoch, total / max(1, counted))
        mean = total / counted if counted else 0.0
        if not math.isfinite(mean):
            raise EngineError(f"training diverged in epoch {epoch}: the loss is {mean}")
        return mean, step

    def metrics(self) -> dict[str, Any]:
        return {
            "dp_noise_multiplier": self.dpr.noise_multiplier,
            "dp_sample_rate": self.dpr.sample_rate,
            "dp_steps": float(self.counter.taken),
            "dp_round_epsilon": epsilon(
                [(self.dpr.noise_multiplier, self.dpr.sample_rate, self.counter.taken)],
                self.dpr.delta,
                self.dpr.accountant,
            ),
        }
