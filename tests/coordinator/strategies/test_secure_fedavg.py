"""Secure FedAvg over HTTP with real agents (`fedsite serve` subprocesses) on loopback ports.

One federation of five agents serves the module; each scenario trains a tiny model once. The
coordinator's transport to a site is wrapped where a scenario needs a coordinator that
tampers with the protocol or a site that dies at a given step. The plaintext reference is
read from the sites' own disks (the update each agent held back), never from the coordinator.
The scenario that kills agents runs last.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from safetensors.torch import load as st_load

from agent.audit.chain import AuditLog
from agent.config import load_config
from agent.db.engine import open_database
from agent.exchange.secagg import (
    AdvertiseBundle,
    error_bound,
    generate_site_key,
    public_key_b64,
    write_site_key,
)
from agent.exchange.secagg.primitives import b64e, sign
from coordinator.client import SiteClient
from coordinator.errors import AgentError, AgentUnreachable, RoundFailed
from coordinator.federation import AgentEntry, Federation
from coordinator.options import RunOptions
from coordinator.relay.client import site_clients
from coordinator.relay.store import RelayStore
from coordinator.report import QuietReporter
from coordinator.runner import Coordinator
from coordinator.weights import encode, initial_weights
from tests.fixtures.coordinator import RealFederation, real_federation, results, tiny_plan
from tests.fixtures.relay import RelayEnv, relay_env, relay_in_thread

pytestmark = pytest.mark.timeout(600)

SITES = ["site-1", "site-2", "site-3", "site-4", "site-5"]
MAX_WEIGHT = 1000
CLIP = 0.5


def secure_plan(threshold: int) -> dict[str, Any]:
    return tiny_plan(
        send="diff",
        aggregation={"mode": "secure", "threshold": threshold, "clip": CLIP, "max_weight": MAX_WEIGHT},
    )


@dataclass
class SecureFederation:
    real: RealFederation
    public_keys: dict[str, str]
    # The relay that site-3 (connect.mode both) also polls, served in this process.
    relay: RelayEnv
    store: RelayStore

    def federation(self, sites: list[str], min_sites: int = 1, pull: tuple[str, ...] = ()) -> Federation:
        """SITES with their pinned keys; those in PULL reached through the relay (outbound mode)."""
        fed = self.real.federation(min_sites=min_sites)
        fed.relay = self.relay.federation().relay
        fed.agents = [
            a if a.name not in pull else AgentEntry(name=a.name, pull=True)
            for a in fed.agents
            if a.name in sites
        ]
        for entry in fed.agents:
            entry.secagg_public_key = self.public_keys[entry.name]
        return fed

    def work_dir(self, site: str) -> Path:
        return load_config(self.real.configs[site], check_paths=False).work_dir

    def held(self, site: str, round_id: str) -> dict[str, torch.Tensor]:
        """The update SITE kept back for ROUND_ID, read from the site's own disk."""
        return st_load((self.work_dir(site) / "secagg" / round_id / "update.safetensors").read_bytes())

    def audit(self, site: str, action: str) -> list[dict[str, Any]]:
        db = open_database(load_config(self.real.configs[site], check_paths=False).db_url)
        try:
            return AuditLog(db).find(action)
        finally:
            db.dispose()


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureFederation]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("secagg")
    keys = {site: generate_site_key() for site in SITES}
    public = {site: public_key_b64(key) for site, key in keys.items()}

    relay = relay_env(root / "relay", pull=["site-3"], lease_s=30.0, heartbeat_s=0.5)
    store = relay.store()

    def prepare(configs: dict[str, Path]) -> None:
        for site, path in configs.items():
            key_file = path.parent / "secagg.key"
            write_site_key(key_file, keys[site])
            doc = yaml.safe_load(path.read_text())
            doc["secure_aggregation"] = {
                "site_key_file": str(key_file),
                "peers": public,
                # site-5 accepts no secure round with a threshold below 3.
                "min_threshold": 3 if site == "site-5" else 2,
                "min_sites": 3,
            }
            if site == "site-3":  # its push API for most tests, the relay for the outbound one
                doc["connect"] = {
                    "mode": "both",
                    "coordinator_url": server.url,
                    "token_file": str(relay.token_files[site]),
                    "poll_wait_s": 1.0,
                    "heartbeat_s": 0.5,
                    "max_backoff_s": 1.0,
                }
            path.write_text(yaml.safe_dump(doc, sort_keys=False))

    try:
        with (
            relay_in_thread(store) as server,
            real_federation(root, subjects=[4, 3, 5, 3, 4], size=32, prepare=prepare) as real,
        ):
            yield SecureFederation(real, public, relay, store)
    finally:
        store.close()


