"""The local engine: strict weights, reproducible updates, real learning, checkpoints, cancel."""

from __future__ import annotations

import io
import logging
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from agent.errors import EngineError, TrainingCancelled, WeightError
from agent.exchange.codec import decode_weights, encode_weights
from agent.training import engine as engine_module
from agent.training.checkpoint import read_state_metadata
from agent.training.engine import AUTO_LOADER_THREADS, CHECKPOINT_NAME, evaluate, loader_threads, train_round
from agent.training.registry import exchanged_state, expected_shapes
from tests.fixtures.training import (
    context,
    initial_weights,
    make_blob_items,
    make_items,
    smallest_unet,
    tiny_plan,
)

LIMIT = 1 << 26


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list]:
    return make_items(tmp_path_factory.mktemp("site"), train=3, val=2)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


class _Recorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def _bad_weights() -> list[tuple[str, Any, str]]:
    plan = tiny_plan()
    good = initial_weights(plan)
    name = next(iter(good))
    shape = dict(good)
    shape[name] = torch.zeros(*good[name].shape[:-1], good[name].shape[-1] + 1)
    missing = dict(good)
    del missing[name]
    extra = {**good, "backdoor.weight": torch.zeros(3)}
    nan = {n: t.clone() for n, t in good.items()}
    nan[name].view(-1)[0] = float("nan")
    buf = io.BytesIO()
    torch.save(good, buf)
    return [
        ("wrong shape", shape, f"tensor '{name}': shape"),
        ("missing name", missing, f"missing tensors: '{name}'"),
        ("extra name", extra, "unknown tensors not in the plan's model: 'backdoor.weight'"),
        ("NaN", nan, f"tensor '{name}': contains NaN or Inf"),
        ("pickle renamed .safetensors", buf.getvalue(), "zip archive"),
        ("plain pickle", pickle.dumps({n: t.numpy() for n, t in good.items()}), "pickle"),
    ]


