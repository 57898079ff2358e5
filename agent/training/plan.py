"""Training plans: the data a coordinator sends to say what to train, never code.

A plan is JSON (see the design's API contract). Every key is validated here; unknown keys
are refused, and every error names the key (``optimizer.lr``, ``model.channels``) so that
a coordinator's operator can fix the plan without reading our code. The model section is
checked against the model registry: exactly the MONAI constructor's arguments, and a
model that can actually process the plan's patch size.

The plan hash (what a site approves under ``approval.policy: manual``) is SHA-256 of the
canonical JSON of the validated plan, defaults filled in, without ``round_id`` and ``run_id``:
two plans that train the same thing have the same hash whatever their run, round and key
order. ``run_id`` names the coordinator's run a round belongs to; it scopes what a site keeps
between rounds (``optimizer.keep_state``), so that a new run never starts from another's.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.data.loading import DataSettings
from agent.errors import PlanError
from agent.training.registry import check_arguments, model_entry, validate_model
from agent.validation import StrictModel, format_validation_error

ROUND_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
# How deep a plan's JSON may nest (objects and arrays). A real plan is four levels deep; the
# limit leaves room for model arguments and refuses, with a message, what would otherwise
# exhaust Python's recursion limit in the JSON parser or in pydantic (an uncaught
# RecursionError, i.e. a 500 and a traceback hundreds of lines long).
MAX_PLAN_DEPTH = 16
# The most values one training batch may hold (batch_size x channels x roi_size): 2**28
# float32 values are 1 GiB for the input alone, and the network's activations are many
# times that. A plan past it cannot fit in a site's memory; it is refused when submitted
# rather than killed by the kernel in the worker hours later. A 3D batch of 4 x 4 x 256^3
# is exactly at the limit.
MAX_BATCH_VALUES = 2**28
# The most epochs one job may train (local epochs of a round, or early stopping's ceiling).
MAX_EPOCHS = 10000


class ModelSpec(BaseModel):
    """``name`` plus exactly the keyword arguments of the named MONAI class."""

    model_config = ConfigDict(extra="allow")

    name: str

    def arguments(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def argument(self, key: str) -> Any:
        """The given value, else the constructor's default (None when it has none)."""
        args = self.arguments()
        if key in args:
            return args[key]
        param = inspect.signature(model_entry(self.name).cls.__init__).parameters.get(key)
        if param is None or param.default is inspect.Parameter.empty:
            return None
        return param.default