class Recorder(QuietReporter):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def warning(self, message: str) -> None:
        self.lines.append(message)

    def info(self, message: str) -> None:
        self.lines.append(message)

    def site(self, site: str, text: str, fraction: float | None = None) -> None:
        self.lines.append(f"{site}: {text}")


class Wrapped:
    """A site's transport with hooks: REWRITE changes a step's message, BEFORE / AFTER run around a step."""

    def __init__(
        self,
        inner: SiteClient,
        *,
        rewrite: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
        before: Callable[[str], None] | None = None,
        after: Callable[[str], None] | None = None,
    ) -> None:
        self.inner = inner
        self.rewrite = rewrite
        self.before = before
        self.after = after

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _around(self, step: str, message: dict[str, Any], call: Callable[[dict[str, Any]], Any]) -> Any:
        if self.before is not None:
            self.before(step)
        if self.rewrite is not None:
            message = self.rewrite(step, message)
        answer = call(message)
        if self.after is not None:
            self.after(step)
        return answer

    def secagg(self, round_id: str, step: str, message: dict[str, Any]) -> dict[str, Any]:
        return self._around(step, message, lambda m: self.inner.secagg(round_id, step, m))

    def secagg_mask(self, round_id: str, message: dict[str, Any]) -> tuple[bytes, str]:
        return self._around("mask", message, lambda m: self.inner.secagg_mask(round_id, m))


@dataclass
class Run:
    out: Path
    fed: Federation
    plan: dict[str, Any]
    reporter: Recorder
    logs: list[str]
    error: Exception | None


def run_secure(
    sfed: SecureFederation,
    sites: list[str],
    plan: dict[str, Any],
    out: Path,
    run_id: str,
    wrap: dict[str, Callable[[SiteClient], Any]] | None = None,
    pull: tuple[str, ...] = (),
) -> Run:
    fed = sfed.federation(sites, pull=pull)
    clients: dict[str, Any] = dict(site_clients(fed, store=sfed.store))
    for site, make in (wrap or {}).items():
        clients[site] = make(clients[site])
    reporter = Recorder()
    logs: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logs.append(self.format(record))

    handler = Keep(level=logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.DEBUG)
    options = RunOptions(
        strategy="secure_fedavg", rounds=1, evaluate=False, evaluate_final=False, run_id=run_id
    )
    error: Exception | None = None
    try:
        Coordinator(
            fed, plan, out, options, initial_weights=initial_weights(plan), clients=clients, reporter=reporter
        ).run()
    except (RoundFailed, AgentUnreachable) as exc:
        error = exc
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        for client in clients.values():
            client.close()
    return Run(out, fed, plan, reporter, logs, error)


