"""SiteService without a transport: validation, idempotency, queue bound, approval, update integrity.

The scheduler is not started here, so jobs stay where the test puts them; the worker path
is covered by test_jobs_worker.py and the HTTP tests.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from agent.access.approvals import approve_plan
from agent.config import load_config
from agent.errors import Conflict, InvalidRequest, JobQueueFull, NotFound, PlanRefused, TooLarge
from agent.exchange.codec import encode_weights
from agent.jobs.states import JobKind, JobStatus
from agent.service import SiteService
from agent.training.plan import parse_plan, plan_hash
from agent.training.registry import build_model
from tests.fixtures.agents import GeneratedSite, make_site, tiny_plan


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> GeneratedSite:
    return make_site(tmp_path_factory.mktemp("svc") / "fed", subjects=4, fmt="nifti", size=32)


@pytest.fixture(scope="module")
def shared_service(site: GeneratedSite) -> Iterator[SiteService]:
    cfg = load_config(site.config_path)
    cfg.api.queue_size = 2
    cfg.device = "cpu"
    svc = SiteService.open(cfg)
    svc.scan()
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture
def service(shared_service: SiteService) -> Iterator[SiteService]:
    """The module's service with an empty queue and the config as loaded, for each test."""
    limits = shared_service.cfg.limits.model_copy()
    yield shared_service
    shared_service.cfg.limits = limits
    shared_service.cfg.approval.policy = "auto"
    for job in shared_service.store.jobs_with_status("queued"):
        shared_service.store.transition(job.id, "cancelled", actor="test")


def text(plan: dict[str, object]) -> str:
    return json.dumps(plan)


def weights_for(plan: dict[str, object]) -> bytes:
    return encode_weights(build_model(parse_plan(plan)).state_dict())


def test_info_lists_datasets_by_counts(service: SiteService) -> None:
    info = service.info()
    assert info["site_id"] == "site-1" and info["device"] == "cpu" and info["approval_policy"] == "auto"
    [ds] = info["datasets"]
    assert ds["name"] == "brain" and ds["num_train"] + ds["num_val"] == 4


def test_idempotent_round_ids(service: SiteService) -> None:
    plan = tiny_plan(round_id="r1")
    w = weights_for(plan)
    first = service.start_round(text(plan), w, "token:c")
    assert first.created and first.status == "queued" and first.round_id == "r1"
    again = service.start_round(text(plan), w, "token:c")
    assert not again.created and again.round_id == "r1"
    with pytest.raises(Conflict, match="different plan"):
        service.start_round(text(dict(plan, seed=1)), w, "token:c")
    other = w[:-4] + b"\0\0\0\0"
    with pytest.raises(Conflict, match="different weights"):
        service.start_round(text(plan), other, "token:c")
    # Round ids and evaluation ids are separate: the same id may name an evaluation.
    ev = service.start_evaluation(text(plan), w, "token:c")
    assert ev.created and ev.kind == "evaluate"
    assert service.get_round("r1").kind == "train"


def test_concurrent_resends_make_one_round(service: SiteService) -> None:
    plan = tiny_plan(init="random", round_id="race")
    results: list[object] = []

    def send() -> None:
        try:
            results.append(service.start_round(text(plan), None, "token:c").created)
        except Exception as exc:  # collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, results)) == ["False", "False", "False", "True"]
    assert len(service.audit.find("round.queued", round_id="race")) == 1


def test_queue_is_bounded(service: SiteService) -> None:
    for i in range(2):
        service.start_round(text(tiny_plan(init="random", round_id=f"q{i}")), None, "token:c")
    with pytest.raises(JobQueueFull, match="queue is full"):
        service.start_round(text(tiny_plan(init="random", round_id="q2")), None, "token:c")
    with pytest.raises(NotFound):
        service.get_round("q2")
    assert service.cancel_round("q0", "token:c").status == "cancelled"
    assert service.start_round(text(tiny_plan(init="random", round_id="q2")), None, "token:c").created