class OptimizerSpec(StrictModel):
    name: Literal["adam", "adamw", "sgd"]
    lr: float = Field(gt=0, le=10)
    # SGD only; defaults to 0.9 there ("SGD with momentum").
    momentum: float | None = Field(default=None, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    # Carry the optimizer's state (Adam moments, SGD momentum) from round to round of one run
    # (the plan's run_id) at this site instead of starting fresh each round.
    keep_state: bool = False

    @model_validator(mode="after")
    def _momentum(self) -> OptimizerSpec:
        if self.name == "sgd" and self.momentum is None:
            self.momentum = 0.9
        if self.name != "sgd" and self.momentum is not None:
            raise ValueError(f"momentum applies to sgd only, not {self.name}")
        return self


class DPSpec(StrictModel):
    """Differentially private training (DP-SGD with Opacus) for this round.

    The privacy unit is the subject (patient): each step samples subjects independently with
    probability ``sample_rate`` (Poisson sampling), draws ``subject_slices`` slices or patches
    from each sampled subject, and clips the gradient of each subject's loss (over its
    slices together) to ``max_grad_norm`` before Gaussian noise of standard deviation
    ``noise_multiplier * max_grad_norm`` is added. ``batch_size`` is then the expected number
    of slices per step, so the expected number of subjects per step is
    ``batch_size // subject_slices`` and one epoch is ``1 / sample_rate`` steps.

    Give either ``noise_multiplier`` or ``target_epsilon``: the ε this one round may cost at
    the site, from which the site derives the noise for the round's sample rate and steps
    (Opacus's ``get_noise_multiplier``, with the site's accountant). ``delta`` defaults to the
    site's budget δ for the dataset and may not exceed it. The site's ledger composes every
    round's cost; a round that would cross the dataset's budget is refused.
    """

    noise_multiplier: float | None = Field(default=None, gt=0, le=1000)
    target_epsilon: float | None = Field(default=None, gt=0, le=1000)
    max_grad_norm: float = Field(default=1.0, gt=0, le=1e6)
    delta: float | None = Field(default=None, gt=0, lt=1)
    subject_slices: int = Field(default=4, ge=1, le=4096)

    @model_validator(mode="after")
    def _one_noise(self) -> DPSpec:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        return self


class PrivacySpec(StrictModel):
    """Filters a coordinator asks for on top of the site's own egress settings.

    The site's configuration always applies; these can only make the update more private
    (more excluded parameters, a smaller clipping norm), never less. ``dp`` trains with
    DP-SGD (`DPSpec`); without it the round is not differentially private.
    """

    exclude_parameters: list[str] = Field(default_factory=list)
    clip_norm: float | None = Field(default=None, gt=0)
    dp: DPSpec | None = None


class AggregationSpec(StrictModel):
    """Secure aggregation (``agent.exchange.secagg``): the coordinator learns only the sum.

    Each site clamps every element of its update (the difference to the global weights) to
    ``[-clip, clip]``, multiplies it by its integer sample count (at most ``max_weight``),
    quantises it to integers modulo 2^32 and masks it; ``threshold`` sites must answer the
    unmasking step for the sum to be recovered. A site refuses a plan whose threshold is
    below its own minimum (`secure_aggregation.min_threshold`).
    """

    mode: Literal["secure"]
    threshold: int = Field(ge=2, le=65535)
    clip: float = Field(gt=0, le=1e6)
    max_weight: int = Field(ge=1, le=2**24)


class CompressionSpec(StrictModel):
    """The update sent compressed (``agent.exchange.compression``): the difference to the
    global weights as int8 (``scale`` per tensor or per output channel, ``rounding`` to
    nearest or stochastic), or only its ``topk_fraction`` largest values per tensor as int8,
    the rest kept at the site and added to the next round's difference (``int8_topk``).
    A site may forbid modes (`egress.forbid_compression`); it then sends the difference as
    ``transfer_dtype`` and says so in its audit log.
    """

    mode: Literal["int8", "int8_topk"]
    scale: Literal["tensor", "channel"] = "channel"
    rounding: Literal["deterministic", "stochastic"] = "deterministic"
    topk_fraction: float | None = Field(default=None, gt=0, le=1)

    @model_validator(mode="after")
    def _fraction(self) -> CompressionSpec:
        if self.mode == "int8_topk" and self.topk_fraction is None:
            raise ValueError("compression.mode 'int8_topk' needs topk_fraction (0 < f <= 1)")
        if self.mode == "int8" and self.topk_fraction is not None:
            raise ValueError("compression.topk_fraction applies to mode 'int8_topk' only")
        return self


class EarlyStopping(StrictModel):
    """Train epoch by epoch up to ``max_epochs``, evaluating on the validation split after each,
    stop after ``patience`` epochs without improvement, and return the best epoch's weights
    (institutional incremental learning). ``local_epochs`` is then not used."""

    patience: int = Field(ge=1, le=1000)
    max_epochs: int = Field(ge=1, le=MAX_EPOCHS)


# A plan's seed fits in a signed 32-bit integer, which every generator it seeds accepts.
MAX_SEED = 2**31 - 1


class Plan(StrictModel):
    dataset: str = Field(min_length=1, max_length=64)
    model: ModelSpec
    local_epochs: int = Field(ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(ge=1, le=4096)
    optimizer: OptimizerSpec
    loss: Literal["dice", "dice_ce", "log_dice"]
    round_id: str | None = Field(default=None, pattern=ROUND_ID_PATTERN)
    run_id: str | None = Field(default=None, pattern=ROUND_ID_PATTERN)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    init: Literal["global", "random"] = "global"
    fedprox_mu: float = Field(default=0.0, ge=0)
    send: Literal["weights", "diff"] = "weights"
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    transfer_dtype: Literal["float32", "float16"] = "float32"
    data: DataSettings = Field(default_factory=DataSettings)
    early_stopping: EarlyStopping | None = None
    # None: the coordinator averages the updates it receives (plain FedAvg).
    aggregation: AggregationSpec | None = None
    # None: the update travels as transfer_dtype.
    compression: CompressionSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, data: Any) -> Any:
        """Every number finite, model arguments included: JSON's 1e999 parses as infinity,
        which pydantic would accept and then write back as null (the worker's copy)."""
        found = non_finite(data)
        if found is not None:
            raise ValueError(_not_finite(*found))
        return data

    @field_validator("model")
    @classmethod
    def _model_known(cls, spec: ModelSpec) -> ModelSpec:
        check_arguments(spec.name, spec.arguments())
        return spec

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        spec = self.model
        dims = spec.argument("spatial_dims")
        if dims != self.data.spatial_dims:
            raise ValueError(
                f"model.spatial_dims is {dims} but data.spatial_dims is {self.data.spatial_dims}"
            )
        if len(self.data.roi_size) != dims:
            raise ValueError(f"data.roi_size {self.data.roi_size} must have {dims} entries")
        if spec.argument("out_channels") != 1:
            raise ValueError(
                "model.out_channels must be 1: the target is binary (one sigmoid output channel)"
            )
        in_channels = spec.argument("in_channels")
        if self.data.modalities is not None and len(self.data.modalities) != in_channels:
            raise ValueError(
                f"model.in_channels is {in_channels} but data.modalities lists {len(self.data.modalities)}"
            )
        values = self.batch_size * in_channels * math.prod(self.data.roi_size)
        if values > MAX_BATCH_VALUES:
            raise ValueError(
                f"a batch of batch_size {self.batch_size} x {in_channels} channel(s) x roi_size "
                f"{self.data.roi_size} is {values} values; at most {MAX_BATCH_VALUES} fit "
                "(lower batch_size or roi_size)"
            )
        dp = self.privacy.dp
        if dp is not None and self.early_stopping is not None:
            raise ValueError("privacy.dp: early_stopping cannot be combined with DP training")
        if dp is not None and self.fedprox_mu > 0:
            raise ValueError("privacy.dp: fedprox_mu cannot be combined with DP training")
        if dp is not None and dp.subject_slices > self.batch_size:
            raise ValueError(
                f"privacy.dp.subject_slices ({dp.subject_slices}) cannot exceed "
                f"batch_size ({self.batch_size})"
            )
        if self.send == "diff" and self.init == "random":
            raise ValueError("send 'diff' needs init 'global': a difference to random weights means nothing")
        if self.aggregation is not None:
            if self.send != "diff":
                raise ValueError(
                    "aggregation.mode 'secure' needs send 'diff': what is masked is the update's "
                    "difference to the global weights, clamped to [-clip, clip]"
                )
            if self.early_stopping is not None:
                raise ValueError(
                    "aggregation.mode 'secure' is for rounds of averaged updates, not early_stopping"
                )
        if self.compression is not None:
            if self.send != "diff":
                raise ValueError(
                    "compression needs send 'diff': what is compressed is the round's difference to the "
                    "global weights"
                )
            if self.aggregation is not None:
                raise ValueError(
                    "compression and aggregation.mode 'secure' exclude each other: secure aggregation "
                    "quantises the update itself"
                )
        # Two samples: batch-norm refuses a batch of one sample with one voxel per channel in
        # training, which a real batch would pass.
        batch = min(self.batch_size, 2)
        validate_model(spec.name, spec.arguments(), (batch, in_channels, *self.data.roi_size))
        return self


_TOO_DEEP = f"plan: JSON nested more than {MAX_PLAN_DEPTH} levels deep; a plan needs far fewer"


def non_finite(value: Any) -> tuple[str, float] | None:
    """The key path and value of the first NaN or infinite number in VALUE, else None.

    Counted without recursion, like `json_depth`. The path reads like the validation
    errors' (`optimizer.lr`, `model.channels[1]`).
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path, item
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(item))))
    return None


def _not_finite(path: str, value: float) -> str:
    return f"{path or '(top level)'}: {value} is not a finite number; every number in a plan must be finite"


def json_depth(value: Any) -> int:
    """How deeply VALUE nests dicts and lists (a scalar is 0), counted without recursion, so
    that a hostile document cannot exhaust the stack while it is measured."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if depth > MAX_PLAN_DEPTH:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth) for child in children)
    return deepest


def _load_json(text: str) -> Any:
    """Parse plan text; every way JSON can be unusable becomes a PlanError that says which.

    Besides malformed text, Python's parser raises two errors of its own on hostile input: a
    `RecursionError` for deep nesting and a `ValueError` for an integer longer than the
    interpreter's int-string limit (4,300 digits by default); both are the caller's mistake.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"plan: not valid JSON: {exc}") from None
    except RecursionError:
        raise PlanError(_TOO_DEEP) from None
    except ValueError as exc:  # the int-string limit; no other ValueError is known to arise
        why = f"a number has more than {sys.get_int_max_str_digits()} digits" if "digits" in str(exc) else exc
        raise PlanError(f"plan: not valid JSON: {why}") from None


def parse_plan(raw: Any) -> Plan:
    """Validate a plan given as JSON text, bytes or an already-parsed mapping."""
    if isinstance(raw, bytes | bytearray):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PlanError("plan: not UTF-8 text") from None
    if isinstance(raw, str):
        raw = _load_json(raw)
    if not isinstance(raw, dict):
        raise PlanError(f"plan: must be a JSON object, got {type(raw).__name__}")
    if json_depth(raw) > MAX_PLAN_DEPTH:
        raise PlanError(_TOO_DEEP)
    found = non_finite(raw)
    if found is not None:  # also refused by the model; here to name the key in the same words
        raise PlanError(_not_finite(*found))
    try:
        return Plan.model_validate(raw)
    except ValidationError as exc:
        raise PlanError(format_validation_error(exc, top="plan")) from None


def stored_form(plan: Plan) -> str:
    """The JSON the worker will read the plan back from, checked to read back as the same plan.

    What the worker would refuse must be refused at submission: a plan that does not survive
    its own serialisation (a value that JSON cannot carry) is a PlanError here, not a failed
    round later.
    """
    text = plan.model_dump_json()
    if load_stored_plan(text) != plan:
        raise PlanError("plan: does not read back unchanged from its stored form")
    return text


def load_stored_plan(text: str) -> Plan:
    """The plan of a queued job, as the worker reads it; a PlanError of one line if it is invalid
    (the dataset's models or the registry changed since it was submitted, say)."""
    try:
        return Plan.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(format_validation_error(exc, top="plan").splitlines())
        raise PlanError(f"the stored plan is no longer valid: {problems}") from None


def check_channels(plan: Plan, dataset_modalities: Sequence[str]) -> None:
    """That the plan's input channels are modalities the dataset has, as many as the model takes.

    DATASET_MODALITIES are those every subject of the dataset has, in config order; without
    `data.modalities` the plan trains on all of them. A PlanError names the key to change.
    """
    have = ", ".join(repr(m) for m in dataset_modalities) or "none"
    wanted = plan.data.modalities
    if wanted is not None:
        missing = [m for m in wanted if m not in dataset_modalities]
        if missing:
            raise PlanError(
                f"data.modalities: dataset {plan.dataset!r} has no modality {missing[0]!r} (it has {have})"
            )
        return  # the model validator has matched their number to model.in_channels
    in_channels = plan.model.argument("in_channels")
    if in_channels != len(dataset_modalities):
        raise PlanError(
            f"model.in_channels: is {in_channels} but dataset {plan.dataset!r} gives "
            f"{len(dataset_modalities)} channel(s) ({have}); set in_channels or choose data.modalities"
        )


# Keys added to plans after sites began approving them by hash, dropped from the canonical
# JSON while they are None (dotted paths), so that a plan without them keeps its old hash.
_OPTIONAL_ADDITIONS: tuple[str, ...] = ("aggregation", "privacy.dp", "compression")


def canonical_json(plan: Plan) -> str:
    body = plan.model_dump(mode="json", exclude={"round_id", "run_id"})
    for dotted in _OPTIONAL_ADDITIONS:
        *parents, leaf = dotted.split(".")
        node: Any = body
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] is None:
            del node[leaf]
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def plan_hash(plan: Plan) -> str:
    return hashlib.sha256(canonical_json(plan).encode()).hexdigest()


def check_round(plan: Plan) -> None:
    """Refuse, with PlanError, what PLAN lacks as a training round though the coordinator's
    template of it may: the run the round belongs to, where it keeps state between rounds."""
    if plan.optimizer.keep_state and plan.run_id is None:
        raise PlanError(
            "optimizer.keep_state needs run_id (the coordinator's run, which the coordinator "
            "sets): kept state is restored only in a later round of the run that saved it"
        )


def job_plan(plan: Mapping[str, Any], round_id: str, run_id: str) -> dict[str, Any]:
    """PLAN (JSON) as the job ROUND_ID of the coordinator's run RUN_ID. ``run_id`` goes only into
    a plan that keeps state between rounds (``optimizer.keep_state``), the one thing it scopes:
    an agent older than ``run_id`` then still takes every other plan, where an unknown key
    would be refused."""
    job = {**plan, "round_id": round_id}
    job.pop("run_id", None)
    optimizer = plan.get("optimizer")
    if isinstance(optimizer, Mapping) and optimizer.get("keep_state"):
        job["run_id"] = run_id
    return job
