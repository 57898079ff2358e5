"""Plans: every key validated, errors name the key, the registry decides the model."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from agent.errors import PlanError
from agent.training import registry
from agent.training.plan import (
    MAX_BATCH_VALUES,
    Plan,
    check_channels,
    check_round,
    job_plan,
    load_stored_plan,
    parse_plan,
    plan_hash,
    stored_form,
)
from agent.training.registry import build_model, expected_shapes, known_models
from tests.fixtures.training import tiny_plan, tiny_plan_dict


def _refused(raw: object) -> str:
    with pytest.raises(PlanError) as info:
        parse_plan(raw)
    return str(info.value)


def test_unknown_model_is_refused_listing_the_known_ones() -> None:
    raw = tiny_plan_dict()
    raw["model"]["name"] = "resnet_from_coordinator"
    msg = _refused(raw)
    assert msg.startswith("model:")
    assert "'resnet_from_coordinator'" in msg
    for name in known_models():
        assert name in msg


def test_unknown_model_argument_is_refused_naming_it() -> None:
    raw = tiny_plan_dict()
    raw["model"]["chanels"] = [8, 16]
    msg = _refused(raw)
    assert msg.startswith("model:") and "unknown argument 'chanels'" in msg


def test_missing_required_model_argument_is_refused_naming_it() -> None:
    raw = tiny_plan_dict()
    del raw["model"]["strides"]
    assert "missing required argument 'strides'" in _refused(raw)


def test_impossible_model_is_refused_naming_the_model() -> None:
    raw = tiny_plan_dict()
    raw["model"]["strides"] = [2]  # one stride for three channel levels
    assert "model 'unet'" in _refused(raw)
    raw = tiny_plan_dict(data={"spatial_dims": 2, "roi_size": [30, 30]})
    msg = _refused(raw)
    assert "model 'unet' cannot process inputs of shape [2, 1, 30, 30]" in msg


@pytest.mark.parametrize("key", ["dataset", "model", "local_epochs", "batch_size", "optimizer", "loss"])
def test_missing_required_key_is_refused_naming_it(key: str) -> None:
    raw = tiny_plan_dict()
    del raw[key]
    assert f"{key}: required key is missing" in _refused(raw)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("optimizer", "lr"), -1, "optimizer.lr:"),
        (("optimizer", "name"), "lbfgs", "optimizer.name:"),
        (("optimizer", "momentum"), 0.9, "momentum applies to sgd only"),
        (("loss",), "focal", "loss:"),
        (("local_epochs",), 0, "local_epochs:"),
        (("send",), "everything", "send:"),
        (("round_id",), "../../etc/passwd", "round_id:"),
        (("run_id",), "run/../x", "run_id:"),
        (("privacy", "noise"), 1.0, "privacy.noise: unknown key"),
        (("data", "roi_size"), [32, 32, 32], "roi_size has 3 values"),
        (("early_stopping",), {"patience": 0, "max_epochs": 3}, "early_stopping.patience:"),
        (("surprise",), 1, "surprise: unknown key"),
    ],
)
def test_bad_values_name_the_key(path: tuple[str, ...], value: object, expected: str) -> None:
    raw = tiny_plan_dict()
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    assert expected in _refused(raw)


def test_cross_checks_name_both_keys() -> None:
    raw = tiny_plan_dict()
    raw["model"]["out_channels"] = 2
    assert "model.out_channels must be 1" in _refused(raw)
    raw = tiny_plan_dict(data={"spatial_dims": 3, "roi_size": [32, 32, 32]})
    assert "model.spatial_dims is 2 but data.spatial_dims is 3" in _refused(raw)
    raw = tiny_plan_dict(init="random", send="diff")
    assert "send 'diff' needs init 'global'" in _refused(raw)
    raw = tiny_plan_dict(data={"spatial_dims": 2, "roi_size": [32, 32], "modalities": ["flair", "t1"]})
    assert "model.in_channels is 1 but data.modalities lists 2" in _refused(raw)


def test_plan_text_errors() -> None:
    assert "not valid JSON" in _refused("{")
    assert "must be a JSON object" in _refused("[1]")
    assert "not UTF-8" in _refused(b"\xff\xfe")


def test_hash_ignores_round_id_run_id_and_key_order_but_not_content() -> None:
    raw = tiny_plan_dict(round_id="r-1", run_id="run-1")
    reordered = json.loads(json.dumps(dict(reversed(list(raw.items())))))
    reordered["round_id"] = "r-2"
    del reordered["run_id"]
    assert plan_hash(parse_plan(raw)) == plan_hash(parse_plan(json.dumps(reordered)))
    # Defaults are part of the hash: spelling one out changes nothing.
    assert plan_hash(parse_plan(raw)) == plan_hash(parse_plan({**raw, "seed": raw["seed"], "init": "global"}))
    assert plan_hash(parse_plan(raw)) != plan_hash(parse_plan({**raw, "seed": 4}))
    assert len(plan_hash(parse_plan(raw))) == 64


@pytest.mark.parametrize(
    "model",
    [
        {
            "name": "unet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 1,
            "channels": [4, 8],
            "strides": [2],
        },
        {
            "name": "basic_unet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 1,
            "features": [4, 4, 8, 8, 16, 4],
        },
        {"name": "segresnet", "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "init_filters": 8},
    ],
    ids=["unet3d", "basic_unet", "segresnet"],
)
def test_registry_models_build_and_expected_shapes_match_the_state_dict(model: dict) -> None:
    plan = tiny_plan(model=model, data={"spatial_dims": 3, "roi_size": [32, 32, 32]})
    shapes = expected_shapes(plan)
    net = build_model(plan)
    state = net.state_dict()
    floats = {n: tuple(t.shape) for n, t in state.items() if t.is_floating_point()}
    assert shapes == floats
    assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)


def test_batch_norm_buffers_are_exchanged_but_counters_are_not() -> None:
    shapes = expected_shapes(tiny_plan())
    assert any(n.endswith("running_mean") for n in shapes)
    assert not any(n.endswith("num_batches_tracked") for n in shapes)


@pytest.mark.parametrize(
    "model",
    [
        {
            "name": "unet",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 1,
            "channels": [8, 16, 32],
            "strides": [2, 2],
            "num_res_units": 1,
        },
        {
            "name": "unet",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 1,
            "channels": [8, 16, 32],
            "strides": [2, 2],
            "num_res_units": 0,
        },
        {
            "name": "basic_unet",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 1,
            "features": [4, 4, 8, 8, 16, 4],
        },
        {"name": "segresnet", "spatial_dims": 2, "in_channels": 1, "out_channels": 1, "init_filters": 8},
    ],
    ids=["unet_res", "unet_plain", "basic_unet", "segresnet"],
)
def test_a_new_model_starts_by_predicting_background(model: dict) -> None:
    # MONAI's own initialisation predicts about half of each image as foreground; a Dice
    # loss then spends the first hundreds of steps moving the output bias.
    torch.manual_seed(0)
    net = build_model(tiny_plan(model=model, data={"spatial_dims": 2, "roi_size": [32, 32]}))
    with torch.no_grad():
        positive = (net(torch.randn(4, 1, 32, 32)) > 0).float().mean().item()
    assert positive < 0.05


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('"fedprox_mu": 1e999', "fedprox_mu: inf is not a finite number"),
        ('"fedprox_mu": -1e999', "fedprox_mu: -inf is not a finite number"),
        ('"fedprox_mu": NaN', "fedprox_mu: nan is not a finite number"),
        ('"optimizer": {"name": "adam", "lr": Infinity}', "optimizer.lr: inf is not a finite number"),
        ('"privacy": {"clip_norm": 1e400}', "privacy.clip_norm: inf"),
        ('"early_stopping": {"patience": 2, "max_epochs": 1e999}', "early_stopping.max_epochs: inf"),
    ],
)
def test_non_finite_numbers_are_refused_anywhere_naming_the_key(text: str, expected: str) -> None:
    body = json.dumps(tiny_plan_dict())
    key = text.split(":", 1)[0]
    raw = json.loads(body)
    raw.pop(key.strip('"'), None)
    plan_text = json.dumps(raw)[:-1] + ", " + text + "}"
    assert expected in _refused(plan_text)


def test_non_finite_numbers_inside_model_arguments_and_lists_are_refused() -> None:
    raw = tiny_plan_dict()
    raw["model"]["dropout"] = float("nan")
    assert "model.dropout: nan is not a finite number" in _refused(raw)
    raw = tiny_plan_dict()
    raw["data"]["spacing"] = [1.0, float("inf"), 1.0]
    assert "data.spacing[1]: inf is not a finite number" in _refused(raw)
    # The model itself refuses them too, for plans built without parse_plan.
    raw = tiny_plan_dict(fedprox_mu=float("inf"))
    with pytest.raises(ValueError, match=re.escape("fedprox_mu: inf is not a finite number")):
        Plan.model_validate(raw)


def test_a_batch_that_cannot_fit_is_refused() -> None:
    raw = tiny_plan_dict(batch_size=4096, data={"spatial_dims": 2, "roi_size": [4096, 4096]})
    msg = _refused(raw)
    assert f"is {4096**3} values; at most {MAX_BATCH_VALUES} fit" in msg
    assert "\n" not in msg


def test_the_stored_form_reads_back_as_the_same_plan_and_a_bad_one_is_one_line() -> None:
    plan = tiny_plan(fedprox_mu=0.01, round_id="r-1")
    assert load_stored_plan(stored_form(plan)) == plan
    broken = json.loads(stored_form(plan))
    broken["fedprox_mu"] = None  # what 1e999 became once stored, before plans refused it
    broken["optimizer"]["lr"] = None
    with pytest.raises(PlanError) as info:
        load_stored_plan(json.dumps(broken))
    message = str(info.value)
    assert message.startswith("the stored plan is no longer valid: ")
    assert "optimizer.lr:" in message and "fedprox_mu:" in message
    assert "\n" not in message and "pydantic" not in message


def test_channels_must_be_modalities_the_dataset_has() -> None:
    check_channels(tiny_plan(), ["flair"])
    with pytest.raises(
        PlanError, match=re.escape("data.modalities: dataset 'brain' has no modality 't1' (it has 'flair')")
    ):
        check_channels(
            tiny_plan(data={"spatial_dims": 2, "roi_size": [32, 32], "modalities": ["t1"]}), ["flair"]
        )
    with pytest.raises(
        PlanError, match=re.escape("model.in_channels: is 1 but dataset 'brain' gives 2 channel")
    ):
        check_channels(tiny_plan(), ["flair", "t1"])


def test_a_model_that_passed_is_not_built_again_and_one_that_failed_always_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every plan is validated where it arrives, where it is read back and in the worker: the
    model check (a build and a meta-device forward pass) runs once per distinct model."""
    checked: list[str] = []
    real = registry._check_model

    def counting(name: str, args: Mapping[str, Any], shape: Sequence[int] | None) -> None:
        checked.append(json.dumps(dict(args), sort_keys=True))
        real(name, args, shape)

    monkeypatch.setattr(registry, "_check_model", counting)
    monkeypatch.setattr(registry, "_VALIDATED", OrderedDict())
    plan = tiny_plan_dict()
    parse_plan(json.dumps(plan))
    parse_plan(json.dumps(plan | {"local_epochs": 3}))  # another plan, the same model
    assert len(checked) == 1
    wider = json.loads(json.dumps(plan))
    wider["model"]["channels"] = [8, 16, 64]
    parse_plan(json.dumps(wider))
    assert len(checked) == 2

    broken = json.loads(json.dumps(plan))
    broken["model"]["strides"] = [2]  # one stride for three channel levels
    for _ in range(2):
        with pytest.raises(PlanError, match="model"):
            parse_plan(json.dumps(broken))
    assert len(checked) == 4