def test_cancel_rules(service: SiteService) -> None:
    st = service.start_round(text(tiny_plan(init="random", round_id="c1")), None, "token:c")
    assert service.cancel_round(st.round_id, "token:c").status == "cancelled"
    assert service.cancel_round(st.round_id, "token:c").status == "cancelled"
    done = service.start_round(text(tiny_plan(init="random", round_id="c2")), None, "token:c")
    job = service.store.get("train", done.round_id)
    assert job is not None
    assert service.store.transition(job.id, JobStatus.RUNNING, actor="t")
    assert service.store.transition(job.id, JobStatus.COMPLETED, actor="t")
    with pytest.raises(Conflict, match="already completed"):
        service.cancel_round("c2", "token:c")
    with pytest.raises(NotFound, match="no round with id 'nope'"):
        service.cancel_round("nope", "token:c")


@pytest.mark.parametrize(
    ("plan", "weights", "error", "needle"),
    [
        ("{", None, InvalidRequest, "plan: not valid JSON"),
        (text(tiny_plan(init="random", dataset="other")), None, InvalidRequest, "unknown dataset 'other'"),
        (text(tiny_plan(init="random", loss="l2")), None, InvalidRequest, "plan.loss"),
        (text(tiny_plan()), None, InvalidRequest, "weights: missing"),
        (text(tiny_plan()), b"\x08\x00\x00\x00\x00\x00\x00\x00{}", InvalidRequest, "weights:"),
        (" " * 70_000, None, TooLarge, "limits.max_plan_bytes"),
    ],
)
def test_bad_input_is_refused_with_a_reason(
    service: SiteService, plan: str, weights: bytes | None, error: type[Exception], needle: str
) -> None:
    with pytest.raises(error) as info:
        service.start_round(plan, weights, "token:c")
    assert needle in str(info.value)
    assert service.store.count("queued") == 0


def test_weights_over_the_limit(service: SiteService) -> None:
    plan = tiny_plan()
    w = weights_for(plan)
    service.cfg.limits.max_weights_bytes = len(w) - 1
    with pytest.raises(TooLarge, match="max_weights_bytes"):
        service.start_round(text(plan), w, "token:c")


def test_manual_policy_refuses_until_approved(service: SiteService) -> None:
    service.cfg.approval.policy = "manual"
    plan = tiny_plan(init="random", round_id="m1")
    digest = plan_hash(parse_plan(plan))
    with pytest.raises(PlanRefused) as info:
        service.start_round(text(plan), None, "token:c")
    assert info.value.plan_hash == digest and digest in str(info.value)
    approve_plan(service.db, service.audit, digest, "admin")
    assert service.start_round(text(plan), None, "token:c").created
    # The hash ignores round_id: the approved plan runs under any round id.
    assert service.start_round(text(dict(plan, round_id="m2")), None, "token:c").created


def test_update_only_when_completed_and_intact(service: SiteService) -> None:
    plan = tiny_plan(init="random", round_id="u1")
    st = service.start_round(text(plan), None, "token:c")
    with pytest.raises(Conflict, match="queued"):
        service.get_update(st.round_id, "token:c")
    with pytest.raises(NotFound):
        service.get_update("nope", "token:c")
    state = build_model(parse_plan(plan)).state_dict()
    released = service.gate.release(
        round_id="u1", plan=parse_plan(plan), update=state, global_weights=None, kind="weights"
    )
    job = service.store.get("train", "u1")
    assert job is not None
    service.store.transition(job.id, JobStatus.RUNNING, actor="t")
    service.store.transition(
        job.id, JobStatus.COMPLETED, actor="t", fields={"update_sha256": released.sha256}
    )
    update = service.get_update("u1", "token:c")
    assert update.sha256 == released.sha256 and update.data == released.path.read_bytes()
    sent = service.audit.find("egress.sent", round_id="u1")
    assert len(sent) == 1 and sent[0]["details"]["sha256"] == released.sha256

    released.path.write_bytes(released.path.read_bytes()[:-1] + b"\1")
    with pytest.raises(Conflict, match="cannot be sent"):
        service.get_update("u1", "token:c")
    assert service.audit.find("egress.refused", round_id="u1")
    assert service.audit.verify().ok