@pytest.mark.parametrize(
    ("case", "weights", "message"), _bad_weights(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_bad_global_weights_are_refused_and_nothing_trains(
    tmp_path: Path, items: tuple[list, list], case: str, weights: Any, message: str
) -> None:
    plan = tiny_plan()
    progress = _Recorder()
    ctx = context(tmp_path, progress=progress)
    with pytest.raises(WeightError, match=message.replace("[", r"\[")):
        if isinstance(weights, bytes):
            # As the service receives them: a file upload named weights.safetensors.
            (tmp_path / "weights.safetensors").write_bytes(weights)
            weights = decode_weights(
                (tmp_path / "weights.safetensors").read_bytes(),
                expected=expected_shapes(plan),
                max_bytes=LIMIT,
            )
        train_round(plan, weights, *items, ctx)
    assert progress.events == []
    assert not ctx.work_dir.exists()
    if not isinstance(weights, bytes):
        with pytest.raises(WeightError):
            evaluate(plan, weights, items[1], ctx)


def test_global_weights_are_required_unless_init_random(tmp_path: Path, items: tuple[list, list]) -> None:
    with pytest.raises(WeightError, match="init 'global'"):
        train_round(tiny_plan(), None, *items, context(tmp_path))


def test_same_seed_gives_identical_updates_and_diff_plus_global_is_weights(
    tmp_path: Path, items: tuple[list, list]
) -> None:
    plan = tiny_plan(optimizer={"name": "sgd", "lr": 0.05}, loss="dice_ce")
    start = initial_weights(plan)
    first = train_round(plan, start, *items, context(tmp_path, "a"))
    second = train_round(plan, start, *items, context(tmp_path, "b"))
    assert _equal(first.update, second.update)
    assert first.metrics == second.metrics
    assert first.num_samples == len(items[0])
    assert not _equal(first.update, start)
    diff = train_round(
        tiny_plan(optimizer={"name": "sgd", "lr": 0.05}, loss="dice_ce", send="diff"),
        start,
        *items,
        context(tmp_path, "c"),
    )
    assert diff.global_weights is not None and _equal(diff.global_weights, start)
    for name, weights in first.update.items():
        torch.testing.assert_close(diff.update[name] + start[name], weights, rtol=0, atol=1e-6)
    other_seed = train_round(
        tiny_plan(optimizer={"name": "sgd", "lr": 0.05}, loss="dice_ce", seed=4),
        start,
        *items,
        context(tmp_path, "d"),
    )
    assert not _equal(first.update, other_seed.update)


def test_loader_threads_leave_the_update_unchanged(
    tmp_path: Path, items: tuple[list, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[int] = []
    streams: list[bool] = []
    real_loader, real_batches = engine_module.loading.build_train_loader, engine_module.loading.batches

    def recording_loader(*args: Any, **kwargs: Any) -> Any:
        built.append(kwargs["threads"])
        return real_loader(*args, **kwargs)

    def recording_batches(loader: Any, *, ahead: bool) -> Any:
        streams.append(ahead)
        return real_batches(loader, ahead=ahead)

    monkeypatch.setattr(engine_module.loading, "build_train_loader", recording_loader)
    monkeypatch.setattr(engine_module.loading, "batches", recording_batches)
    plan = tiny_plan(optimizer={"name": "sgd", "lr": 0.05}, local_epochs=2)
    start = initial_weights(plan)
    alone = train_round(plan, start, *items, context(tmp_path, "alone"))
    with_two = train_round(plan, start, *items, context(tmp_path, "two", loader_threads=2))
    assert built == [0, 0, 2, 2]  # a loader per epoch
    assert streams == [False, False, True, True]  # with threads, the next batch loads ahead
    assert _equal(alone.update, with_two.update) and alone.metrics == with_two.metrics


def test_loader_threads_auto_gives_a_gpu_job_helpers_and_a_cpu_job_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(engine_module.os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert loader_threads("auto", cpu) == 0
    assert loader_threads("auto", gpu) == AUTO_LOADER_THREADS == 4
    monkeypatch.setattr(engine_module.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4, 5})
    assert loader_threads("auto", gpu) == 3
    monkeypatch.setattr(engine_module.os, "sched_getaffinity", lambda _pid: {0})
    assert loader_threads("auto", gpu) == 1
    # A number is the site's choice, on either device.
    assert loader_threads(0, gpu) == 0 and loader_threads(6, cpu) == 6


def test_the_model_after_each_epoch_is_what_a_run_of_that_length_returns(
    tmp_path: Path, items: tuple[list, list]
) -> None:
    plan = tiny_plan(optimizer={"name": "sgd", "lr": 0.05}, local_epochs=2)
    start = initial_weights(plan)
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def keep(epoch: int, model: torch.nn.Module) -> None:
        seen[epoch] = exchanged_state(model)

    two = train_round(plan, start, *items, context(tmp_path, "hook", on_epoch_end=keep))
    one = train_round(
        tiny_plan(optimizer={"name": "sgd", "lr": 0.05}, local_epochs=1),
        start,
        *items,
        context(tmp_path, "one"),
    )
    assert sorted(seen) == [1, 2]
    assert _equal(seen[1], one.update)
    assert _equal(seen[2], two.update)
    assert not _equal(seen[1], seen[2])


def test_update_survives_the_wire(tmp_path: Path, items: tuple[list, list]) -> None:
    plan = tiny_plan(loss="dice")
    result = train_round(plan, initial_weights(plan), *items, context(tmp_path))
    back = decode_weights(encode_weights(result.update), expected=expected_shapes(plan), max_bytes=LIMIT)
    assert _equal(back, result.update)


def test_training_raises_validation_dice_well_above_the_untrained_model(tmp_path: Path) -> None:
    train, val = make_blob_items(tmp_path / "data", train=6, val=3, seed=1)
    plan = tiny_plan(
        local_epochs=5,
        batch_size=8,
        optimizer={"name": "adam", "lr": 0.02},
        data={
            "spatial_dims": 2,
            "roi_size": [32, 32],
            "samples_per_subject": 16,
            "label_slice_fraction": 0.7,
        },
    )
    start = initial_weights(plan)
    before = evaluate(plan, start, val, context(tmp_path)).metrics["dice"]
    progress = _Recorder()
    result = train_round(plan, start, train, val, context(tmp_path, progress=progress))
    after = result.metrics["dice"]
    assert after > before + 0.25, (before, after)
    assert after > 0.7, (before, after)
    assert {e["epoch"] for e in progress.events} == set(range(1, 6))
    assert all(e["epochs"] == 5 and e["step"] <= e["steps"] == 12 for e in progress.events)
    # The reported metrics are the evaluation of exactly the returned weights.
    again = evaluate(plan, result.update, val, context(tmp_path))
    assert again.metrics["dice"] == pytest.approx(after)
    assert again.num_samples == len(val)
    assert again.metrics["dice_p25"] <= again.metrics["dice_median"] <= again.metrics["dice_p75"]


def test_resuming_from_an_epoch_checkpoint_gives_the_uninterrupted_result(
    tmp_path: Path, items: tuple[list, list]
) -> None:
    plan = tiny_plan(local_epochs=2, optimizer={"name": "adamw", "lr": 0.003, "weight_decay": 0.01})
    start = initial_weights(plan)
    whole = train_round(plan, start, *items, context(tmp_path, "whole"))
    seen: list[dict[str, Any]] = []

    def stop_after_epoch_one() -> bool:
        return any(e["epoch"] == 1 and e["step"] == e["steps"] for e in seen)

    ctx = context(tmp_path, "interrupted", progress=seen.append, should_stop=stop_after_epoch_one)
    with pytest.raises(TrainingCancelled):
        train_round(plan, start, *items, ctx)
    assert (ctx.work_dir / CHECKPOINT_NAME).is_file()
    # The thread that wrote epoch 1's checkpoint ended with the round.
    assert not [t for t in threading.enumerate() if t.name.startswith("checkpoint-writer")]
    resumed = train_round(plan, start, *items, context(tmp_path, "interrupted"), resume_from_checkpoint=True)
    assert _equal(resumed.update, whole.update)
    assert resumed.metrics == whole.metrics
    # A checkpoint never resumes a different plan or other global weights.
    with pytest.raises(EngineError, match="another plan"):
        train_round(
            tiny_plan(local_epochs=3),
            start,
            *items,
            context(tmp_path, "interrupted"),
            resume_from_checkpoint=True,
        )
    with pytest.raises(EngineError, match="other global weights"):
        train_round(
            plan,
            initial_weights(plan, seed=5),
            *items,
            context(tmp_path, "interrupted"),
            resume_from_checkpoint=True,
        )


@pytest.mark.parametrize("threads", [0, 2])
def test_cancel_stops_between_steps(tmp_path: Path, items: tuple[list, list], threads: int) -> None:
    plan = tiny_plan()
    ctx = context(tmp_path, should_stop=lambda: True, loader_threads=threads)
    with pytest.raises(TrainingCancelled):
        train_round(plan, initial_weights(plan), *items, ctx)
    # A cancelled epoch leaves no thread loading batches behind.
    assert not [t for t in threading.enumerate() if t.name == "fedsite-batches"]


def test_fedprox_keeps_the_update_closer_to_the_global_weights(
    tmp_path: Path, items: tuple[list, list]
) -> None:
    start = initial_weights(tiny_plan())
    norms = {}
    for mu in (0.0, 10.0):
        plan = tiny_plan(fedprox_mu=mu, send="diff", local_epochs=2, optimizer={"name": "sgd", "lr": 0.05})
        update = train_round(plan, start, *items, context(tmp_path, f"mu{mu}")).update
        norms[mu] = float(torch.sqrt(sum((t**2).sum() for t in update.values())))
    assert 0 < norms[10.0] < norms[0.0]


def test_optimizer_state_is_fresh_each_round_unless_kept(tmp_path: Path, items: tuple[list, list]) -> None:
    keep = tiny_plan(optimizer={"name": "adam", "lr": 0.003, "keep_state": True}, run_id="run-a")
    start = initial_weights(keep)
    first = train_round(keep, start, *items, context(tmp_path, "r1"))
    second = train_round(keep, first.update, *items, context(tmp_path, "r2"))
    assert first.metrics["optimizer_state_restored"] == 0.0
    assert second.metrics["optimizer_state_restored"] == 1.0
    fresh = tiny_plan()
    fresh_second = train_round(fresh, first.update, *items, context(tmp_path, "r3"))
    assert "optimizer_state_restored" not in fresh_second.metrics
    assert not _equal(second.update, fresh_second.update)


def test_kept_optimizer_state_stays_in_its_run(tmp_path: Path, items: tuple[list, list]) -> None:
    """A new run starts fresh at the same site: run b's first round trains as run a's did, though
    run a's last round left its state in the same file; run b's second round then takes it."""
    optimizer = {"name": "adam", "lr": 0.003, "keep_state": True}
    run_a, run_b = (tiny_plan(optimizer=optimizer, run_id=run) for run in ("run-a", "run-b"))
    start = initial_weights(run_a)
    a1 = train_round(run_a, start, *items, context(tmp_path, "a1"))
    train_round(run_a, a1.update, *items, context(tmp_path, "a2"))
    b1 = train_round(run_b, start, *items, context(tmp_path, "b1"))
    assert b1.metrics["optimizer_state_restored"] == 0.0
    assert _equal(b1.update, a1.update)
    b2 = train_round(run_b, b1.update, *items, context(tmp_path, "b2"))
    assert b2.metrics["optimizer_state_restored"] == 1.0
    [kept] = (tmp_path / "rounds" / "optimizer_state").iterdir()
    assert read_state_metadata(kept)["run_id"] == "run-b"


def test_a_round_that_keeps_optimizer_state_without_its_run_is_refused(
    tmp_path: Path, items: tuple[list, list]
) -> None:
    plan = tiny_plan(optimizer={"name": "adam", "lr": 0.003, "keep_state": True})
    with pytest.raises(EngineError, match=r"optimizer\.keep_state needs run_id"):
        train_round(plan, initial_weights(plan), *items, context(tmp_path))
    assert not (tmp_path / "rounds" / "optimizer_state").exists()


def test_unreadable_kept_optimizer_state_starts_the_round_fresh(
    tmp_path: Path, items: tuple[list, list], caplog: pytest.LogCaptureFixture
) -> None:
    plan = tiny_plan(optimizer={"name": "adam", "lr": 0.003, "keep_state": True}, run_id="run-a")
    start = initial_weights(plan)
    first = train_round(plan, start, *items, context(tmp_path, "r1"))
    [kept] = (tmp_path / "rounds" / "optimizer_state").iterdir()
    kept.write_bytes(kept.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="fedsite.training"):
        second = train_round(plan, first.update, *items, context(tmp_path, "r2"))
    assert second.metrics["optimizer_state_restored"] == 0.0
    assert "cannot be read" in caplog.text and "starting fresh" in caplog.text
    # The round's end wrote whole state again, which the next round takes.
    third = train_round(plan, second.update, *items, context(tmp_path, "r3"))
    assert third.metrics["optimizer_state_restored"] == 1.0


def test_early_stopping_returns_the_best_epoch(tmp_path: Path, items: tuple[list, list]) -> None:
    plan = tiny_plan(early_stopping={"patience": 1, "max_epochs": 4}, optimizer={"name": "adam", "lr": 0.01})
    result = train_round(plan, initial_weights(plan), *items, context(tmp_path))
    epochs_run, best = result.metrics["epochs_run"], result.metrics["best_epoch"]
    assert 1 <= best <= epochs_run <= 4
    assert epochs_run == 4 or epochs_run == best + 1
    again = evaluate(plan, result.update, items[1], context(tmp_path))
    assert again.metrics["dice"] == pytest.approx(result.metrics["dice"])


def test_empty_splits_are_clear_errors(tmp_path: Path, items: tuple[list, list]) -> None:
    plan = tiny_plan()
    with pytest.raises(EngineError, match="no training subjects"):
        train_round(plan, initial_weights(plan), [], items[1], context(tmp_path))
    with pytest.raises(EngineError, match="no validation subjects"):
        evaluate(plan, initial_weights(plan), [], context(tmp_path))
    es = tiny_plan(early_stopping={"patience": 1, "max_epochs": 2})
    with pytest.raises(EngineError, match="early_stopping needs validation subjects"):
        train_round(es, initial_weights(es), items[0], [], context(tmp_path))


def test_random_init_is_seeded(tmp_path: Path, items: tuple[list, list]) -> None:
    plan = tiny_plan(init="random")
    a = train_round(plan, None, *items, context(tmp_path, "a"))
    b = train_round(plan, None, *items, context(tmp_path, "b"))
    assert a.global_weights is None
    assert _equal(a.update, b.update)


def test_data_with_other_channel_count_is_refused(tmp_path: Path, items: tuple[list, list]) -> None:
    plan = tiny_plan(model=smallest_unet(2, in_channels=2))
    with pytest.raises(EngineError, match=r"1 image channels .* model.in_channels is 2"):
        train_round(plan, initial_weights(plan), *items, context(tmp_path))


def _plan_in(dims: int, **overrides: Any) -> Any:
    if dims == 2:
        return tiny_plan(**overrides)
    return tiny_plan(
        model=smallest_unet(3, norm="instance"),
        batch_size=2,
        data={
            "spatial_dims": 3,
            "roi_size": [16, 16, 16],
            "samples_per_subject": 2,
            "label_slice_fraction": 0.5,
        },
        **overrides,
    )


@pytest.mark.parametrize("dims", [2, 3])
def test_a_cpu_round_leaves_the_nan_fill_off_and_gives_the_update_it_gives_with_it_on(
    tmp_path: Path, items: tuple[list, list], monkeypatch: pytest.MonkeyPatch, dims: int
) -> None:
    fill = torch.utils.deterministic  # type: ignore[attr-defined]
    plan = _plan_in(dims, local_epochs=2)
    start = initial_weights(plan)
    during: list[bool] = []
    before = fill.fill_uninitialized_memory

    def look(_epoch: int, _model: torch.nn.Module) -> None:
        during.append(fill.fill_uninitialized_memory)

    off = train_round(plan, start, *items, context(tmp_path, f"off{dims}", on_epoch_end=look))
    assert during == [False, False]
    assert fill.fill_uninitialized_memory is before
    monkeypatch.setattr(engine_module, "FILL_UNINITIALIZED_MEMORY", True)
    on = train_round(plan, start, *items, context(tmp_path, f"on{dims}", on_epoch_end=look))
    assert during == [False, False, True, True]
    assert _equal(off.update, on.update) and off.metrics == on.metrics
