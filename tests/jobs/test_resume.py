"""Rounds that a crash interrupted resume at the next start, and give the uninterrupted update.

Each test runs jobs in this process through the worker's own entry point (`Worker.run`), as
tests/jobs/test_reproducible.py does. A crash is a `BaseException` raised right after the
engine wrote the checkpoint of a chosen epoch: nothing in the worker catches it, so the job
row stays `running`, its files stay as a killed worker leaves them, and the next start
(`recover_after_restart`, what `SiteService.start` runs) finds it as after kill -9.

Two generated sites with one seed and one site secret hold identical data, so one trains
the round uninterrupted and the other crashes and resumes it under the same round id: the
bytes the egress gate releases must be the same.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from agent.config import JobsConfig, load_config
from agent.exchange.codec import encode_weights
from agent.jobs.recovery import check_resumable, recover_after_restart
from agent.jobs.runner import config_for_worker
from agent.jobs.states import JobKind, JobStatus
from agent.jobs.store import JobView
from agent.jobs.worker import Worker
from agent.service import SiteService
from agent.training import engine
from agent.training.checkpoint import checkpoint_path
from agent.training.plan import parse_plan
from agent.training.registry import build_model, exchanged_state
from tests.fixtures.agents import make_site, tiny_plan

SITE_SECRET = "fixed-test-secret-resume-0123456789"


class SimulatedCrash(BaseException):
    """The worker process dying after a checkpoint: no `except Exception` stops it."""


def round_plan(round_id: str, **overrides: Any) -> dict[str, Any]:
    return tiny_plan(round_id=round_id, local_epochs=3, seed=5, **overrides)


def initial_weights(p: dict[str, Any]) -> bytes:
    torch.manual_seed(11)
    return encode_weights(exchanged_state(build_model(parse_plan(p))))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def open_site(root: Path, **jobs: Any) -> SiteService:
    site = make_site(
        root / "fed",
        subjects=4,
        size=32,
        fmt="nifti",
        seed=7,
        overrides={"site": {"secret": SITE_SECRET}, "device": "cpu", "jobs": jobs},
    )
    svc = SiteService.open(load_config(site.config_path))  # no scheduler: jobs run here
    svc.scan()
    return svc


@pytest.fixture
def sites(tmp_path: Path, one_thread: None) -> Iterator[tuple[SiteService, SiteService]]:
    whole, crashing = open_site(tmp_path / "whole"), open_site(tmp_path / "crashing")
    try:
        yield whole, crashing
    finally:
        whole.close()
        crashing.close()


def run_next(service: SiteService) -> JobView:
    """Claim the next queued job and run it in this process, as a worker would."""
    job = service.store.claim_next(actor="agent")
    assert job is not None
    worker = Worker()
    try:
        worker.run({"config": config_for_worker(service.cfg), "job_id": job.id, "parent_pid": os.getpid()})
    finally:
        worker.close()
    done = service.store.get_by_id(job.id)
    assert done is not None
    return done


def crash_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    original = engine._Trainer.save_checkpoint

    def save_then_crash(self: Any, model: Any, opt: Any, scaler: Any, run: Any, tag: str) -> None:
        original(self, model, opt, scaler, run, tag)
        if run.epoch == epoch:
            raise SimulatedCrash(f"crash after epoch {epoch}")

    monkeypatch.setattr(engine._Trainer, "save_checkpoint", save_then_crash)


@pytest.mark.parametrize(
    ("case", "overrides", "crash_epoch"),
    [
        ("adam-global-diff", {"send": "diff"}, 1),
        ("sgd-momentum", {"optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}}, 2),
        # The last epoch's checkpoint was written, the update not: nothing left to train.
        ("crash-after-last-epoch", {}, 3),
    ],
)
def test_a_round_resumed_after_a_crash_releases_the_uninterrupted_update(
    sites: tuple[SiteService, SiteService],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    overrides: dict[str, Any],
    crash_epoch: int,
) -> None:
    whole, crashing = sites
    p = round_plan("r-1", **overrides)
    weights = initial_weights(p)

    whole.start_round(json.dumps(p), weights, "token:coord")
    expected = run_next(whole)
    assert expected.status == JobStatus.COMPLETED, expected.error

    crashing.start_round(json.dumps(p), weights, "token:coord")
    with monkeypatch.context() as m:
        crash_after_epoch(m, crash_epoch)
        with pytest.raises(SimulatedCrash):
            run_next(crashing)
    left = crashing.store.get(JobKind.TRAIN, "r-1")
    assert left is not None and left.status == JobStatus.RUNNING
    assert checkpoint_path(left.job_dir).is_file()

    recovery = recover_after_restart(crashing.store, crashing.cfg.jobs)
    assert recovery.interrupted == ["r-1"] and recovery.resumed == ["r-1"], recovery
    queued = crashing.store.get(JobKind.TRAIN, "r-1")
    assert queued is not None and queued.status == JobStatus.QUEUED and queued.resumes == 1
    assert queued.error is None and queued.finished_at is None
    requeue = crashing.audit.find("round.queued", round_id="r-1")[-1]["details"]
    assert requeue["reason"] == "resumed at agent start" and requeue["from_epoch"] == crash_epoch

    trained: list[int] = []
    with monkeypatch.context() as m:
        run_epoch = engine._Trainer.run_epoch

        def counted(self: Any, epoch: int, *args: Any) -> tuple[float, int]:
            trained.append(epoch)
            return run_epoch(self, epoch, *args)

        m.setattr(engine._Trainer, "run_epoch", counted)
        resumed = run_next(crashing)
    # It continued after the crashed epoch; it did not start the round again.
    assert trained == list(range(crash_epoch + 1, 4))
    assert resumed.status == JobStatus.COMPLETED, resumed.error
    assert crashing.gate.read_released("r-1") == whole.gate.read_released("r-1")
    assert resumed.update_sha256 == expected.update_sha256
    assert resumed.metrics == expected.metrics and resumed.metrics["epochs_run"] == 3.0
    assert resumed.num_samples == expected.num_samples and resumed.progress == expected.progress
    moves = [
        e["action"]
        for e in crashing.audit.events(limit=100)
        if e["action"].startswith("round.") and e["details"].get("round_id") == "r-1"
    ]
    assert moves == [
        "round.queued",
        "round.running",
        "round.interrupted",
        "round.queued",
        "round.running",
        "round.completed",
    ]
    assert crashing.audit.verify().ok


def _interrupted_round(service: SiteService, monkeypatch: pytest.MonkeyPatch, round_id: str) -> JobView:
    """A round crashed after its first epoch and left `running`, as kill -9 leaves it."""
    p = round_plan(round_id)
    service.start_round(json.dumps(p), initial_weights(p), "token:coord")
    with monkeypatch.context() as m:
        crash_after_epoch(m, 1)
        with pytest.raises(SimulatedCrash):
            run_next(service)
    job = service.store.get(JobKind.TRAIN, round_id)
    assert job is not None and job.status == JobStatus.RUNNING
    return job


def test_a_round_that_cannot_resume_says_why(
    tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = open_site(tmp_path)
    try:
        damaged = _interrupted_round(service, monkeypatch, "r-damaged")
        ckpt = checkpoint_path(damaged.job_dir)
        ckpt.write_bytes(ckpt.read_bytes()[:-100])  # cut short
        recovery = recover_after_restart(service.store, service.cfg.jobs)
        assert recovery.resumed == [] and "checkpoint is damaged" in recovery.not_resumed["r-damaged"]
        job = service.store.get(JobKind.TRAIN, "r-damaged")
        assert job is not None and job.status == JobStatus.INTERRUPTED
        assert job.error is not None and "cannot resume: its checkpoint is damaged" in job.error
        event = service.audit.find("round.interrupted", round_id="r-damaged")[-1]["details"]
        assert "checkpoint is damaged" in event["resume"]
        assert str(tmp_path) not in json.dumps(event) and str(tmp_path) not in job.error

        swapped = _interrupted_round(service, monkeypatch, "r-swapped")
        assert swapped.weights_path is not None
        Path(swapped.weights_path).write_bytes(b"not the weights")
        recovery = recover_after_restart(service.store, service.cfg.jobs)
        assert "no longer match" in recovery.not_resumed["r-swapped"]

        # Said once: a second start records nothing new for either.
        before = len(service.audit.events(limit=1000))
        again = recover_after_restart(service.store, service.cfg.jobs)
        assert again.not_resumed == {} and again.resumed == []
        assert len(service.audit.events(limit=1000)) == before
    finally:
        service.close()


def test_resume_never_and_max_resumes(
    tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = open_site(tmp_path, resume="never")
    try:
        job = _interrupted_round(service, monkeypatch, "r-never")
        recovery = recover_after_restart(service.store, service.cfg.jobs)
        assert recovery.interrupted == ["r-never"] and recovery.resumed == []
        stays = service.store.get(JobKind.TRAIN, "r-never")
        assert stays is not None and stays.status == JobStatus.INTERRUPTED
        assert stays.error == "the agent stopped while this job was running; start a new round"
        assert check_resumable(stays, JobsConfig(resume="never")).why == "jobs.resume is 'never' at this site"
        # Its files are intact: the same round under auto could resume...
        assert check_resumable(stays, JobsConfig(resume="auto")).ok
        # ... unless it was resumed max_resumes times already.
        tired = check_resumable(stays, JobsConfig(resume="auto", max_resumes=0)).why
        assert tired is not None and "jobs.max_resumes" in tired
        # Resending it under `never` answers it as it is.
        p = round_plan("r-never")
        again = service.start_round(json.dumps(p), initial_weights(p), "token:coord")
        assert again.id == job.id and again.status == JobStatus.INTERRUPTED
    finally:
        service.close()


def test_a_resent_interrupted_round_resumes_whatever_its_age(
    tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = open_site(tmp_path)
    try:
        job = _interrupted_round(service, monkeypatch, "r-old")
        # Interrupted, then not resumed at a start long past the window.
        service.store.transition(job.id, JobStatus.INTERRUPTED, actor="agent", fields={"error": "stopped"})
        later = recover_after_restart(
            service.store, service.cfg.jobs, now=job.created_at.replace(year=job.created_at.year + 1)
        )
        assert later.resumed == []
        p = round_plan("r-old")
        resent = service.start_round(json.dumps(p), initial_weights(p), "token:coord")
        assert resent.id == job.id and resent.status == JobStatus.QUEUED and resent.resumes == 1
        event = service.audit.find("round.queued", round_id="r-old")[-1]
        assert event["details"]["reason"] == "resumed on resubmission" and event["actor"] == "token:coord"
        done = run_next(service)
        assert done.status == JobStatus.COMPLETED, done.error
        # A cancel of an interrupted round ends it.
        other = _interrupted_round(service, monkeypatch, "r-cancel")
        recover_after_restart(service.store, JobsConfig(resume="never"))
        cancelled = service.cancel_round("r-cancel", "token:coord", wait_s=0)
        assert cancelled.id == other.id and cancelled.status == JobStatus.CANCELLED
    finally:
        service.close()
