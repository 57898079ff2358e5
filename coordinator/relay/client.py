"""`RelaySiteClient`: the runner's client for a pull site, and `site_clients`, which builds the
right client for every entry of a federation.

A pull site cannot be called: the runner's `start_round` queues a task in the relay's store
(the site fetches it on its next poll), `wait` watches the task until the site commits or
refuses it or its lease runs out, `download_update` reads the committed update from the
relay's disk, checked against the commit's SHA-256. The answers and errors are those of
`AgentClient` (`RemoteJobStatus`, `AgentPlanRefused`, `JobFailed`, `JobTimeout`, ...), so
the runner and the strategies do not know which kind of site they drive.

What a lease expiry does to a task is `on_expiry`, which the `Coordinator` sets from its
strategy (`Strategy.lease_expiry`): FedAvg re-queues, IIL and CIIL fail the visit.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

from agent.errors import Conflict, NotFound, ServiceError
from coordinator.client import AgentClient, RemoteJobStatus, SiteClient, job_ended, wait_left
from coordinator.errors import (
    AgentError,
    AgentPlanRefused,
    AgentUnreachable,
    JobFailed,
    RunError,
    UpdateIntegrityError,
)
from coordinator.federation import Federation
from coordinator.relay.models import RelayTask
from coordinator.relay.store import LEASE_POLICIES, RelayStore, SiteTraffic

_KINDS = {"round": "train", "evaluation": "evaluate"}
# The relay's task states as the agent's job states the runner knows.
_AS_JOB_STATUS = {"queued": "queued", "completed": "completed", "failed": "failed", "cancelled": "cancelled"}


class RelaySiteClient:
    """One pull site, driven through the relay's store; safe to use from one thread at a time."""

    def __init__(
        self,
        name: str,
        store: RelayStore,
        *,
        poll_interval: float = 1.0,
        register_wait_s: float = 60.0,
        on_expiry: str = "requeue",
        step_timeout: float = 60.0,
    ) -> None:
        if on_expiry not in LEASE_POLICIES:
            raise ValueError(f"on_expiry must be one of {', '.join(LEASE_POLICIES)}, got {on_expiry!r}")
        self._name = name
        self.store = store
        self.poll_interval = poll_interval
        self.register_wait_s = register_wait_s
        self.on_expiry = on_expiry
        # How long one secure-aggregation step may wait for the site's answer.
        self.step_timeout = step_timeout
        self.url = f"relay:{name}"

    @property
    def name(self) -> str:
        return self._name

    @property
    def transfer(self) -> SiteTraffic:
        """Bytes between the relay and this site, as the relay's app counted them (zero when the
        site talks to a relay in another process)."""
        return self.store.traffic(self._name)

    def close(self) -> None:
        """Nothing to release: the store belongs to whoever opened it."""

    def __enter__(self) -> RelaySiteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- registration -------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What the site said when it last registered (site id, datasets, ...)."""
        info = self.store.site_info(self._name)
        if info is None:
            raise AgentUnreachable(
                self._name,
                f"site info: pull site {self._name} has not connected to the relay (its agent "
                f"connects with the token from `fedsite relay add-site {self._name}`; "
                "is it running in outbound mode?)",
            )
        return info

    def wait_registered(self, timeout: float | None = None) -> bool:
        """Wait up to TIMEOUT (default register_wait_s) seconds for the site to register."""
        deadline = time.monotonic() + (self.register_wait_s if timeout is None else timeout)
        while self.store.site_info(self._name) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(0.2, remaining))
        return True

    # -- jobs -------------------------------------------------------------------------------------

    def start_round(self, plan: dict[str, Any], weights: bytes | None) -> str:
        return self._queue("train", plan, weights, what="start round")

    def start_evaluation(self, plan: dict[str, Any], weights: bytes) -> str:
        return self._queue("evaluate", plan, weights, what="start evaluation")

    def _queue(self, kind: str, plan: dict[str, Any], weights: bytes | None, *, what: str) -> str:
        job_id = plan.get("round_id")
        if not isinstance(job_id, str) or not job_id:
            raise AgentError(self._name, f"{what}: the plan has no round_id, which names the task")
        try:
            self.store.queue_task(self._name, kind, job_id, plan, weights, on_expiry=self.on_expiry)
        except ServiceError as exc:
            code = 409 if isinstance(exc, Conflict) else 404 if isinstance(exc, NotFound) else 400
            raise AgentError(self._name, f"{what}: {exc}", status_code=code) from None
        return job_id

    def _task(self, kind: str, job_id: str) -> RelayTask:
        task = self.store.find_task(self._name, _KINDS[kind], job_id)
        if task is None:
            raise AgentError(self._name, f"no {kind} {job_id} is queued at the relay for {self._name}")
        return task

    def status(self, kind: str, job_id: str) -> RemoteJobStatus:
        """The task as the relay knows it, in the push API's terms."""
        return self._status(self._task(kind, job_id))

    def _status(self, task: RelayTask) -> RemoteJobStatus:
        if task.status == "leased":
            # The agent's own word, except that its job is "completed" for the runner only
            # once the update is committed.
            status = task.agent_status if task.agent_status in ("queued", "running") else "running"
        else:
            status = _AS_JOB_STATUS.get(task.status, "failed")
        return RemoteJobStatus(
            job_id=task.job_id,
            status=status,
            progress=task.progress,
            metrics=dict(task.metrics or {}),
            num_samples=task.num_samples,
            update_sha256=task.update_sha256,
            error=task.error,
            audit_anchor=task.audit_anchor,
            raw={
                "task_id": task.task_id,
                "relay_status": task.status,
                "requeues": task.requeues,
                "lease_expires_at": task.lease_expires_at.isoformat() if task.lease_expires_at else None,
            },
        )

    def wait(
        self,
        kind: str,
        job_id: str,
        *,
        timeout: float,
        on_status: Callable[[RemoteJobStatus], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> RemoteJobStatus:
        """Watch the task until it ends; raise like `AgentClient.wait` (JobFailed, JobTimeout,
        AgentPlanRefused for a plan the site has not approved)."""
        deadline = time.monotonic() + timeout
        while True:
            self.store.sweep()
            task = self._task(kind, job_id)
            status = self._status(task)
            if on_status is not None:
                on_status(status)
            if task.status == "completed":
                return status
            if task.status == "refused":
                raise self._refusal(kind, task)
            if task.status in ("failed", "cancelled"):
                raise job_ended(self._name, kind, job_id, task.status, task.error)
            remaining = wait_left(
                self._name, kind, job_id, deadline=deadline, timeout=timeout, should_stop=should_stop
            )
            self.store.wait_for_change(min(self.poll_interval, remaining))

    def _refusal(self, kind: str, task: RelayTask) -> AgentError:
        digest = task.refusal_plan_hash
        if task.refusal_code == "plan_not_approved" and digest:
            return AgentPlanRefused(
                self._name,
                f"{kind} {task.job_id}: site {self._name} has not approved plan {digest}; its admin runs "
                f"`fedsite plans approve {digest} --by NAME` (and sees it in `fedsite plans pending`)",
                plan_hash=digest,
            )
        return JobFailed(
            self._name,
            f"{kind} {task.job_id} refused by site {self._name} ({task.refusal_code}): {task.error}",
        )

    def cancel_round(self, round_id: str) -> None:
        """End the task; the site's next heartbeat is answered `cancel: true`."""
        self.store.cancel(self._name, "train", round_id)

    def cancel_evaluation(self, evaluation_id: str) -> None:
        self.store.cancel(self._name, "evaluate", evaluation_id)

    # -- secure aggregation ------------------------------------------------------------------
    #
    # Each step is a task of kind `secagg` with job id `<round id>:secagg:<step>` and the step's
    # message as its plan; the site answers through the same commit as a round (its JSON answer
    # in the commit's metrics, the masked update as the committed data) or refuses it with the
    # code `secagg_refused` and its reason. A lease that runs out fails the task (the site
    # counts as dropped at that step): a step is never handed out twice.

    def secagg(self, round_id: str, step: str, message: dict[str, Any]) -> dict[str, Any]:
        task = self._secagg_task(round_id, step, message)
        answer = (task.metrics or {}).get("answer")
        if not isinstance(answer, dict):
            raise AgentError(self._name, f"secure aggregation {step}: the site committed no answer")
        return answer

    def secagg_mask(self, round_id: str, message: dict[str, Any]) -> tuple[bytes, str]:
        task = self._secagg_task(round_id, "mask", message)
        try:
            data = self.store.read_update(task)
        except (Conflict, OSError) as exc:
            raise UpdateIntegrityError(self._name, f"masked update of round {round_id}: {exc}") from None
        return data, hashlib.sha256(data).hexdigest()

    def _secagg_task(self, round_id: str, step: str, message: dict[str, Any]) -> RelayTask:
        what = f"secure aggregation {step}"
        job_id = f"{round_id}:secagg:{step}"
        plan = {"round_id": round_id, "step": step, "message": message}
        try:
            self.store.queue_task(self._name, "secagg", job_id, plan, None, on_expiry="fail")
        except ServiceError as exc:
            code = 409 if isinstance(exc, Conflict) else 404 if isinstance(exc, NotFound) else 400
            raise AgentError(self._name, f"{what}: {exc}", status_code=code) from None
        deadline = time.monotonic() + self.step_timeout
        while True:
            self.store.sweep()
            task = self.store.find_task(self._name, "secagg", job_id)
            if task is None:
                raise AgentError(self._name, f"{what}: the task {job_id} vanished from the relay")
            if task.status == "completed":
                return task
            if task.status == "refused":
                # As the push API answers a refusal: 409 with the site's reason.
                raise AgentError(self._name, f"{what}: HTTP 409: {task.error}", status_code=409)
            if task.status in ("failed", "cancelled"):
                raise JobFailed(self._name, f"{what}: {task.status}: {task.error}")
            remaining = wait_left(
                self._name, what, job_id, deadline=deadline, timeout=self.step_timeout, should_stop=None
            )
            self.store.wait_for_change(min(self.poll_interval, remaining))

    def download_update(self, round_id: str, expected_sha256: str | None) -> bytes:
        """The committed update, refused unless its hash equals the commit's and EXPECTED_SHA256."""
        task = self._task("round", round_id)
        try:
            data = self.store.read_update(task)
        except (Conflict, OSError) as exc:
            raise UpdateIntegrityError(self._name, f"update of round {round_id}: {exc}") from None
        actual = hashlib.sha256(data).hexdigest()
        if not expected_sha256 or actual != expected_sha256.lower():
            raise UpdateIntegrityError(
                self._name,
                f"update of round {round_id} refused: its SHA-256 is {actual}, the round's status says "
                f"{expected_sha256}",
            )
        return data


def site_clients(
    fed: Federation, *, store: RelayStore | None = None, **agent_kwargs: Any
) -> dict[str, SiteClient]:
    """A client for every site of FED: `AgentClient` for a push entry, `RelaySiteClient` on STORE
    for a pull entry (STORE is required when there is one). AGENT_KWARGS go to `AgentClient`."""
    clients: dict[str, SiteClient] = {}
    try:
        for entry in [*fed.agents, *fed.outside]:
            if entry.pull:
                if store is None or fed.relay is None:
                    raise RunError(
                        f"{entry.name} is a pull site: the run needs the relay's store (a relay section "
                        "in the federation file, served by `fedsite coordinate` or `fedsite relay serve`)"
                    )
                clients[entry.name] = RelaySiteClient(
                    entry.name,
                    store,
                    poll_interval=fed.poll_interval,
                    register_wait_s=fed.relay.register_wait_s,
                    step_timeout=fed.timeouts.read + fed.relay.lease_s,
                )
            else:
                clients[entry.name] = AgentClient(
                    entry,
                    timeouts=fed.timeouts,
                    retries=fed.retries,
                    poll_interval=fed.poll_interval,
                    **agent_kwargs,
                )
    except BaseException:
        for client in clients.values():
            client.close()
        raise
    return clients
