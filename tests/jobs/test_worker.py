"""The worker process under failure: a training error, a killed worker, a round over its time limit;
and what it frees and freezes after a job.

One in-process SiteService with its real scheduler and real worker processes; no HTTP.
"""

from __future__ import annotations

import gc
import importlib
import io
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.jobs.states import JobKind
from agent.jobs.store import JobView
from agent.jobs.worker import freeze_new_imports, serve_jobs
from agent.service import SiteService
from tests.fixtures.agents import GeneratedSite, make_site, tiny_plan

TERMINAL = ("completed", "failed", "cancelled", "interrupted")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> GeneratedSite:
    return make_site(tmp_path_factory.mktemp("worker") / "fed", subjects=4, fmt="nifti")


@pytest.fixture(scope="module")
def service(site: GeneratedSite) -> Iterator[SiteService]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = load_config(site.config_path)
    cfg.device = "cpu"
    svc = SiteService.open(cfg, runner_options={"cancel_grace_s": 2.0})
    svc.start()
    try:
        yield svc
    finally:
        svc.close()


def wait(service: SiteService, round_id: str, statuses: tuple[str, ...], timeout: float = 300) -> JobView:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = service.get_round(round_id)
        if st.status in statuses:
            return st
        time.sleep(0.2)
    raise AssertionError(f"round {round_id} stayed {service.get_round(round_id).status}")


def submit(service: SiteService, round_id: str, **plan: object) -> None:
    service.start_round(json.dumps(tiny_plan(init="random", round_id=round_id, **plan)), None, "token:test")


def test_a_training_error_fails_the_round_without_paths_or_subjects(
    service: SiteService, site: GeneratedSite
) -> None:
    data = Path(service.cfg.datasets[0].root)
    moved = data.parent / "moved-away"
    victims = [data / pid / "flair.nii.gz" for pid in site.patient_ids]
    moved.mkdir()
    for i, path in enumerate(victims):
        shutil.move(path, moved / f"{i}.nii.gz")
    try:
        submit(service, "r-broken")
        st = wait(service, "r-broken", TERMINAL)
    finally:
        for i, path in enumerate(victims):
            shutil.move(moved / f"{i}.nii.gz", path)
    assert st.status == "failed", st
    assert st.error
    assert str(data) not in st.error and "PAT-" not in st.error, st.error
    event = service.audit.find("round.failed", round_id="r-broken")[-1]
    assert "PAT-" not in json.dumps(event)


def test_a_killed_worker_fails_the_round_and_the_next_one_runs(service: SiteService) -> None:
    submit(service, "r-crash", local_epochs=5000)
    wait(service, "r-crash", ("running",))
    job = service.store.get("train", "r-crash")
    deadline = time.monotonic() + 60
    while (job is None or not job.worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
        job = service.store.get("train", "r-crash")
    assert job is not None and job.worker_pid
    os.kill(job.worker_pid, signal.SIGKILL)
    st = wait(service, "r-crash", TERMINAL, timeout=30)
    assert st.status == "failed"
    assert (
        st.error
        == "the worker process ended unexpectedly (killed by signal SIGKILL) before it recorded a result"
    )

    submit(service, "r-next")
    assert wait(service, "r-next", TERMINAL).status == "completed"
    after = service.store.get("train", "r-next")
    assert after is not None and after.worker_pid not in (None, job.worker_pid)
    assert service.audit.verify().ok


def test_rounds_in_turn_share_one_worker_process(service: SiteService) -> None:
    submit(service, "r-first")
    assert wait(service, "r-first", TERMINAL).status == "completed"
    submit(service, "r-second")
    assert wait(service, "r-second", TERMINAL).status == "completed"
    first, second = service.store.get("train", "r-first"), service.store.get("train", "r-second")
    assert first is not None and second is not None
    assert first.worker_pid is not None and first.worker_pid == second.worker_pid


def test_a_round_over_its_time_limit_is_stopped(service: SiteService) -> None:
    service.cfg.limits.max_round_seconds = 3
    try:
        submit(service, "r-slow", local_epochs=5000)
        st = wait(service, "r-slow", TERMINAL, timeout=120)
    finally:
        service.cfg.limits.max_round_seconds = 24 * 3600
    assert st.status == "failed"
    assert st.error == "stopped after running longer than limits.max_round_seconds (3 s)"


def test_a_stored_plan_the_worker_cannot_read_fails_with_one_sentence(service: SiteService) -> None:
    # What `fedprox_mu: 1e999` became once stored (null) before plans refused non-finite numbers.
    plan = tiny_plan(init="random", round_id="r-stale")
    plan["fedprox_mu"] = None
    service.store.create(
        round_id="r-stale",
        kind=JobKind.TRAIN,
        actor="token:test",
        dataset=str(plan["dataset"]),
        plan_json=json.dumps(plan),
        plan_hash="b" * 64,
        weights_sha256=None,
        weights_path=None,
        job_dir=str(service.cfg.work_dir / "jobs" / "r-stale"),
    )
    service.runner.wake()
    st = wait(service, "r-stale", TERMINAL)
    assert st.status == "failed"
    assert st.error == "the stored plan is no longer valid: fedprox_mu: Input should be a valid number"


class _Cyclic:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture()
def frozen_before() -> Iterator[int]:
    """How many objects were frozen before the test; if none were, the collector gets back
    what the test froze."""
    before = gc.get_freeze_count()
    try:
        yield before
    finally:
        if before == 0:
            gc.unfreeze()


def _tracked(obj: object) -> bool:
    """Whether the cyclic collector's generations hold `obj` (frozen objects are outside them)."""
    return any(o is obj for o in gc.get_objects())


def test_the_worker_loop_freezes_what_a_job_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frozen_before: int
) -> None:
    (tmp_path / "fedsite_imported_by_a_job.py").write_text("def helper() -> int:\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    class ImportingWorker:
        def run(self, spec: dict[str, object]) -> None:
            importlib.import_module("fedsite_imported_by_a_job")

        def close(self) -> None:
            pass

    monkeypatch.setattr("agent.jobs.worker.Worker", ImportingWorker)
    jobs = io.StringIO(json.dumps({"job_id": 1, "parent_pid": os.getpid()}) + "\n")
    replies = io.StringIO()
    try:
        assert serve_jobs(jobs, replies, os.getpid()) == 0
        assert json.loads(replies.getvalue()) == {"done": 1}
        # Imported after the loop's own freeze at start: frozen because the job imported it.
        assert not _tracked(sys.modules["fedsite_imported_by_a_job"].helper)
    finally:
        sys.modules.pop("fedsite_imported_by_a_job", None)


def test_a_job_that_imported_nothing_leaves_its_survivors_to_the_collector(frozen_before: int) -> None:
    survivor = _Cyclic()
    assert freeze_new_imports(len(sys.modules)) == len(sys.modules)
    assert gc.get_freeze_count() == frozen_before
    assert _tracked(survivor)


def test_a_job_that_imported_something_has_its_survivors_frozen(frozen_before: int) -> None:
    survivor = _Cyclic()
    assert freeze_new_imports(len(sys.modules) - 1) == len(sys.modules)
    assert gc.get_freeze_count() > frozen_before
    assert not _tracked(survivor)
