"""The coordinator: drives one strategy over the agents of a federation, over HTTP.

The strategy (coordinator/strategies/) decides what each round asks of which sites and how
the results combine; the `Coordinator` is everything else: it checks the agents before the run
(preflight), trains at a site (plan and weights out, a hash-checked update back), evaluates at
a site, and records every round (results.json, the global model per round, the Dice plot).

A site is reached by its API (a push site, `AgentClient`) or reaches the coordinator's relay
(a pull site, `coordinator.relay.client.RelaySiteClient`); `site_clients` builds the one each
entry of the federation needs, and everything below is the same for both.

After every round (a FedAvg round, an IIL visit, a CIIL cycle) the global model is evaluated
at every site through /v1/evaluations and the sample-weighted mean Dice is recorded.
The coordinator never sees data: it sends a plan and weights, and gets weights and metrics.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from coordinator.aggregate import UpdateKind
from coordinator.client import RemoteJobStatus, SiteClient
from coordinator.errors import AgentError, AgentTlsError, JobTimeout, RunError
from coordinator.federation import Federation
from coordinator.options import RunOptions
from coordinator.relay.client import RelaySiteClient, site_clients
from coordinator.relay.store import RelayStore
from coordinator.report import QuietReporter, Reporter, RunRecorder, progress_fraction, progress_text
from coordinator.strategies import STRATEGIES
from coordinator.strategies.base import Round, SiteResult, Strategy
from coordinator.weights import decode, encode

_A = TypeVar("_A")
_T = TypeVar("_T")


@dataclass
class RunResult:
    out_dir: Path
    results_path: Path
    plot_path: Path | None
    rounds: list[dict[str, Any]]
    final_weights: dict[str, torch.Tensor]
    final_model_path: Path
    doc: dict[str, Any] = field(default_factory=dict)


def new_run_id() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


@dataclass
class _SiteJob:
    """A training job at one site that has ended, with the counters read at its start."""

    site: str
    client: SiteClient
    job: str
    status: RemoteJobStatus
    sent0: int
    recv0: int
    t0: float

    def result(self, tensors: dict[str, torch.Tensor], num_samples: int, update_sha256: str) -> SiteResult:
        sent1, recv1 = self.client.transfer.snapshot()
        return SiteResult(
            site=self.site,
            round_id=self.job,
            tensors=tensors,
            num_samples=num_samples,
            metrics=dict(self.status.metrics),
            update_sha256=update_sha256,
            bytes_sent=sent1 - self.sent0,
            bytes_received=recv1 - self.recv0,
            duration_s=round(time.monotonic() - self.t0, 3),
        )


class Coordinator:
    """Drives one run of one strategy over the agents of a federation (the strategy's RunContext)."""

    def __init__(
        self,
        federation: Federation,
        plan: dict[str, Any],
        out_dir: Path,
        options: RunOptions,
        *,
        initial_weights: dict[str, torch.Tensor],
        clients: Mapping[str, SiteClient] | None = None,
        reporter: Reporter | None = None,
        relay_store: RelayStore | None = None,
    ) -> None:
        strategy_class = STRATEGIES.get(options.strategy)
        if strategy_class is None:
            raise RunError(f"unknown strategy {options.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if options.rounds < 1:
            raise RunError(f"rounds must be at least 1, got {options.rounds}")
        self.fed = federation
        self.plan = dict(plan)
        # The coordinator names every job and its run itself (a plan's own would collide).
        self.plan.pop("round_id", None)
        self.plan.pop("run_id", None)
        self.out_dir = out_dir
        self.opts = options
        self.run_id = options.run_id or new_run_id()
        self.kind: UpdateKind = "diff" if self.plan.get("send") == "diff" else "weights"
        self.order = self._order(options.order)
        self.outside = list(federation.outside_names)
        self.global_weights = {k: v.detach().to(torch.float32).clone() for k, v in initial_weights.items()}
        try:
            self.strategy: Strategy = strategy_class(options, self.order)
        except ValueError as exc:
            raise RunError(f"strategy {options.strategy}: {exc}") from None
        self._own_clients = clients is None
        self._own_store: RelayStore | None = None
        if clients is None and relay_store is None and federation.pull_names and federation.relay:
            relay_store = self._own_store = RelayStore.from_settings(federation.relay)
        try:
            self.clients: Mapping[str, SiteClient] = (
                clients if clients is not None else site_clients(federation, store=relay_store)
            )
        except BaseException:
            if self._own_store is not None:
                self._own_store.close()
            raise
        for client in self.clients.values():
            if isinstance(client, RelaySiteClient):
                # The strategy says what a pull site's expired lease does to its task.
                client.on_expiry = self.strategy.lease_expiry
        self.reporter = reporter or QuietReporter()
        self._recorder: RunRecorder | None = None
        self._stop = threading.Event()

    @property
    def min_sites(self) -> int:
        return self.fed.min_sites

    @property
    def recorder(self) -> RunRecorder:
        """The records of the run in progress."""
        if self._recorder is None:
            raise RunError("no run in progress")
        return self._recorder

    # -- entry point -----------------------------------------------------------------------

    def run(self) -> RunResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        recorder = self._recorder = RunRecorder(self.out_dir, self._header())
        title = f"{self.run_id}: {self.strategy.title} over {', '.join(self.order)}"
        self.reporter.start(title, self.order + self.outside)
        try:
            self.preflight()
            rel, sha = recorder.save_model(0, encode(self.global_weights), "initial.safetensors")
            recorder.doc["initial_model"] = {"path": rel, "sha256": sha}
            self.strategy.run(self)
            final = self._final()
        except KeyboardInterrupt:
            self._stop.set()
            recorder.finish("interrupted", error="interrupted by the user")
            raise
        except Exception as exc:
            self._stop.set()
            recorder.finish("failed", error=str(exc))
            raise
        finally:
            self.reporter.stop()
            if self._own_clients:
                for client in self.clients.values():
                    client.close()
            if self._own_store is not None:
                self._own_store.close()
        recorder.finish("completed", final=final)
        return RunResult(
            out_dir=self.out_dir,
            results_path=recorder.results_path,
            plot_path=recorder.plot_path if recorder.plot_path.exists() else None,
            rounds=recorder.doc["rounds"],
            final_weights=self.global_weights,
            final_model_path=self.out_dir / final["model"],
            doc=recorder.doc,
        )

    def _final(self) -> dict[str, Any]:
        """The final model, its Dice inside the federation and, if any, at the outside sites."""
        recorder = self.recorder
        data = encode(self.global_weights)
        final_rel, final_sha = recorder.save_model(0, data, "final.safetensors")
        final: dict[str, Any] = {"model": final_rel, "model_sha256": final_sha}
        if recorder.doc["rounds"]:
            last = recorder.doc["rounds"][-1]
            final["weighted_dice"] = last.get("weighted_dice")
            final["evaluation"] = last.get("evaluation", {})
            if "outside_evaluation" in last:
                final["outside_evaluation"] = last["outside_evaluation"]
                final["outside_weighted_dice"] = last["outside_weighted_dice"]
        if not final.get("evaluation") and self.opts.evaluate_final:
            final["evaluation"], final["weighted_dice"] = self.evaluate_everywhere(data, "final")
        if self.outside and self.opts.evaluate_outside == "final":
            out_eval, out_mean = self.evaluate_everywhere(data, "final-out", self.outside)
            final["outside_evaluation"] = out_eval
            final["outside_weighted_dice"] = out_mean
        return final

    def parallel(self, fn: Callable[[_A], _T], items: Sequence[_A]) -> list[_T]:
        """FN for every item (a site, a job) at once; on Ctrl-C the other jobs are abandoned and cancelled."""
        with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
            try:
                return list(pool.map(fn, items))
            except BaseException:
                self._stop.set()
                raise

    def stop(self) -> None:
        """Ask a running run to abandon its jobs (they are cancelled at the agents)."""
        self._stop.set()

    # -- set-up ----------------------------------------------------------------------------

    def _order(self, order: Sequence[str] | None) -> list[str]:
        names = self.fed.names
        if order is None:
            return list(names)
        unknown = [s for s in order if s not in names]
        if unknown:
            raise RunError(f"order names site(s) not in the federation: {', '.join(unknown)}")
        dupes = sorted({s for s in order if list(order).count(s) > 1})
        if dupes:
            raise RunError(f"order lists site(s) twice: {', '.join(dupes)}")
        return list(order)

    def _header(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "strategy": self.opts.strategy,
            "strategy_settings": self.strategy.settings(),
            "round_label": self.strategy.round_label,
            "sites": self.order,
            "outside_sites": self.outside,
            # The sites reached through the relay (outbound-only); the others through their API.
            "pull_sites": self.fed.pull_names,
            "min_sites": self.fed.min_sites,
            "update_kind": self.kind,
            "plan": self.plan,
            "options": {
                "rounds": self.opts.rounds,
                "patience": self.opts.patience,
                "max_epochs": self.opts.max_epochs,
                "order": self.order,
                "reseed_rounds": self.opts.reseed_rounds,
            },
        }

    def preflight(self) -> None:
        """Ask every agent for its info: a refused token or a missing dataset stops the run here.

        A pull site that has not connected to the relay yet is waited for, up to the relay's
        `register_wait_s`, before it counts as unreachable."""
        dataset = self.plan.get("dataset")
        infos: dict[str, Any] = {}
        unreachable: list[str] = []

        def one(site: str) -> tuple[str, dict[str, Any] | None, AgentError | None]:
            client = self.clients[site]
            try:
                if isinstance(client, RelaySiteClient) and client.store.site_info(site) is None:
                    self.reporter.site(site, "waiting for the site to connect to the relay", None)
                    client.wait_registered()
                return site, client.info(), None
            except AgentError as exc:
                return site, None, exc

        everyone = self.order + self.outside
        answers = self.parallel(one, everyone)
        for site, info, err in answers:
            if err is not None:
                # A refusal (4xx) or a certificate that cannot be trusted is a configuration
                # problem that asking again each round cannot fix: stop with its cause.
                if isinstance(err, AgentTlsError) or (err.status_code is not None and err.status_code < 500):
                    raise err
                if site in self.order:
                    unreachable.append(site)
                self.reporter.warning(
                    f"{site} is not reachable now ({err}); it will be asked again each round"
                )
                continue
            assert info is not None
            names = [d.get("name") for d in info.get("datasets", []) if isinstance(d, dict)]
            if dataset is not None and dataset not in names:
                have = ", ".join(map(str, names)) or "none"
                raise RunError(f"{site}: the plan's dataset {dataset!r} is not at this site (it has: {have})")
            keep = ("site_id", "version", "device", "datasets", "audit_public_key")
            infos[site] = {k: info.get(k) for k in keep if k in info}
        if len(self.order) - len(unreachable) < self.fed.min_sites:
            raise RunError(
                f"only {len(self.order) - len(unreachable)} site(s) reachable, fewer than min_sites="
                f"{self.fed.min_sites}; unreachable: {', '.join(unreachable)}"
            )
        self.recorder.doc["site_info"] = infos

    # -- one site, one job -----------------------------------------------------------------

    def _job_plan(self, plan: dict[str, Any], job_id: str) -> dict[str, Any]:
        # Imported here: the plan module brings MONAI (the model registry), which every
        # `fedsite` command would otherwise load at start.
        from agent.training.plan import job_plan

        return job_plan(plan, job_id, self.run_id)

    def _train_job(self, site: str, plan: dict[str, Any], weights: bytes, round_id: str) -> _SiteJob:
        """Start a training job at SITE and wait for its end, showing its progress; the job's
        final status with what the transfer counters and the clock read at its start."""
        client = self.clients[site]
        sent0, recv0 = client.transfer.snapshot()
        t0 = time.monotonic()
        self.reporter.site(site, "sending plan and weights", 0.0)
        job = client.start_round(self._job_plan(plan, round_id), weights)

        def show(status: RemoteJobStatus) -> None:
            text = progress_text(status.progress)
            self.reporter.site(site, f"{status.status} {text}".strip(), progress_fraction(status.progress))

        try:
            status = client.wait(
                "round", job, timeout=self.fed.timeouts.round, on_status=show, should_stop=self._stop.is_set
            )
        except AgentError as exc:
            if isinstance(exc, JobTimeout) or self._stop.is_set():
                self._cancel_quietly(client, job)
            raise
        if status.audit_anchor is not None:
            # Kept for the site's privacy officer (fedsite audit verify --anchors), whatever
            # becomes of the update.
            self.recorder.add_anchor(site, status.audit_anchor)
        return _SiteJob(site, client, job, status, sent0, recv0, t0)

    def train_at(self, site: str, plan: dict[str, Any], weights: bytes, round_id: str) -> SiteResult:
        """One training job at SITE, from WEIGHTS; raises AgentError when it brings nothing usable."""
        run = self._train_job(site, plan, weights, round_id)
        status, job = run.status, run.job
        if status.num_samples is None or status.num_samples <= 0:
            raise AgentError(
                site, f"round {job} completed without a positive num_samples ({status.num_samples})"
            )
        self.reporter.site(site, "downloading update", 1.0)
        data = run.client.download_update(job, status.update_sha256)
        try:
            tensors = decode(data, expected={k: tuple(v.shape) for k, v in self.global_weights.items()})
        except ValueError as exc:
            raise AgentError(site, f"update of round {job} is not usable: {exc}") from None
        if self.opts.keep_updates:
            folder = self.out_dir / "updates"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{round_id}.safetensors").write_bytes(data)
        self.reporter.site(site, "update received", 1.0)
        return run.result(tensors, status.num_samples, str(status.update_sha256))

    def train_held(self, site: str, plan: dict[str, Any], weights: bytes, round_id: str) -> SiteResult:
        """One training job at SITE whose update the site keeps (a secure-aggregation round): the
        job's status and metrics, no update. What leaves comes later, masked (`secagg_mask`)."""
        run = self._train_job(site, plan, weights, round_id)
        self.reporter.site(site, "trained; update kept at the site", 1.0)
        return run.result({}, int(run.status.num_samples or 0), "")

    def site_client(self, site: str) -> SiteClient:
        """SITE's transport, for the steps a strategy runs itself (secure aggregation)."""
        return self.clients[site]

    def secagg_public_keys(self) -> dict[str, str | None]:
        """Each training site's pinned secure-aggregation key (federation file), None where unset."""
        return {a.name: a.secagg_public_key for a in self.fed.agents}

    def _cancel_quietly(self, client: SiteClient, job: str) -> None:
        try:
            client.cancel_round(job)
        except AgentError as exc:
            self.reporter.warning(f"could not cancel round {job}: {exc}")

    def evaluate_at(self, site: str, weights: bytes, eval_id: str) -> dict[str, Any]:
        client = self.clients[site]
        sent0, recv0 = client.transfer.snapshot()
        t0 = time.monotonic()
        plan = {k: v for k, v in self.plan.items() if k != "early_stopping"}
        self.reporter.site(site, "evaluating", None)
        job = client.start_evaluation(self._job_plan(plan, eval_id), weights)
        status = client.wait(
            "evaluation", job, timeout=self.fed.timeouts.evaluation, should_stop=self._stop.is_set
        )
        sent1, recv1 = client.transfer.snapshot()
        dice = status.metrics.get("dice")
        if not isinstance(dice, int | float):
            raise AgentError(site, f"evaluation {job} completed without a 'dice' metric")
        self.reporter.site(site, f"Dice {float(dice):.3f}", 1.0)
        return {
            "evaluation_id": job,
            "dice": float(dice),
            "num_samples": status.num_samples or 0,
            "metrics": dict(status.metrics),
            "bytes_sent": sent1 - sent0,
            "bytes_received": recv1 - recv0,
            "duration_s": round(time.monotonic() - t0, 3),
        }

    def evaluate_everywhere(
        self, weights: bytes, tag: str, sites: Sequence[str] | None = None
    ) -> tuple[dict[str, dict[str, Any]], float | None]:
        """Evaluate WEIGHTS at every site; returns per-site results and the sample-weighted mean Dice."""
        results: dict[str, dict[str, Any]] = {}
        sites = list(self.order if sites is None else sites)
        if not sites:
            return results, None

        def one(site: str) -> tuple[str, dict[str, Any] | None, str | None]:
            try:
                return site, self.evaluate_at(site, weights, f"{self.run_id}-{tag}-eval-{site}"), None
            except AgentError as exc:
                return site, None, str(exc)

        for site, res, err in self.parallel(one, sites):
            if res is not None:
                results[site] = res
            else:
                self.reporter.warning(f"evaluation at {site} failed, left out of the mean Dice: {err}")
                results[site] = {"error": err}
        return results, weighted_dice(results)

    # -- recording -----------------------------------------------------------------------

    def finish_round(
        self, rnd: Round, trained: Sequence[SiteResult], left_out: Sequence[dict[str, str]]
    ) -> dict[str, Any]:
        """Store the round's global model, evaluate it at every site and add the round to results.json."""
        recorder = self.recorder
        index = rnd.index
        data = encode(self.global_weights)
        rel, sha = recorder.save_model(index, data)
        evaluation: dict[str, dict[str, Any]] = {}
        mean: float | None = None
        outside: dict[str, Any] = {}
        if self.opts.evaluate:
            evaluation, mean = self.evaluate_everywhere(data, f"r{index:03d}")
            if self.opts.evaluate_outside == "every" and self.outside:
                out_eval, out_mean = self.evaluate_everywhere(data, f"r{index:03d}", self.outside)
                outside = {"outside_evaluation": out_eval, "outside_weighted_dice": out_mean}
        training = {
            r.site: {
                "round_id": r.round_id,
                "num_samples": r.num_samples,
                "metrics": r.metrics,
                "update_sha256": r.update_sha256,
                "bytes_sent": r.bytes_sent,
                "bytes_received": r.bytes_received,
                "duration_s": r.duration_s,
            }
            for r in trained
        }
        record = {
            "index": index,
            "label": rnd.label,
            "participants": [r.site for r in trained],
            "left_out": list(left_out),
            "training": training,
            "evaluation": evaluation,
            "weighted_dice": mean,
            "bytes_sent": sum(r.bytes_sent for r in trained)
            + sum(int(e.get("bytes_sent", 0)) for e in evaluation.values()),
            "bytes_received": sum(r.bytes_received for r in trained)
            + sum(int(e.get("bytes_received", 0)) for e in evaluation.values()),
            "duration_s": round(time.monotonic() - rnd.started, 3),
            "model": rel,
            "model_sha256": sha,
            **outside,
        }
        recorder.add_round(record)
        self.reporter.round_done(record)
        return record


def weighted_dice(results: dict[str, dict[str, Any]]) -> float | None:
    """Sample-weighted mean Dice over the sites that answered (None when none did)."""
    num = 0.0
    den = 0
    for r in results.values():
        dice, n = r.get("dice"), r.get("num_samples")
        if isinstance(dice, float) and isinstance(n, int) and n > 0:
            num += dice * n
            den += n
    return num / den if den else None


def run_strategy(
    federation: Federation,
    plan: dict[str, Any],
    out_dir: Path,
    options: RunOptions,
    *,
    initial_weights: dict[str, torch.Tensor],
    reporter: Reporter | None = None,
    on_client: Callable[[dict[str, SiteClient]], None] | None = None,
    relay_store: RelayStore | None = None,
) -> RunResult:
    """Convenience wrapper: build clients, run, close. Pull sites go through RELAY_STORE (the
    store of the relay that `fedsite coordinate` serves); without one, the store of the
    federation's relay section is opened here (a relay served by another process)."""
    own_store: RelayStore | None = None
    if relay_store is None and federation.pull_names and federation.relay is not None:
        relay_store = own_store = RelayStore.from_settings(federation.relay)
    try:
        clients = site_clients(federation, store=relay_store)
    except BaseException:
        if own_store is not None:
            own_store.close()
        raise
    if on_client is not None:
        on_client(clients)
    try:
        return Coordinator(
            federation,
            plan,
            out_dir,
            options,
            initial_weights=initial_weights,
            clients=clients,
            reporter=reporter,
        ).run()
    finally:
        for c in clients.values():
            c.close()
        if own_store is not None:
            own_store.close()