def check_secure_mean(sfed: SecureFederation, run: Run, contributors: list[str]) -> dict[str, Any]:
    """The round's model minus the start equals the sample-weighted mean of the contributors' held
    (clamped) updates within the quantisation bound computed from the round's parameters."""
    doc = results(run.out)
    rnd = doc["rounds"][0]
    assert not rnd.get("failed"), rnd
    assert sorted(rnd["participants"]) == sorted(contributors)
    report = rnd["secure_aggregation"]
    start = initial_weights(run.plan)
    model = st_load((run.out / rnd["model"]).read_bytes())
    weights = {s: rnd["training"][s]["num_samples"] for s in contributors}
    assert len(set(weights.values())) > 1, "the sites must differ in size for the weighting to matter"
    total = sum(weights.values())
    assert report["total_weight"] == total
    held = {s: sfed.held(s, rnd["training"][s]["round_id"]) for s in contributors}
    n = len(report["advertised"])
    bound = error_bound(n, MAX_WEIGHT, CLIP, total)
    assert bound == pytest.approx(report["error_bound"])
    assert 0 < bound < 1e-6
    worst = 0.0
    # How far training moved each tensor, in units of its slack. One small tensor (a final bias)
    # may barely move in one round, so the comparison is meaningful when the model as a whole
    # moved far beyond the bound: most tensors, and by a wide margin the largest move.
    moved: dict[str, float] = {}
    for name, g in start.items():
        expected = sum(held[s][name].double().clamp(-CLIP, CLIP) * weights[s] for s in contributors) / total
        got = model[name].double() - g.double()
        # The stored model is float32: its own rounding comes on top of the quantisation bound.
        slack = bound + 2 * float(model[name].abs().max()) * 2.0**-24
        err = float((got - expected).abs().max())
        assert err <= slack, f"{name}: {err} > {slack}"
        worst = max(worst, err)
        moved[name] = float(expected.abs().max()) / slack
    far = sorted(name for name, ratio in moved.items() if ratio > 100)
    assert len(far) * 2 > len(moved), f"training must move most tensors beyond the bound: {moved}"
    assert max(moved.values()) > 1000, f"training must move the model far beyond the bound: {moved}"
    return {"max_error": worst, "bound": bound, "report": report, "held": held, "round": rnd}


@pytest.fixture(scope="module")
def secure_run(fed: SecureFederation, tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, dict[str, Any]]:
    """Three sites, threshold 2; the coordinator asks site-1 for both shares of site-2 at the
    unmasking step (site-1 refuses; site-2 and site-3 are enough)."""

    def both_shares(step: str, message: dict[str, Any]) -> dict[str, Any]:
        if step == "unmask":
            return {**message, "dropped": sorted({*message["dropped"], "site-2"})}
        return message

    out = tmp_path_factory.mktemp("secure") / "out"
    run = run_secure(
        fed,
        ["site-1", "site-2", "site-3"],
        secure_plan(2),
        out,
        "secure",
        wrap={"site-1": lambda c: Wrapped(c, rewrite=both_shares)},
    )
    assert run.error is None, run.error
    return run, check_secure_mean(fed, run, ["site-1", "site-2", "site-3"])


def test_secure_round_equals_plaintext_fedavg_within_the_bound(
    fed: SecureFederation, secure_run: tuple[Run, dict[str, Any]]
) -> None:
    _, checked = secure_run
    rnd = checked["round"]
    for site in ("site-1", "site-2", "site-3"):
        round_id = rnd["training"][site]["round_id"]
        # The round's update endpoint never serves a secure round.
        resp = httpx.get(
            f"{fed.real.agents[site].url}/v1/rounds/{round_id}/update",
            headers={"Authorization": f"Bearer {fed.real.tokens[site]}"},
        )
        assert resp.status_code == 409 and "masked update" in resp.json()["detail"]
        # What left the site is the masked update, through the egress gate, with its hash.
        [held] = [e for e in fed.audit(site, "egress.held") if e["details"]["round_id"] == round_id]
        [released] = [e for e in fed.audit(site, "egress.update") if e["details"]["round_id"] == round_id]
        assert released["details"]["kind"] == "masked"
        assert (
            released["details"]["sha256"]
            == rnd["training"][site]["update_sha256"]
            != held["details"]["sha256"]
        )
        for action in ("secagg.advertised", "secagg.shared", "secagg.masked"):
            assert [e for e in fed.audit(site, action) if e["details"]["round_id"] == round_id], action
    assert checked["report"]["unmasked"] == ["site-2", "site-3"]


