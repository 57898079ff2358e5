"""Local training and evaluation for one round.

``train_round`` takes a validated plan and the coordinator's global weights, trains on the
site's training split and returns the update; ``evaluate`` scores given weights on the
validation split. Both check the weights strictly before anything runs: every name of the
plan's model, every shape, all finite.

Decisions worth knowing:

- Reproducibility: the RNGs (python, numpy, torch) are reseeded at the start of every
  epoch from ``(plan.seed, epoch)`` and each epoch's data loader gets its own seed the
  same way. So a round resumed from the checkpoint of epoch k continues exactly as the
  uninterrupted round would have, and two runs with one seed give identical updates on
  the CPU (where deterministic algorithms are switched on for the round).
- Checkpoints: after every epoch ``work_dir/checkpoint.safetensors`` holds the full model
  state, the optimizer state and the epoch (plus the best weights so far under early
  stopping), written atomically by a background thread while the next epoch trains
  (`agent.training.checkpoint_writer`; the last one is on disk before the round returns or
  raises). ``resume_from_checkpoint=True`` continues from it: this is
  how a round interrupted by a crash resumes (`agent.jobs.recovery`). The checkpoint holds no
  RNG state on purpose: every RNG, and the loader's sampling and augmentation, is seeded
  afresh from ``(plan.seed, epoch)`` when an epoch starts, so the state at the end of epoch
  k is a function of the plan alone and epoch k+1 draws the same numbers whether or not the
  process in between was a new one. The bookkeeping that is not recomputed (losses, steps,
  best epoch, whether kept optimizer state was restored) is in the metadata, so that a
  resumed round's metrics equal the uninterrupted round's too.
- Optimizer state starts fresh each round. With ``optimizer.keep_state`` it is saved at
  the end of a round to ``work_dir/../optimizer_state/<key>.safetensors`` (the key hashes
  the dataset, the model and the optimizer name, so state never crosses models, and one
  file per key bounds the disk) with the plan's ``run_id``, and restored at the start of
  the next round if that round is of the same run and the shapes still fit. A new run starts
  fresh: the state of a run's last round would otherwise move the first round of the next,
  and two runs with one seed would train differently. Two runs at once with one key take
  turns overwriting the file, so each of their rounds starts fresh
  (``optimizer_state_restored`` 0).
- Mixed precision: on CUDA, float16 autocast with a gradient scaler; the losses compute
  their sums in float32.
- Evaluation: whole validation volumes. A 2D model predicts every axial slice (along the
  volume's last axis) with a sliding window of the plan's ``roi_size`` and the slices are
  stacked back into a volume; a 3D model uses a sliding window directly. Dice is computed
  per subject on the thresholded prediction (an empty prediction of an empty mask counts
  as 1), then averaged; quantiles describe the spread over subjects.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from agent.data import loading
from agent.errors import CheckpointError, EngineError, PlanError, TrainingCancelled, WeightError
from agent.exchange.codec import check_names_and_shapes
from agent.training import dp as dp_sgd
from agent.training.checkpoint import CHECKPOINT_NAME, read_state_metadata
from agent.training.checkpoint_writer import CheckpointWriter, snapshot, write_checkpoint
from agent.training.losses import make_loss
from agent.training.plan import Plan, check_round, plan_hash
from agent.training.registry import build_model, exchanged_state, expected_shapes

if TYPE_CHECKING:
    from agent.data.catalog import ItemRef

log = logging.getLogger("fedsite.training")

# Progress is reported at most this often (plus at every epoch's end); the consumer persists it.
PROGRESS_INTERVAL_S = 1.0
# The most batch-loading threads `loader_threads: auto` gives a GPU job.
AUTO_LOADER_THREADS = 4
# Whether a round on the CPU fills new tensors with NaN, as deterministic mode does by default
# (see `_deterministic`).
FILL_UNINITIALIZED_MEMORY = False


def _no_progress(_: dict[str, Any]) -> None:
    return None


def _never() -> bool:
    return False


def _no_epoch_hook(_epoch: int, _model: nn.Module) -> None:
    return None


@dataclass
class EngineContext:
    device: str
    work_dir: Path
    cache_dir: Path
    progress: Callable[[dict[str, Any]], None] = _no_progress
    should_stop: Callable[[], bool] = _never
    # Called after every epoch with its number and the live model (copy what you keep, e.g.
    # with `registry.exchanged_state`): one long run then yields its intermediate models,
    # a learning curve without separate runs.
    on_epoch_end: Callable[[int, nn.Module], None] = _no_epoch_hook
    # The DP round the site accepted (`agent.training.dp`) for a plan with privacy.dp: its noise,
    # sample rate and the most steps it may take. None: derived from the plan alone (RDP, the
    # plan's delta), for drivers without a site ledger.
    dp: dp_sgd.DPRound | None = None
    # Seeds DP-SGD's subject sampling and noise: for tests and benchmarks that must repeat. The
    # worker never sets it, so a site's noise is drawn from the operating system and no
    # coordinator can predict it.
    dp_seed: int | None = None
    # Threads that load training batches beside the one that trains: the site's
    # `loader_threads` (auto: `loader_threads` below decides by the device).
    loader_threads: int | Literal["auto"] = 0


@dataclass
class TrainResult:
    update: dict[str, torch.Tensor]
    num_samples: int
    metrics: dict[str, float]
    global_weights: dict[str, torch.Tensor] | None


@dataclass
class EvalResult:
    metrics: dict[str, float]
    num_samples: int


@dataclass
class _RunState:
    """What a checkpoint carries beyond model and optimizer."""

    epoch: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    best_epoch: int = 0
    best_dice: float = -1.0
    best_metrics: dict[str, float] = field(default_factory=dict)
    since_best: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    # 1.0 when `optimizer.keep_state` found state of an earlier round to start from: decided
    # when the round first started, and kept, since a resumed round starts from the checkpoint.
    kept_state_restored: float = 0.0


def loader_threads(setting: int | Literal["auto"], device: torch.device) -> int:
    """How many threads load training batches for a job on DEVICE (with any, the next batch is
    loaded while the current one trains).

    auto: none on the CPU, whose cores the training itself uses; on a GPU up to
    `AUTO_LOADER_THREADS`, half the cores this process may run on, at least one (one thread
    loads 128^3 volumes with four channels at about 40 per second, a third of what an H200
    trains a 3D U-Net on).
    """
    if setting != "auto":
        return int(setting)
    if device.type == "cpu":
        return 0
    return max(1, min(AUTO_LOADER_THREADS, len(os.sched_getaffinity(0)) // 2))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EngineError("device 'cuda' was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise EngineError(f"device {name!r} must be 'auto', 'cpu' or 'cuda'")
    return torch.device(name)


def check_weights(plan: Plan, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every name of the plan's model, every shape, floating point, finite; float32 CPU copies out."""
    if not isinstance(weights, Mapping):
        raise WeightError(f"weights must be a mapping of names to tensors, got {type(weights).__name__}")
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor):
            raise WeightError(f"tensor {name!r}: not a tensor but {type(tensor).__name__}")
    check_names_and_shapes({n: tuple(t.shape) for n, t in weights.items()}, expected_shapes(plan))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if not tensor.is_floating_point():
            raise WeightError(f"tensor {name!r}: dtype {tensor.dtype} is not floating point")
        value = tensor.detach().to(device="cpu", dtype=torch.float32).clone()
        if not bool(torch.isfinite(value).all()):
            raise WeightError(f"tensor {name!r}: contains NaN or Inf values")
        out[name] = value
    return out


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**31 - 1)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on the CPU for the duration of a round, then the previous settings.

    Deterministic mode also fills every new tensor with NaN by default, so that a kernel that
    reads memory it never wrote gives NaN rather than whatever was there. That fill cost 7% of
    a 2D U-Net round on the CPU and 4% of a 3D one, and no kernel of a round reads unwritten
    memory: an update is bit-identical with and without it (tested). So a round leaves it off
    (FILL_UNINITIALIZED_MEMORY).
    """
    if device.type != "cpu":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = FILL_UNINITIALIZED_MEMORY  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]


def _make_optimizer(plan: Plan, model: nn.Module) -> torch.optim.Optimizer:
    spec = plan.optimizer
    params = list(model.parameters())
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum or 0.0, weight_decay=spec.weight_decay)


def _optimizer_tensors(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """Optimizer state keyed by parameter name (``<param>::<slot>``), so it survives reordering."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for p, slots in opt.state.items():
        for slot, value in slots.items():
            if value is None:
                continue
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"{names[id(p)]}::{slot}"] = snapshot(tensor)
    return out


