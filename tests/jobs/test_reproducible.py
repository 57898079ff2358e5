"""For a fixed seed, a round's update is bit-identical to what the agent released before.

Each case queues a job through `SiteService`, runs it in this process through the worker's
own entry point (`Worker.run`, what a worker process does with a job line) and hashes the
update the egress gate released, plus the metrics, sample count and last progress the job
recorded. The expected values were recorded from the tree before the worker trained
through `FedsiteClientAlgo` (commit 1e38a6a, where `run_job` called the engine and the
gate itself), on one torch thread.

Float results differ in the last bits between CPU instruction sets (oneDNN and ATen pick
kernels by ISA) and thread counts, so: torch runs on one thread here; the recorded values
are keyed by a fingerprint of this machine's arithmetic (a few seeded convolution and Adam
steps in plain torch) and compared wherever that fingerprint was recorded; and everywhere,
each round is also trained through the engine and the gate directly, the old worker's
path, and must give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from agent.config import EgressConfig, load_config
from agent.data.catalog import dataset_items
from agent.exchange.codec import decode_weights, encode_weights
from agent.exchange.egress import EgressGate
from agent.jobs.runner import config_for_worker
from agent.jobs.store import json_safe
from agent.jobs.worker import Worker
from agent.service import SiteService
from agent.training.engine import EngineContext, train_round
from agent.training.plan import parse_plan
from agent.training.registry import build_model, exchanged_state, expected_shapes
from tests.fixtures.agents import GeneratedSite, make_site

# fingerprint -> case -> (SHA-256 of the released update, SHA-256 of the recorded result).
# The first is the recording machine (AVX-512); the others are the same machine with
# ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 (as on
# an AVX2-only CPU) and with ATEN_CPU_CAPABILITY=default.
RECORDED: dict[str, dict[str, tuple[str | None, str]]] = {
    "33c5b9d1b72613fc40e0459c7e422c2e2afa279b4672dd9543a538c674cbf07a": {
        "global-diff-excluded": (
            "b115b00c2493f7a0464bbf7d89cd54ea868958754a262ac5ce946e852a23b8f5",
            "60bdb3bbf2fc60789ca1101c4dfc634f65cb7744ffe1c34c95e554b062c98972",
        ),
        "random-no-weights": (
            "83e10c292ff3b17be3d9241f9a32ec18c84b9f66a09ab9475fb3d2e910f95836",
            "d34281d8afd8453e3ffa2a916e30c70374b4f1610ad7c5858deab716b0b950f5",
        ),
        "random-weights-clipped": (
            "9f898106f9f60935a477bdc64e93fcd4fb609ceda7bb9eb7bc89167d0607ad18",
            "d34281d8afd8453e3ffa2a916e30c70374b4f1610ad7c5858deab716b0b950f5",
        ),
        "evaluation": (None, "207e8cb865d2995e16a653fa5583bb5931c8b1b9c202421d61479ff1ff6d4dba"),
    },
    "0cfde839be097bb6c4a6ef7ed43f9cfe7b4212d393f1af3552c96979369c7228": {
        "global-diff-excluded": (
            "acdff821054337cbb4b36f7fba739f408ebc6def7f215100d3463bf60a1d3c27",
            "10981f02e2af06cf33daf00bd0167dd9f3ffe1190f58cd7cb5fd40f7c3b8124f",
        ),
        "random-no-weights": (
            "3206d2513b6c7b3d8bddd14e79d48f6711b9a2434d081a68429df92c1cc9fbe6",
            "d34281d8afd8453e3ffa2a916e30c70374b4f1610ad7c5858deab716b0b950f5",
        ),
        "random-weights-clipped": (
            "7c673a70621d789419df5e973ca8a898290dd748863b3858606d8f53ebd44530",
            "d34281d8afd8453e3ffa2a916e30c70374b4f1610ad7c5858deab716b0b950f5",
        ),
        "evaluation": (None, "207e8cb865d2995e16a653fa5583bb5931c8b1b9c202421d61479ff1ff6d4dba"),
    },
    "3e2b34338d1e50009b2727f134a0c36e172eeb4ca6236b20ce67a2181d4e4b50": {
        "global-diff-excluded": (
            "612356a220df5c8a88ea027e556354b5ba967efe3479bea85ff84faff3429b4a",
            "60bdb3bbf2fc60789ca1101c4dfc634f65cb7744ffe1c34c95e554b062c98972",
        ),
        "random-no-weights": (
            "49e319fff00ffdaa7681cb054fd1bd07e3a18ead9e91c9a1c0a80950d7e7a658",
            "d34281d8afd8453e3ffa2a916e30c70374b4f1610ad7c5858deab716b0b950f5",
        ),
        "random-weights-clipped": (
            "eb88b4c85e9665736a505341ca8287d9432768f4e891a0f4ce8dd9ffb27724e8",
            "d34281d8afd8453e3ffa2a916e30c70374b4f1610ad7c5858deab716b0b950f5",
        ),
        "evaluation": (None, "207e8cb865d2995e16a653fa5583bb5931c8b1b9c202421d61479ff1ff6d4dba"),
    },
}

# Fixed, so that the subjects' keys, and with them the train/validation split, are too.
SITE_SECRET = "fixed-test-secret-0123456789"


def plan(**overrides: Any) -> dict[str, Any]:
    """A 2-level U-Net, two epochs of three steps on the generated site: about a second.

    Written out here rather than taken from a shared fixture: the recorded values depend on
    every key, and a fixture may change for other tests.
    """
    p: dict[str, Any] = {
        "dataset": "brain",
        "model": {
            "name": "unet",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 1,
            "channels": [4, 8],
            "strides": [2],
            "num_res_units": 0,
        },
        "local_epochs": 2,
        "batch_size": 8,
        "optimizer": {"name": "adam", "lr": 0.001},
        "loss": "log_dice",
        "seed": 5,
        "send": "weights",
        "data": {
            "spatial_dims": 2,
            "roi_size": [32, 32],
            "label_slice_fraction": 0.5,
            "samples_per_subject": 8,
        },
    }
    p.update(overrides)
    return p


# name -> (plan, whether the coordinator sends weights). The cases cover a diff with an
# excluded layer, a random start without weights, and a random start with weights, whose
# clipping is then measured against the weights received (what the coordinator holds).
CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "global-diff-excluded": (
        plan(round_id="r-a", send="diff", privacy={"exclude_parameters": ["model.0.*"]}),
        True,
    ),
    "random-no-weights": (plan(round_id="r-b", init="random"), False),
    "random-weights-clipped": (plan(round_id="r-c", init="random", privacy={"clip_norm": 0.5}), True),
}


def arithmetic_fingerprint() -> str:
    """What this machine computes for a few seeded convolution and Adam steps (one thread)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 1, 32, 32, generator=g)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, stride=2, padding=1),
            torch.nn.InstanceNorm2d(4, affine=True),
            torch.nn.PReLU(),
            torch.nn.ConvTranspose2d(4, 1, 3, stride=2, padding=1, output_padding=1),
        )
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for _ in range(2):
            opt.zero_grad()
            net(x).sigmoid().mean().backward()
            opt.step()
        h = hashlib.sha256()
        for p in net.parameters():
            h.update(p.detach().numpy().tobytes())
        return h.hexdigest()
    finally:
        torch.use_deterministic_algorithms(deterministic)