def test_asking_one_agent_for_both_shares_of_a_peer_is_refused_and_audited(
    fed: SecureFederation, secure_run: tuple[Run, dict[str, Any]]
) -> None:
    _, checked = secure_run
    round_id = checked["round"]["training"]["site-1"]["round_id"]
    [refused] = [e for e in fed.audit("site-1", "secagg.refused") if e["details"]["round_id"] == round_id]
    assert refused["details"]["step"] == "unmask" and refused["details"]["reason"] == "both_shares"
    assert "site-2" in refused["details"]["message"]
    assert not [e for e in fed.audit("site-1", "secagg.unmasked") if e["details"]["round_id"] == round_id]
    [left] = [x for x in checked["round"]["left_out"] if x["site"] == "site-1"]
    assert left["step"] == "unmask" and "both_shares" in left["reason"]


def test_an_unmask_asked_again_after_a_lost_answer_is_answered_the_same(
    fed: SecureFederation, tmp_path: Path
) -> None:
    """The coordinator's client retries a request whose answer it did not get (a timeout after
    the site answered): the site answers the same unmask request again with the same shares,
    and still refuses any other."""
    answers: list[dict[str, Any]] = []
    refusals: list[str] = []

    class LostAnswer(Wrapped):
        def secagg(self, round_id: str, step: str, message: dict[str, Any]) -> dict[str, Any]:
            if step != "unmask":
                return super().secagg(round_id, step, message)
            answers.append(self.inner.secagg(round_id, step, message))  # the answer that was lost
            answers.append(self.inner.secagg(round_id, step, message))
            other = {**message, "survivors": message["survivors"][1:], "dropped": message["survivors"][:1]}
            with pytest.raises(AgentError) as refused:
                self.inner.secagg(round_id, step, other)
            refusals.append(str(refused.value))
            return answers[-1]

    run = run_secure(
        fed,
        ["site-1", "site-2", "site-3"],
        secure_plan(2),
        tmp_path / "out",
        "lost-unmask",
        wrap={"site-3": lambda c: LostAnswer(c)},
    )
    assert run.error is None, run.error
    assert len(answers) == 2 and answers[0] == answers[1] and answers[0]["b_shares"]
    [refusal] = refusals
    assert "second_unmask" in refusal and "answers only that request again" in refusal
    checked = check_secure_mean(fed, run, ["site-1", "site-2", "site-3"])
    round_id = checked["round"]["training"]["site-3"]["round_id"]
    unmasked = [e for e in fed.audit("site-3", "secagg.unmasked") if e["details"]["round_id"] == round_id]
    assert len(unmasked) == 2  # each answer that left is on the record