def _restore_optimizer(
    opt: torch.optim.Optimizer, model: nn.Module, tensors: Mapping[str, torch.Tensor]
) -> bool:
    """Load state saved by ``_optimizer_tensors``; False (nothing loaded) if it does not fit the model."""
    params = dict(model.named_parameters())
    index = {name: i for i, name in enumerate(params)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        pname, _, slot = key.rpartition("::")
        if pname not in params:
            return False
        if slot != "step" and tuple(tensor.shape) != tuple(params[pname].shape):
            return False
        state.setdefault(index[pname], {})[slot] = tensor
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return True


def _weights_digest(weights: Mapping[str, torch.Tensor] | None) -> str:
    if weights is None:
        return "none"
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].numpy().tobytes())
    return h.hexdigest()


def _optimizer_state_path(plan: Plan, ctx: EngineContext) -> Path:
    key = json.dumps(
        {
            "dataset": plan.dataset,
            "model": plan.model.model_dump(mode="json"),
            "optimizer": plan.optimizer.name,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return ctx.work_dir.parent / "optimizer_state" / f"{digest}.safetensors"


class _Trainer:
    """One round's training loop; split out of ``train_round`` to keep each step short."""

    def __init__(self, plan: Plan, ctx: EngineContext, device: torch.device) -> None:
        self.plan = plan
        self.ctx = ctx
        self.device = device
        self.amp = device.type == "cuda"
        self.loss_fn = make_loss(plan.loss)
        self.checkpoint = ctx.work_dir / CHECKPOINT_NAME
        self.writer = CheckpointWriter(self.checkpoint)
        self.total_epochs = plan.early_stopping.max_epochs if plan.early_stopping else plan.local_epochs
        self.last_report = 0.0
        # The last progress reported: kept in the checkpoint, and reported again by a round
        # resumed from it, so that its progress is where it stands, even with no epoch left.
        self.last_progress: dict[str, Any] = {}

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp)

    def save_checkpoint(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        run: _RunState,
        tag: str,
    ) -> None:
        tensors = {f"model.{n}": snapshot(t) for n, t in model.state_dict().items()}
        tensors.update({f"optim.{k}": v for k, v in _optimizer_tensors(opt, model).items()})
        if run.best_state is not None:
            tensors.update({f"best.{n}": t for n, t in run.best_state.items()})
        meta = {
            "plan_hash": plan_hash(self.plan),
            "global": tag,
            "epoch": str(run.epoch),
            "epoch_losses": json.dumps(run.epoch_losses),
            "steps": str(run.steps),
            "best_epoch": str(run.best_epoch),
            "best_dice": repr(run.best_dice),
            "best_metrics": json.dumps(run.best_metrics),
            "since_best": str(run.since_best),
            "scaler": json.dumps(scaler.state_dict() if self.amp else {}),
            "kept_state_restored": repr(run.kept_state_restored),
            "progress": json.dumps(self.last_progress),
        }
        self.writer.submit(tensors, meta)

    def load_checkpoint(
        self, model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, tag: str
    ) -> _RunState:
        from safetensors import safe_open

        with safe_open(str(self.checkpoint), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("plan_hash") != plan_hash(self.plan):
            raise CheckpointError(
                f"checkpoint {self.checkpoint} belongs to another plan; not resuming from it"
            )
        if meta.get("global") != tag:
            raise CheckpointError(
                f"checkpoint {self.checkpoint} started from other global weights; not resuming"
            )
        tensors = load_file(str(self.checkpoint))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        optim = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
        if optim and not _restore_optimizer(opt, model, optim):
            raise CheckpointError(f"checkpoint {self.checkpoint}: optimizer state does not fit the model")
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        progress = json.loads(meta.get("progress", "{}"))
        if progress:
            self.last_progress = progress
            self.ctx.progress(dict(progress))
        scaler_state = json.loads(meta.get("scaler", "{}"))
        if self.amp and scaler_state:
            scaler.load_state_dict(scaler_state)
        return _RunState(
            epoch=int(meta["epoch"]),
            epoch_losses=json.loads(meta["epoch_losses"]),
            steps=int(meta["steps"]),
            best_epoch=int(meta["best_epoch"]),
            best_dice=float(meta["best_dice"]),
            best_metrics=json.loads(meta["best_metrics"]),
            since_best=int(meta["since_best"]),
            best_state=best or None,
            kept_state_restored=float(meta.get("kept_state_restored", "0.0")),
        )

    def report(self, epoch: int, step: int, steps: int | None, loss: float, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self.last_report < PROGRESS_INTERVAL_S:
            return
        self.last_report = now
        self.last_progress = {
            "epoch": epoch,
            "epochs": self.total_epochs,
            "step": step,
            "steps": steps or step,
            "loss": loss,
        }
        self.ctx.progress(dict(self.last_progress))

    def run_epoch(
        self,
        epoch: int,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        items: Sequence[ItemRef],
        prox: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[float, int]:
        """Train one epoch (1-based); returns the epoch's mean loss and its step count."""
        seed = _epoch_seed(self.plan.seed, epoch)
        _seed_all(seed)
        threads = loader_threads(self.ctx.loader_threads, self.device)
        loader = loading.build_train_loader(
            list(items),
            self.plan.data,
            batch_size=self.plan.batch_size,
            seed=seed,
            cache_dir=self.ctx.cache_dir,
            threads=threads,
            pin_memory=self.device.type == "cuda",
        )
        try:
            steps: int | None = len(loader)
        except TypeError:
            steps = None
        in_channels = self.plan.model.argument("in_channels")
        model.train()
        total = torch.zeros((), device=self.device)
        step = 0
        # A cancel raised in the loop closes the stream, which stops its loading thread.
        with contextlib.closing(loading.batches(loader, ahead=threads > 0)) as stream:
            for step, batch in enumerate(stream, 1):
                if self.ctx.should_stop():
                    raise TrainingCancelled(f"cancelled in epoch {epoch} at step {step}")
                x = batch["image"].to(self.device, non_blocking=True)
                y = batch["label"].to(self.device, non_blocking=True)
                if x.shape[1] != in_channels:
                    raise EngineError(
                        f"the data has {x.shape[1]} image channels (modalities) "
                        f"but model.in_channels is {in_channels}"
                    )
                opt.zero_grad(set_to_none=True)
                with self.autocast():
                    loss = self.loss_fn(model(x), y)
                if prox:
                    loss = loss + (self.plan.fedprox_mu / 2.0) * sum(((p - g) ** 2).sum() for p, g in prox)
                if self.amp:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                total += loss.detach()
                if time.monotonic() - self.last_report >= PROGRESS_INTERVAL_S:
                    self.report(epoch, step, steps, float(total) / step, force=True)
        if step == 0:
            raise EngineError("the training split gave no batches: no training subjects or samples")
        mean = float(total) / step
        self.report(epoch, step, steps, mean, force=True)
        if not math.isfinite(mean):
            raise EngineError(f"training diverged in epoch {epoch}: the loss is {mean}")
        return mean, step


def train_round(
    plan: Plan,
    global_weights: Mapping[str, torch.Tensor] | None,
    train: Sequence[ItemRef],
    val: Sequence[ItemRef],
    ctx: EngineContext,
    *,
    resume_from_checkpoint: bool = False,
) -> TrainResult:
    """Train the plan's model from the global weights on ``train``; evaluate on ``val``."""
    start = check_weights(plan, global_weights) if global_weights is not None else None
    if plan.init == "global" and start is None:
        raise WeightError("the plan starts from the global weights (init 'global') but none were given")
    if not train:
        raise EngineError(f"dataset {plan.dataset!r} has no training subjects")
    if plan.early_stopping is not None and not val:
        raise EngineError("early_stopping needs validation subjects, and the validation split is empty")
    try:
        check_round(plan)
    except PlanError as exc:
        raise EngineError(str(exc)) from None
    device = resolve_device(ctx.device)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    trainer = _Trainer(plan, ctx, device)
    with _deterministic(device):
        _seed_all(plan.seed)
        model = build_model(plan)
        original = exchanged_state(model)
        if plan.privacy.dp is not None:
            model = dp_sgd.dp_model(model, plan.model.name)
        if plan.init == "global":
            assert start is not None
            model.load_state_dict(start, strict=False)
        else:
            start = None
        model.to(device)
        opt = _make_optimizer(plan, model)
        scaler = torch.amp.GradScaler("cuda", enabled=trainer.amp)
        tag = _weights_digest(start if plan.init == "global" else None)
        run = _RunState()
        if resume_from_checkpoint and trainer.checkpoint.exists():
            run = trainer.load_checkpoint(model, opt, scaler, tag)
        elif plan.optimizer.keep_state:
            run.kept_state_restored = float(_load_kept_state(plan, ctx, opt, model))
        prox = []
        if plan.fedprox_mu > 0 and start is not None:
            prox = [(p, start[n].to(device)) for n, p in model.named_parameters()]
        private = _dp_trainer(plan, ctx, model, opt, train, device, trainer) if plan.privacy.dp else None
        # Each epoch's checkpoint is written while the next trains (and the last while the
        # round evaluates); leaving the block waits for it, so it is on disk when this returns.
        with trainer.writer:
            while run.epoch < trainer.total_epochs:
                if run.since_best >= (plan.early_stopping.patience if plan.early_stopping else math.inf):
                    break
                epoch = run.epoch + 1
                if private is not None:

                    def progress(step: int, of: int, loss: float, e: int = epoch) -> None:
                        trainer.report(e, step, of, loss, force=False)

                    mean, steps = private.run_epoch(epoch, ctx.should_stop, progress)
                    trainer.report(epoch, steps, private.per_epoch, mean, force=True)
                else:
                    mean, steps = trainer.run_epoch(epoch, model, opt, scaler, train, prox)
                run.epoch, run.steps = epoch, run.steps + steps
                run.epoch_losses.append(mean)
                if plan.early_stopping is not None:
                    metrics = _evaluate_model(plan, model, val, ctx, device).metrics
                    if metrics["dice"] > run.best_dice:
                        run.best_dice, run.best_epoch, run.best_metrics = metrics["dice"], epoch, metrics
                        run.best_state = {n: snapshot(t) for n, t in model.state_dict().items()}
                        run.since_best = 0
                    else:
                        run.since_best += 1
                trainer.save_checkpoint(model, opt, scaler, run, tag)
                ctx.on_epoch_end(epoch, model)
            if plan.optimizer.keep_state:
                _save_kept_state(plan, ctx, opt, model)
            if plan.early_stopping is not None and run.best_state is not None:
                model.load_state_dict(run.best_state)
                metrics = dict(run.best_metrics)
                metrics["best_epoch"] = float(run.best_epoch)
            elif val:
                if ctx.should_stop():
                    raise TrainingCancelled("cancelled before evaluation")
                metrics = _evaluate_model(plan, model, val, ctx, device).metrics
            else:
                metrics = {}
    metrics.update(
        {
            "train_loss": run.epoch_losses[-1] if run.epoch_losses else float("nan"),
            "epochs_run": float(run.epoch),
            "steps": float(run.steps),
        }
    )
    if plan.optimizer.keep_state:
        metrics["optimizer_state_restored"] = run.kept_state_restored
    final = exchanged_state(model)
    if private is not None:
        metrics.update(private.metrics())
        final = dp_sgd.complete_state(final, start if start is not None else original)
    if plan.send == "diff":
        assert start is not None
        update = {n: final[n] - start[n] for n in final}
    else:
        update = final
    return TrainResult(update=update, num_samples=len(train), metrics=metrics, global_weights=start)


def _dp_trainer(
    plan: Plan,
    ctx: EngineContext,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    train: Sequence[ItemRef],
    device: torch.device,
    trainer: _Trainer,
) -> dp_sgd.DPTrainer:
    """The DP-SGD loop for a plan with privacy.dp, on ``subject_slices`` samples per subject."""
    spec = plan.privacy.dp
    assert spec is not None
    dpr = ctx.dp or dp_sgd.resolve(
        plan, len(train), delta=spec.delta or dp_sgd.DEFAULT_DELTA, accountant="rdp"
    )
    settings = plan.data.model_copy(update={"samples_per_subject": dpr.subject_slices})
    loader = loading.build_train_loader(
        list(train), settings, batch_size=1, seed=_epoch_seed(plan.seed, 0), cache_dir=ctx.cache_dir
    )
    samples = loader.dataset
    assert isinstance(samples, loading.TrainSamples)
    return dp_sgd.DPTrainer(
        plan, dpr, model, opt, samples, ctx.work_dir, device, trainer.loss_fn, seed=ctx.dp_seed
    )


def _load_kept_state(plan: Plan, ctx: EngineContext, opt: torch.optim.Optimizer, model: nn.Module) -> bool:
    """Restore the state an earlier round of this plan's run kept; False (a fresh start) when
    there is none, it is another run's, or it cannot be read."""
    path = _optimizer_state_path(plan, ctx)
    if not path.exists():
        return False
    try:
        if read_state_metadata(path).get("run_id") != plan.run_id:
            return False
        tensors = load_file(str(path))
    except (CheckpointError, SafetensorError) as exc:
        # The next save replaces it; failing every round of the site until someone deletes a
        # file would cost more than one round's fresh moments.
        log.warning("kept optimizer state %s cannot be read (%s); starting fresh", path.name, exc)
        return False
    return _restore_optimizer(opt, model, tensors)


def _save_kept_state(plan: Plan, ctx: EngineContext, opt: torch.optim.Optimizer, model: nn.Module) -> None:
    assert plan.run_id is not None  # check_round refused keep_state without it
    write_checkpoint(
        _optimizer_state_path(plan, ctx),
        _optimizer_tensors(opt, model),
        {"plan_hash": plan_hash(plan), "run_id": plan.run_id},
    )


def evaluate(
    plan: Plan, weights: Mapping[str, torch.Tensor], val: Sequence[ItemRef], ctx: EngineContext
) -> EvalResult:
    """Mean Dice (and quantiles over subjects) of ``weights`` on the validation split."""
    state = check_weights(plan, weights)
    if not val:
        raise EngineError(f"dataset {plan.dataset!r} has no validation subjects")
    device = resolve_device(ctx.device)
    torch.manual_seed(plan.seed)
    model = build_model(plan)
    if plan.privacy.dp is not None:
        # Evaluated as it was trained: a converted model (batch norm -> group norm) stays converted.
        model = dp_sgd.dp_model(model, plan.model.name)
    model.load_state_dict(state, strict=False)
    model.to(device)
    return _evaluate_model(plan, model, val, ctx, device)


def predict_volume(plan: Plan, model: nn.Module, image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Logits (1, *spatial) for one volume (C, X, Y, Z), exactly as evaluation predicts it (the
    membership-inference report scores subjects with it)."""
    return _predict(plan, model, image, device)


def _predict(plan: Plan, model: nn.Module, image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Logits (1, *spatial) for one volume (C, X, Y, Z)."""
    roi = list(plan.data.roi_size)
    batch = max(1, plan.batch_size)
    amp = device.type == "cuda"
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
        if plan.data.spatial_dims == 3:
            out = sliding_window_inference(
                image[None].to(device), roi_size=roi, sw_batch_size=batch, predictor=model, overlap=0.25
            )
            return torch.as_tensor(out)[0].float()
        slices = image.permute(3, 0, 1, 2)  # (Z, C, X, Y)
        chunks = []
        for i in range(0, slices.shape[0], batch):
            part = slices[i : i + batch].to(device)
            chunks.append(
                torch.as_tensor(
                    sliding_window_inference(part, roi_size=roi, sw_batch_size=batch, predictor=model)
                ).float()
            )
        return torch.cat(chunks).permute(1, 2, 3, 0)  # (1, X, Y, Z)


def _dice(logits: torch.Tensor, label: torch.Tensor) -> float:
    pred = logits > 0
    target = label > 0.5
    denom = int(pred.sum()) + int(target.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int((pred & target).sum()) / denom


def _evaluate_model(
    plan: Plan, model: nn.Module, val: Sequence[ItemRef], ctx: EngineContext, device: torch.device
) -> EvalResult:
    model.eval()
    scores: list[float] = []
    with torch.inference_mode():
        for _key, image, label in loading.iter_val_volumes(list(val), plan.data, cache_dir=ctx.cache_dir):
            if ctx.should_stop():
                raise TrainingCancelled("cancelled during evaluation")
            logits = _predict(plan, model, image, device)
            scores.append(_dice(logits, label.to(logits.device)))
    if not scores:
        raise EngineError("the validation split gave no volumes to evaluate")
    arr = np.asarray(scores, dtype=np.float64)
    p25, median, p75 = np.percentile(arr, [25, 50, 75])
    return EvalResult(
        metrics={
            "dice": float(arr.mean()),
            "dice_p25": float(p25),
            "dice_median": float(median),
            "dice_p75": float(p75),
        },
        num_samples=len(scores),
    )