def test_the_api_models_show_the_snapshot_public_fields_only(service: SiteService) -> None:
    from agent.api.schemas import EvaluationAccepted, EvaluationOut, RoundAccepted, RoundOut

    plan = tiny_plan(init="random", round_id="shown")
    queued = service.start_round(text(plan), None, "token:c")
    assert json.loads(RoundAccepted.model_validate(queued).model_dump_json()) == {
        "round_id": "shown",
        "status": "queued",
    }
    job = service.store.get(JobKind.TRAIN, "shown")
    assert job is not None
    assert service.store.transition(job.id, JobStatus.RUNNING, actor="t")
    service.store.set_progress(job.id, {"epoch": 1, "loss": 0.5})
    assert service.store.transition(
        job.id,
        JobStatus.COMPLETED,
        actor="t",
        fields={"metrics_json": '{"dice": 0.25}', "num_samples": 3, "update_sha256": "ab" * 32},
    )
    shown = RoundOut.model_validate(service.get_round("shown")).model_dump_json()
    assert shown == (
        '{"round_id":"shown","status":"completed","progress":{"epoch":1,"loss":0.5},'
        '"metrics":{"dice":0.25},"num_samples":3,"update_sha256":"' + "ab" * 32 + '","error":null,'
        '"audit_anchor":null}'
    )
    evaluation = service.start_evaluation(text(plan), weights_for(plan), "token:c")
    assert json.loads(EvaluationAccepted.model_validate(evaluation).model_dump_json()) == {
        "evaluation_id": "shown",
        "status": "queued",
    }
    assert EvaluationOut.model_validate(service.get_evaluation("shown")).model_dump_json() == (
        '{"evaluation_id":"shown","status":"queued","progress":{},"metrics":{},"num_samples":null,"error":null}'
    )


def _with(plan: dict[str, object], path: tuple[str, ...], value: object) -> dict[str, object]:
    node: dict = plan
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return plan


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        # Each of these passed the submission check and failed only in the worker.
        ((("fedprox_mu",), 1e999), "plan.fedprox_mu: inf is not a finite number"),
        ((("optimizer", "lr"), float("nan")), "plan.optimizer.lr: nan is not a finite number"),
        (
            (("data", "modalities"), ["t2"]),
            "plan.data.modalities: dataset 'brain' has no modality 't2' (it has 'flair')",
        ),
        (
            (("model", "in_channels"), 2),
            "plan.model.in_channels: is 2 but dataset 'brain' gives 1 channel(s)",
        ),
        ((("batch_size",), 4096), "at most 268435456 fit"),
    ],
    ids=["overflow", "nan", "unknown-modality", "channels", "batch-too-big"],
)
def test_what_the_worker_would_refuse_is_refused_at_submission(
    service: SiteService, change: tuple[tuple[str, ...], object], needle: str
) -> None:
    plan = _with(tiny_plan(init="random"), *change)
    if change[0] == ("batch_size",):
        plan["data"]["roi_size"] = [4096, 4096]  # type: ignore[index]
    with pytest.raises(InvalidRequest) as info:
        service.start_round(text(plan), None, "token:c")
    assert needle in str(info.value)
    assert "\n" not in str(info.value)
    assert service.store.count("queued") == 0


def test_a_plan_as_json_text_with_an_overflowing_number_is_refused(service: SiteService) -> None:
    body = text(tiny_plan(init="random")).replace('"lr": 0.001', '"lr": 1e999')
    assert "1e999" in body
    with pytest.raises(InvalidRequest, match=r"plan\.optimizer\.lr: inf is not a finite number"):
        service.start_round(body, None, "token:c")


def test_an_evaluation_or_early_stopping_needs_validation_subjects(
    service: SiteService, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_only = [item for item in service._items("brain") if item.split == "train"]
    monkeypatch.setattr(service, "_items", lambda dataset: train_only)
    plan = tiny_plan(early_stopping={"patience": 1, "max_epochs": 2}, init="random")
    with pytest.raises(InvalidRequest, match="no validation subjects, which early_stopping needs"):
        service.start_round(text(plan), None, "token:c")
    with pytest.raises(InvalidRequest, match="no validation subjects, which an evaluation needs"):
        service.start_evaluation(text(tiny_plan()), weights_for(tiny_plan()), "token:c")
    assert service.store.count("queued") == 0