def initial_weights(p: dict[str, Any]) -> bytes:
    torch.manual_seed(11)
    return encode_weights(exchanged_state(build_model(parse_plan(p))))


def result_digest(metrics: dict[str, Any], num_samples: int | None, progress: dict[str, Any]) -> str:
    record = {"metrics": metrics, "num_samples": num_samples, "progress": progress}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


@dataclass
class Outcome:
    update: bytes | None
    metrics: dict[str, Any]
    num_samples: int | None
    progress: dict[str, Any]

    @property
    def digests(self) -> tuple[str | None, str]:
        sha = hashlib.sha256(self.update).hexdigest() if self.update is not None else None
        return sha, result_digest(self.metrics, self.num_samples, self.progress)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[str]:
    """Torch on one thread for this module; yields the arithmetic fingerprint."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield arithmetic_fingerprint()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> GeneratedSite:
    return make_site(
        tmp_path_factory.mktemp("repro") / "fed",
        subjects=4,
        size=32,
        fmt="nifti",
        seed=7,
        overrides={"site": {"secret": SITE_SECRET}},
    )


@pytest.fixture(scope="module")
def service(site: GeneratedSite, one_thread: str) -> Iterator[SiteService]:
    cfg = load_config(site.config_path)
    cfg.device = "cpu"
    svc = SiteService.open(cfg)  # the scheduler is not started: the jobs run in this process
    svc.scan()
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture(scope="module")
def outcomes(service: SiteService) -> dict[str, Outcome]:
    """Every case through the worker, in order (the evaluation scores round r-b's update)."""
    out: dict[str, Outcome] = {}
    for name, (p, sends_weights) in CASES.items():
        service.start_round(json.dumps(p), initial_weights(p) if sends_weights else None, "token:test")
        out[name] = run_claimed_job(service, "train", p["round_id"])
    evaluation = plan(round_id="e-a")
    service.start_evaluation(json.dumps(evaluation), service.gate.read_released("r-b"), "token:test")
    out["evaluation"] = run_claimed_job(service, "evaluate", "e-a")
    return out


def run_claimed_job(service: SiteService, kind: str, round_id: str) -> Outcome:
    job = service.store.claim_next(actor="agent")
    assert job is not None and job.round_id == round_id
    worker = Worker()
    try:
        worker.run({"config": config_for_worker(service.cfg), "job_id": job.id, "parent_pid": os.getpid()})
    finally:
        worker.close()
    done = service.store.get(kind, round_id)
    assert done is not None and done.status == "completed", done
    update = service.gate.read_released(round_id) if kind == "train" else None
    if update is not None:
        assert hashlib.sha256(update).hexdigest() == done.update_sha256
    return Outcome(update, done.metrics, done.num_samples, done.progress)


def reference_round(service: SiteService, name: str, tmp: Path) -> Outcome:
    """The round trained through the engine and the egress gate directly (the old worker's path)."""
    p, sends_weights = CASES[name]
    parsed = parse_plan(p)
    items = dataset_items(service.db, parsed.dataset)
    train = [i for i in items if i.split == "train"]
    val = [i for i in items if i.split == "val"]
    weights = None
    if sends_weights:
        weights = decode_weights(initial_weights(p), expected=expected_shapes(parsed), max_bytes=1 << 30)
    ctx = EngineContext(device="cpu", work_dir=tmp / name, cache_dir=service.cfg.work_dir / "cache")
    result = train_round(parsed, weights, train, val, ctx)

    class Sink:
        def append(self, action: str, *, actor: str, details: dict[str, Any]) -> int:
            return 0

        def find(self, action: str, **match: Any) -> list[dict[str, Any]]:
            return []

    egress: EgressConfig = service.cfg.egress
    gate = EgressGate(Sink(), tmp / "outbox", egress)
    base = result.global_weights if result.global_weights is not None else weights
    released = gate.release(
        round_id=str(p["round_id"]), plan=parsed, update=result.update, global_weights=base, kind=parsed.send
    )
    return Outcome(released.path.read_bytes(), json_safe(result.metrics), result.num_samples, {})


@pytest.mark.parametrize("name", list(CASES))
def test_a_round_through_the_worker_matches_the_engine_and_gate_directly(
    service: SiteService, outcomes: dict[str, Outcome], name: str, tmp_path: Path
) -> None:
    got = outcomes[name]
    ref = reference_round(service, name, tmp_path)
    assert got.update == ref.update
    assert got.metrics == ref.metrics and got.num_samples == ref.num_samples


@pytest.mark.parametrize("name", [*CASES, "evaluation"])
def test_a_round_gives_the_update_recorded_before(
    one_thread: str, outcomes: dict[str, Outcome], name: str
) -> None:
    recorded = RECORDED.get(one_thread)
    if recorded is None:
        pytest.skip(
            f"no values recorded for this machine's arithmetic (fingerprint {one_thread}); "
            "the comparison with the engine and the gate directly still holds"
        )
    assert outcomes[name].digests == recorded[name]