def test_coordinator_stores_no_unmasked_site_update(
    fed: SecureFederation, secure_run: tuple[Run, dict[str, Any]]
) -> None:
    run, checked = secure_run
    held: dict[str, dict[str, torch.Tensor]] = checked["held"]
    start = initial_weights(run.plan)
    files = [p for p in run.out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    text = "\n".join([*run.logs, *run.reporter.lines])
    for site, update in held.items():
        for name, diff in update.items():
            if diff.numel() < 8:
                continue
            raw = diff.contiguous().numpy().tobytes()
            local = (start[name] + diff).contiguous().numpy().tobytes()
            probes = [raw[8:40], local[8:40]]
            for path in files:
                data = path.read_bytes()
                assert not any(p in data for p in probes), f"{path} holds {site}'s {name}"
                if path.suffix == ".safetensors":
                    for stored in st_load(data).values():
                        if stored.shape == diff.shape:
                            assert not torch.allclose(stored, diff, atol=1e-9), f"{path}: {site}'s update"
                            assert not torch.allclose(stored, start[name] + diff, atol=1e-9), path
            for value in diff.flatten()[:4].tolist():
                if abs(value) > 1e-6:
                    assert f"{value:.6g}" not in text, f"{site}'s {name} in the coordinator's logs"
    doc = json.loads((run.out / "results.json").read_text())
    assert set(doc["rounds"][0]["training"]["site-1"]) >= {"update_sha256", "num_samples"}
    # Per site: scalars and hashes only (the masked update's hash, never an update).
    for entry in doc["rounds"][0]["training"].values():
        assert all(not isinstance(v, list) for v in entry.values()), entry


def test_a_plan_weaker_than_the_site_accepts_is_refused_at_start_and_audited(fed: SecureFederation) -> None:
    site = "site-5"
    plan = {**secure_plan(2), "round_id": "too-weak"}
    weights = encode(initial_weights(plan))
    headers = {"Authorization": f"Bearer {fed.real.tokens[site]}"}
    with httpx.Client(base_url=fed.real.agents[site].url, headers=headers, timeout=60) as http:
        resp = http.post("/v1/rounds", files={"plan": (None, json.dumps(plan)), "weights": ("w", weights)})
        assert resp.status_code == 422, resp.text
        assert "plan.aggregation.threshold: 2 is below this site's minimum 3" in resp.json()["detail"]
        assert http.get("/v1/rounds/too-weak").status_code == 404
    [refused] = [e for e in fed.audit(site, "secagg.refused") if e["details"].get("round_id") == "too-weak"]
    assert refused["details"]["step"] == "start_round"
    assert refused["details"]["reason"] == "threshold_below_minimum"


def test_substituted_keys_are_refused_by_every_agent(fed: SecureFederation, tmp_path: Path) -> None:
    """A coordinator that swaps a site's round keys (signature left as it was), signs them with
    a key of its own, or sends them unsigned: every agent checks its roster and refuses."""
    attacker = generate_site_key()

    def tamper(victim: str, how: str) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
        def rewrite(step: str, message: dict[str, Any]) -> dict[str, Any]:
            if step != "share":
                return message
            bundles = [dict(b) for b in message["bundles"]]
            for b in bundles:
                if b["site_id"] == victim:
                    b["s_pk"] = public_key_b64(generate_site_key())  # any 32 bytes: the attacker's key
                    if how == "resigned":
                        b["signature"] = b64e(sign(attacker, AdvertiseBundle.from_dict(b).signed_bytes()))
                    elif how == "unsigned":
                        b["signature"] = b64e(bytes(64))
            return {**message, "bundles": bundles}

        return rewrite

    wrap = {
        "site-1": lambda c: Wrapped(c, rewrite=tamper("site-2", "swapped")),
        "site-2": lambda c: Wrapped(c, rewrite=tamper("site-3", "resigned")),
        "site-3": lambda c: Wrapped(c, rewrite=tamper("site-1", "unsigned")),
    }
    run = run_secure(fed, ["site-1", "site-2", "site-3"], secure_plan(2), tmp_path / "out", "swap", wrap)
    assert isinstance(run.error, RoundFailed)
    rnd = results(run.out)["rounds"][0]
    assert rnd["failed"] and rnd["failed_at"] == "share"
    for site, victim in (("site-1", "site-2"), ("site-2", "site-3"), ("site-3", "site-1")):
        refusals = [e for e in fed.audit(site, "secagg.refused") if e["details"]["run_id"] == "swap"]
        assert refusals[0]["details"]["step"] == "share"
        assert refusals[0]["details"]["reason"] == "bad_signature"
        assert victim in refusals[0]["details"]["message"]
        assert "bad_signature" in rnd["secure_aggregation"]["site_refusals"][site] or any(
            x["site"] == site and "bad_signature" in x["reason"] for x in rnd["left_out"]
        )
        assert not [e for e in fed.audit(site, "secagg.shared") if e["details"]["run_id"] == "swap"]
        assert "bad_signature" in fed.real.agents[site].log_tail(200)


def test_below_threshold_fails_cleanly_and_every_agent_says_why(
    fed: SecureFederation, tmp_path: Path
) -> None:
    """Threshold 3 of three sites; site-3's shares never reach the coordinator. The round stops
    before any masked update leaves, and each agent refuses the next step by its own check."""

    def lose_share(step: str) -> None:
        if step == "share":
            raise AgentUnreachable("site-3", "share: the answer was lost on the way")

    wrap = {"site-3": lambda c: Wrapped(c, after=lose_share)}
    run = run_secure(fed, ["site-1", "site-2", "site-3"], secure_plan(3), tmp_path / "out", "below", wrap)
    assert isinstance(run.error, RoundFailed)
    message = str(run.error)
    rnd = results(run.out)["rounds"][0]
    assert rnd["failed"] and rnd["failed_at"] == "share" and rnd["participants"] == []
    said = rnd["secure_aggregation"]["site_refusals"]
    assert set(said) == {"site-1", "site-2", "site-3"}
    expect = {"site-1": "below_threshold", "site-2": "below_threshold", "site-3": "not_a_member"}
    for site, reason in expect.items():
        assert reason in said[site] and f"{site} says" in message
        [refused] = [e for e in fed.audit(site, "secagg.refused") if e["details"]["run_id"] == "below"]
        assert refused["details"]["step"] == "mask" and refused["details"]["reason"] == reason
        # Nothing left the site: no masked update was released.
        assert not [e for e in fed.audit(site, "secagg.masked") if e["details"]["run_id"] == "below"]


def test_a_site_in_outbound_mode_takes_part_through_the_relay(fed: SecureFederation, tmp_path: Path) -> None:
    """site-3 reached only through the relay (its connector answers each step as a task of kind
    secagg): the same protocol, the same result, the masked update committed to the relay."""
    sites = ["site-1", "site-2", "site-3"]
    run = run_secure(fed, sites, secure_plan(2), tmp_path / "out", "outbound", pull=("site-3",))
    assert run.error is None, run.error
    checked = check_secure_mean(fed, run, sites)
    assert checked["report"]["unmasked"] == sites
    round_id = checked["round"]["training"]["site-3"]["round_id"]

    def committed_steps() -> list[str]:
        events = fed.audit("site-3", "connect.commit")
        return [e["details"]["step"] for e in events if e["details"].get("step")]

    # The connector records a commit once the relay has taken it, which can be just after the
    # coordinator, holding the answer, has finished the round: wait for the record, boundedly.
    deadline = time.monotonic() + 30
    while committed_steps()[-4:] != ["advertise", "share", "mask", "unmask"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert committed_steps()[-4:] == ["advertise", "share", "mask", "unmask"]
    [released] = [e for e in fed.audit("site-3", "egress.update") if e["details"]["round_id"] == round_id]
    assert released["details"]["kind"] == "masked"
    assert released["details"]["sha256"] == checked["round"]["training"]["site-3"]["update_sha256"]
    task = fed.store.find_task("site-3", "secagg", f"{round_id}:secagg:mask")
    assert task is not None and task.update_sha256 == released["details"]["sha256"]


def test_sites_killed_before_and_after_masking_leave_the_survivors_mean(
    fed: SecureFederation, tmp_path: Path
) -> None:
    """Five sites, threshold 3: site-5 dies before its masked update, site-4 right after sending
    it. The sum of sites 1-4 is unmasked by sites 1-3 (the shares of site-4's self-mask and of
    site-5's mask key); the model is their weighted mean. Runs last: it kills two agents."""

    def kill(site: str) -> Callable[[str], None]:
        def hook(step: str) -> None:
            if step == "mask":
                fed.real.agents[site].kill()

        return hook

    wrap = {
        "site-5": lambda c: Wrapped(c, before=kill("site-5")),
        "site-4": lambda c: Wrapped(c, after=kill("site-4")),
    }
    run = run_secure(fed, SITES, secure_plan(3), tmp_path / "out", "dropouts", wrap)
    assert run.error is None, run.error
    checked = check_secure_mean(fed, run, ["site-1", "site-2", "site-3", "site-4"])
    report = checked["report"]
    assert report["masked"] == ["site-1", "site-2", "site-3", "site-4"]
    assert report["unmasked"] == ["site-1", "site-2", "site-3"]
    left = {x["site"]: x["step"] for x in checked["round"]["left_out"]}
    assert left == {"site-5": "mask", "site-4": "unmask"}
    assert math.isfinite(checked["max_error"])
