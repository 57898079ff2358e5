"""DP-SGD in the engine (in process, tiny models): batch norm converted or refused, the noise a
target ε asks for, the step counter, and the membership-inference check on an overfit
non-private model and on a DP model at ε ≤ 1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.validators import ModuleValidator

from agent.errors import ModelError
from agent.privacy.mia import membership_report
from agent.training import dp as dp_sgd
from agent.training.engine import train_round
from agent.training.plan import parse_plan
from agent.training.registry import expected_shapes
from tests.fixtures.training import context, initial_weights, make_blob_items, make_items, tiny_plan_dict


def _dp(**spec: object) -> dict[str, object]:
    return {"dp": {"max_grad_norm": 1.0, "subject_slices": 4, **spec}}


def test_batch_norm_network_is_converted_and_its_statistics_stay(tmp_path: Path) -> None:
    plan = parse_plan(tiny_plan_dict(privacy=_dp(noise_multiplier=1.0)))  # norm: batch
    assert ModuleValidator.validate(dp_sgd.dp_model(torch.nn.BatchNorm2d(4), "x"), strict=False) == []
    train, val = make_blob_items(tmp_path / "data", train=4, val=1)
    start = initial_weights(plan)
    result = train_round(plan, start, train, val, context(tmp_path, dp_seed=1))
    assert set(result.update) == set(expected_shapes(plan))
    stats = [n for n in result.update if n.endswith(("running_mean", "running_var"))]
    assert stats, "the plan's model has batch norm"
    for name in stats:  # computed from the data without noise: never updated under DP
        assert torch.equal(result.update[name], start[name])
    changed = [
        n for n in result.update if n.endswith(".weight") and not torch.equal(result.update[n], start[n])
    ]
    assert changed
    assert result.metrics["dp_steps"] == dp_sgd.read_steps(tmp_path / "rounds" / "round") > 0


def test_network_opacus_cannot_convert_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = parse_plan(tiny_plan_dict(privacy=_dp(noise_multiplier=1.0)))

    def cannot(_model: torch.nn.Module) -> torch.nn.Module:
        raise ValueError("num_channels must be divisible by num_groups")

    monkeypatch.setattr(ModuleValidator, "fix", cannot)
    with pytest.raises(ModelError) as err:
        dp_sgd.check_plan_model(plan)
    text = str(err.value)
    assert "privacy.dp: model 'unet' cannot train with DP (BatchNorm cannot support" in text
    assert "Opacus cannot convert it (ValueError: num_channels must be divisible" in text
    assert "choose a model with instance or group norm" in text


def test_target_epsilon_gives_the_noise_for_this_round_and_opacus_agrees() -> None:
    plan = parse_plan(tiny_plan_dict(local_epochs=3, privacy=_dp(target_epsilon=2.0)))
    dpr = dp_sgd.resolve(plan, 10, delta=1e-5, accountant="rdp")
    # batch 8 / 4 slices = 2 subjects of 10 per step; an epoch is 5 steps.
    assert (dpr.sample_rate, dpr.steps) == (0.2, 15)
    acc = RDPAccountant()
    for _ in range(dpr.steps):
        acc.step(noise_multiplier=dpr.noise_multiplier, sample_rate=dpr.sample_rate)
    eps = acc.get_epsilon(delta=1e-5)
    assert 1.95 < eps <= 2.0
    history = [(dpr.noise_multiplier, dpr.sample_rate, dpr.steps)]
    assert dp_sgd.epsilon(history, 1e-5, "rdp") == pytest.approx(eps, abs=1e-6)


def _mia_auc(tmp_path: Path, privacy: dict[str, object] | None) -> tuple[float, float, float]:
    """Loss-attack AUC (and its 95% interval) of a 2D U-Net trained 20 epochs on 8 subjects,
    attacked with those 8 against 8 held-out subjects."""
    d = tiny_plan_dict(local_epochs=20, optimizer={"name": "adam", "lr": 0.01}, batch_size=16)
    d["model"].update({"norm": "instance", "channels": [16, 32, 64]})
    d["data"]["samples_per_subject"] = 16
    if privacy is not None:
        d["privacy"] = privacy
    plan = parse_plan(d)
    members, nonmembers = make_items(tmp_path / "data", train=8, val=8)
    start = initial_weights(plan)
    result = train_round(plan, start, members, [], context(tmp_path, dp_seed=7))
    [loss] = membership_report(
        plan, result.update, members, nonmembers, cache_dir=tmp_path / "cache", bootstrap=500, seed=0
    )
    assert 0.0 <= loss.tpr_at_5_fpr <= loss.tpr_at_10_fpr <= 1.0
    return loss.auc, loss.auc_low, loss.auc_high


def test_mia_finds_the_members_of_an_overfit_non_private_model(tmp_path: Path) -> None:
    auc, low, _ = _mia_auc(tmp_path, None)
    assert auc > 0.9 and low > 0.5


def test_mia_cannot_tell_members_of_a_dp_model_at_epsilon_1(tmp_path: Path) -> None:
    auc, low, high = _mia_auc(tmp_path, _dp(target_epsilon=1.0))
    assert low <= 0.5 <= high, (auc, low, high)


def test_a_resumed_round_never_takes_more_steps_than_were_reserved(tmp_path: Path) -> None:
    plan = parse_plan(tiny_plan_dict(local_epochs=2, privacy=_dp(noise_multiplier=1.0)))
    train, _ = make_blob_items(tmp_path / "data", train=4, val=0)
    reserved = dp_sgd.resolve(plan, len(train), delta=1e-5, accountant="rdp")
    assert reserved.steps == 4  # 2 of 4 subjects per step: 2 steps per epoch
    ctx = context(tmp_path, dp=reserved, dp_seed=3)
    ctx.work_dir.mkdir(parents=True)
    # An earlier attempt of this round took 3 noisy steps before the agent stopped.
    (ctx.work_dir / dp_sgd.STEPS_FILE).write_text('{"steps": 3}')
    result = train_round(plan, initial_weights(plan), train, [], ctx)
    assert result.metrics["dp_steps"] == 4.0
    assert dp_sgd.read_steps(ctx.work_dir) == 4


def test_every_noise_draw_is_made_in_opacus_secure_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One Gaussian draw per value leaks, through the floating-point values it can take, the
    value the noise was added to; the secure mode sums four draws. The draws themselves are
    Opacus's: this checks that every one of the round's noise additions asks for that mode."""
    from opacus.optimizers import optimizer as opacus_optimizer

    real = opacus_optimizer._generate_noise
    modes: list[bool] = []

    def recorded(*args: object, **kwargs: object) -> torch.Tensor:
        modes.append(bool(kwargs.get("secure_mode")))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", recorded)
    plan = parse_plan(tiny_plan_dict(privacy=_dp(noise_multiplier=1.0)))
    train, _ = make_blob_items(tmp_path / "data", train=4, val=0)
    result = train_round(plan, initial_weights(plan), train, [], context(tmp_path, dp_seed=5))
    steps = int(result.metrics["dp_steps"])
    assert steps > 0 and len(modes) >= steps, (steps, len(modes))  # a draw per tensor and step
    assert all(modes), modes
