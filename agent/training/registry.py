"""The architectures a site can train: MONAI networks, named in the plan, never code.

A plan names a model (``unet``, ``basic_unet``, ``segresnet``) and gives exactly the
constructor arguments of its MONAI class. Arguments are checked against the constructor's
signature, then the model is built on PyTorch's ``meta`` device (no memory, no compute)
and run once on a meta input of the plan's patch size, so that impossible combinations
(strides that do not divide the patch, channel counts that do not fit a norm's groups)
are refused when the plan arrives rather than hours into a round.

What is exchanged: every floating-point entry of the model's ``state_dict`` — parameters
and floating buffers (batch-norm running mean and variance), because a model with
batch-norm is not the same model without its statistics. Integer bookkeeping buffers
(batch-norm's ``num_batches_tracked``) stay local: they do not change predictions when
the norm has a momentum, and integers have no meaning in a weighted average.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from monai.networks.nets import BasicUNet, SegResNet, UNet
from torch import nn

from agent.errors import ModelError

if TYPE_CHECKING:
    from agent.training.plan import Plan

# Refuse plans whose model would not fit a site's machine (and a hostile plan's 10^12
# parameters); counted on the meta device, so checking costs nothing.
MAX_PARAMETERS = 500_000_000


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cls: type[nn.Module]
    description: str


REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry("unet", UNet, "monai.networks.nets.UNet (2D or 3D residual U-Net)"),
        ModelEntry("basic_unet", BasicUNet, "monai.networks.nets.BasicUNet (2D or 3D)"),
        ModelEntry("segresnet", SegResNet, "monai.networks.nets.SegResNet (2D or 3D)"),
    )
}


def known_models() -> list[str]:
    return sorted(REGISTRY)


def model_entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(known_models())}") from None


def check_arguments(name: str, args: Mapping[str, Any]) -> None:
    """Exactly the constructor's keyword arguments: no unknown ones, every required one."""
    entry = model_entry(name)
    params = inspect.signature(entry.cls.__init__).parameters
    accepted = {
        p.name
        for p in params.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    for key in args:
        if key not in accepted:
            raise ModelError(
                f"model {name!r}: unknown argument {key!r}; "
                f"{entry.cls.__name__} accepts {', '.join(sorted(accepted))}"
            )
    for p in params.values():
        if p.name in accepted and p.default is inspect.Parameter.empty and p.name not in args:
            raise ModelError(f"model {name!r}: missing required argument {p.name!r}")


def _instantiate(name: str, args: Mapping[str, Any]) -> nn.Module:
    entry = model_entry(name)
    try:
        return entry.cls(**dict(args))
    except Exception as exc:
        raise ModelError(f"model {name!r}: invalid arguments: {type(exc).__name__}: {exc}") from None


def validate_model(name: str, args: Mapping[str, Any], input_shape: Sequence[int] | None = None) -> None:
    """Check the arguments, build on the meta device, optionally run one meta forward pass.

    A model that passed is remembered (by name, arguments and input shape; the check depends on
    nothing else): every plan is validated where it is received, again when the agent reads
    back what it stored, and in the worker, and building a U-Net and running it on the meta
    device was a quarter of an agent's CPU per round of a small model (benchmarks/fanout.py).
    A model that failed is checked again each time and fails the same way."""
    key = (name, repr(sorted(args.items())), None if input_shape is None else tuple(input_shape))
    with _VALIDATED_LOCK:
        if key in _VALIDATED:
            _VALIDATED.move_to_end(key)
            return
    _check_model(name, args, input_shape)
    with _VALIDATED_LOCK:
        _VALIDATED[key] = None
        while len(_VALIDATED) > VALIDATED_KEEP:
            _VALIDATED.popitem(last=False)


# The models that passed `validate_model` in this process, least recently used first.
VALIDATED_KEEP = 64
_VALIDATED: OrderedDict[tuple[str, str, tuple[int, ...] | None], None] = OrderedDict()
_VALIDATED_LOCK = threading.Lock()


def _check_model(name: str, args: Mapping[str, Any], input_shape: Sequence[int] | None) -> None:
    check_arguments(name, args)
    with torch.device("meta"):
        model = _instantiate(name, args)
        count = sum(p.numel() for p in model.parameters())
        if count > MAX_PARAMETERS:
            raise ModelError(f"model {name!r}: {count} parameters, over the limit of {MAX_PARAMETERS}")
        if input_shape is not None:
            try:
                out = model(torch.zeros(*input_shape))
            except Exception as exc:
                raise ModelError(
                    f"model {name!r} cannot process inputs of shape {list(input_shape)}: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            if not isinstance(out, torch.Tensor) or tuple(out.shape[2:]) != tuple(input_shape[2:]):
                shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ModelError(
                    f"model {name!r}: output {shape} does not match "
                    f"the input's spatial size {list(input_shape[2:])}"
                )


# Prior probability of foreground that the output bias starts at (Lin et al., "Focal loss",
# 2017). Lesions are about 1% of voxels; MONAI's default initialisation predicts about half
# the image as foreground, and Adam then needs hundreds of steps just to move the output
# bias, so a Dice loss barely learns in the few steps a federated round has.
FOREGROUND_PRIOR = 0.01


def init_output_bias(model: nn.Module, out_channels: int, prior: float = FOREGROUND_PRIOR) -> None:
    """Start the last convolution producing the output channels at logit(prior)."""
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    last = None
    for module in model.modules():
        if isinstance(module, convs) and module.out_channels == out_channels and module.bias is not None:
            last = module
    if last is not None and last.bias is not None:
        with torch.no_grad():
            last.bias.fill_(math.log(prior / (1.0 - prior)))


def build_model(plan: Plan) -> nn.Module:
    """The plan's model on the CPU, initialised from the global torch RNG (seed it first).

    The output bias starts at the foreground prior (see `init_output_bias`); the rest is
    MONAI's own initialisation.
    """
    args = plan.model.arguments()
    model = _instantiate(plan.model.name, args)
    init_output_bias(model, int(args.get("out_channels", 1)))
    return model


def exchanged_names(model: nn.Module) -> list[str]:
    """The state-dict entries that travel: all floating-point parameters and buffers."""
    return [name for name, t in model.state_dict().items() if t.is_floating_point()]


def exchanged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached float32 CPU copy of the exchanged entries."""
    state = model.state_dict()
    return {
        name: state[name].detach().to(device="cpu", dtype=torch.float32).clone()
        for name in exchanged_names(model)
    }


@functools.lru_cache(maxsize=64)
def _shapes(name: str, args_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = _instantiate(name, json.loads(args_json))
    state = model.state_dict()
    return tuple((n, tuple(state[n].shape)) for n in exchanged_names(model))


def expected_shapes(plan: Plan) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the tensors exchanged for the plan's model (see the module docstring).

    Cached per model (name and arguments): a round asks several times (decode, engine, gate).
    """
    return dict(_shapes(plan.model.name, json.dumps(plan.model.arguments(), sort_keys=True)))