def test_job_plan_names_the_run_only_where_the_plan_keeps_state_between_rounds() -> None:
    """An agent older than run_id refuses it as an unknown key: it goes only where it scopes
    something, and the coordinator's names replace any the plan brought."""
    plain = tiny_plan_dict(round_id="theirs", run_id="theirs")
    assert job_plan(plain, "run-7-r001-a", "run-7") == {
        **tiny_plan_dict(),
        "round_id": "run-7-r001-a",
    }
    keep = tiny_plan_dict(optimizer={"name": "adam", "lr": 0.01, "keep_state": True})
    job = job_plan(keep, "run-7-r001-a", "run-7")
    assert (job["round_id"], job["run_id"]) == ("run-7-r001-a", "run-7")
    assert parse_plan(job).run_id == "run-7"
    assert "run_id" not in keep


def test_a_round_that_keeps_optimizer_state_needs_its_run() -> None:
    """The coordinator's template may lack run_id (the coordinator sets it per job); a round may not."""
    template = parse_plan(tiny_plan_dict(optimizer={"name": "adam", "lr": 0.01, "keep_state": True}))
    with pytest.raises(PlanError, match=r"optimizer\.keep_state needs run_id"):
        check_round(template)
    check_round(template.model_copy(update={"run_id": "run-1"}))
    check_round(parse_plan(tiny_plan_dict()))
