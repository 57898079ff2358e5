"""`fedsite doctor`'s checks: is this site ready to train, and if not, what exactly to do.

A site that starts, reports healthy and then has nothing to train on costs the consortium a
round and the admin an afternoon. Each check here answers one question with one line (and, when
something is wrong, the fix): can the agent's uid read every dataset, does the folder still hold
the subjects the catalog knows, are the TLS files usable for the names the coordinator will use,
what the approval policy means, is the database reachable and migrated, is there disk in the work
volume, will rounds train on the site's GPU (or fail for want of one), is the clock sane
(certificate validity depends on it), and in outbound mode does the coordinator's relay answer
and accept the site's token.

The checks read; they never migrate, scan or write (the relay check sends one empty heartbeat,
which only updates the relay's last-seen time). As root they check data as the agent's uid
(`site.run_as_uid`, or the caller's `as_uid`), through `agent.fsaccess`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import httpx
from cryptography import x509
from sqlalchemy import select

from agent.audit.models import AuditEvent
from agent.config import AgentConfig, DatasetConfig
from agent.data.catalog import MAX_SHRINK_FRACTION, DatasetSummary, dataset_summaries, discover_subjects
from agent.db.engine import Database, safe_url, schema_revisions, sqlite_file
from agent.errors import FedsiteError
from agent.fsaccess import check_tree, file_unreadable
from agent.jobs.launch import GPU_DEVICE_NODES, workers_may_use_gpu
from agent.tls.contexts import client_ssl_context
from agent.tls.files import check_tls_files, load_certificate, load_certificates

Status = Literal["ok", "warn", "fail"]

# Below this the work volume fails (a round's checkpoint and update do not fit), below the
# second it warns.
MIN_FREE_BYTES = 1 << 30
WARN_FREE_BYTES = 10 << 30
# A certificate expiring within this many days is a warning.
EXPIRY_WARN_DAYS = 30
# How long the relay check waits for the coordinator.
RELAY_TIMEOUT_S = 5.0
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")  # noqa: S104 - bind-all addresses name no host


@dataclass(frozen=True)
class Check:
    """One check's verdict: NAME (e.g. "dataset brain"), STATUS and a one-line SUMMARY; DETAILS
    are further lines (the fix, the files), printed under it."""

    name: str
    status: Status
    summary: str
    details: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.status.upper():4} {self.name}: {self.summary}"


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No check failed (warnings do not fail)."""
        return all(c.status != "fail" for c in self.checks)

    def as_json(self) -> dict[str, object]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}


def agent_uid(cfg: AgentConfig, as_uid: int | None = None) -> int:
    """The uid the checks act as: AS_UID, else `site.run_as_uid`, else the caller's."""
    if as_uid is not None:
        return as_uid
    if cfg.site.run_as_uid is not None:
        return cfg.site.run_as_uid
    return os.geteuid()


# ---------------------------------------------------------------------------------- datasets


def check_dataset(ds: DatasetConfig, uid: int, catalog: DatasetSummary | None, *, sample: int = 20) -> Check:
    """The dataset's root and a sample of its files as UID; subjects found against the catalog."""
    name = f"dataset {ds.name}"
    access = check_tree(ds.root, uid=uid, sample=sample)
    if not access.checked:
        return Check(name, "warn", access.note)
    if not access.ok:
        message = access.message() or f"{ds.root}: cannot be read by uid {uid}"
        return Check(name, "fail", message)
    if access.empty:
        # A warning, as for no subjects below: a site may be set up before its data is copied.
        return Check(
            name,
            "warn",
            f"{ds.root} is empty: a mistyped host path in the compose file makes docker create an "
            "empty folder; check the volume's host side",
        )
    try:
        found = len(discover_subjects(ds))
    except FedsiteError as exc:
        return Check(name, "fail", str(exc))
    sampled = f"{access.files_checked} file(s) in {access.folders_checked} folder(s) readable by uid {uid}"
    if found == 0:
        return Check(
            name,
            "warn",
            f"no subject matches the images pattern {ds.images!r} under {ds.root} ({sampled})",
        )
    known = catalog.num_subjects if catalog is not None else None
    if known is None:
        return Check(name, "ok", f"{found} subject(s) found, not scanned yet; {sampled}")
    if found < known:
        lost = known - found
        refused = lost > known * MAX_SHRINK_FRACTION
        tail = (
            "a scan keeps the old catalog unless run with `fedsite data scan --allow-shrink`"
            if refused
            else "a scan removes them from the catalog"
        )
        return Check(
            name, "warn", f"{found} subject(s) found, the catalog has {known}: {lost} would be lost ({tail})"
        )
    usable = catalog.num_train + catalog.num_val if catalog is not None else 0
    problems = catalog.problems() if catalog is not None else []
    if problems:
        return Check(name, "warn", f"{found} subject(s) found; last scan: {'; '.join(problems)}")
    return Check(name, "ok", f"{found} subject(s) found, {usable} usable in the catalog; {sampled}")


# ---------------------------------------------------------------------------------- TLS


def _names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n.value).lower() for n in san}


def check_tls(cfg: AgentConfig, uid: int, hosts: list[str], now: dt.datetime) -> Check:
    """Files readable by UID, key matches certificate, validity, expiry, names for HOSTS (and
    api.host when it names a host)."""
    tls = cfg.api.tls
    if tls is None and not cfg.connect.serves_control_api:
        return Check("tls", "ok", "outbound mode: no control API; health and metrics on 127.0.0.1 only")
    if tls is None:
        return Check("tls", "warn", "api.tls is not set: the API is plain HTTP (for a local test only)")
    for path in (tls.cert_file, tls.key_file, tls.client_ca_file):
        if path is not None:
            why = file_unreadable(path, uid=uid)
            if why is not None:
                return Check("tls", "fail", why)
    try:
        cert = check_tls_files(tls, now=now)
    except FedsiteError as exc:
        return Check("tls", "fail", str(exc))
    wanted = [h.lower() for h in hosts]
    if cfg.api.host not in _WILDCARD_HOSTS:
        wanted.append(cfg.api.host.lower())
    names = _names(cert)
    missing = [h for h in dict.fromkeys(wanted) if h not in names and _normal_ip(h) not in names]
    if missing:
        return Check(
            "tls",
            "fail",
            f"{tls.cert_file} does not name {', '.join(missing)} "
            f"(it names {', '.join(sorted(names)) or 'nothing'}); "
            "issue it again with every name clients use (fedsite certs init --hosts ...)",
        )
    left = cert.not_valid_after_utc - now
    mtls = "mutual TLS" if tls.client_ca_file is not None else "server TLS only (no client_ca_file)"
    summary = (
        f"{mtls}; certificate for {', '.join(sorted(names))} valid until {cert.not_valid_after_utc:%Y-%m-%d}"
    )
    if left < dt.timedelta(days=EXPIRY_WARN_DAYS):
        return Check("tls", "warn", f"{summary}: expires in {left.days} day(s)")
    return Check("tls", "ok", summary)


def _normal_ip(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host


# ---------------------------------------------------------------------------------- the relay


def check_connect(cfg: AgentConfig, uid: int, *, timeout_s: float = RELAY_TIMEOUT_S) -> Check | None:
    """Outbound and both: the token file is readable by UID, and the relay at coordinator_url
    answers an empty heartbeat with that token (through the proxy of the environment, as the
    connector goes). None in listen mode."""
    connect = cfg.connect
    if not connect.enabled or connect.coordinator_url is None or connect.token_file is None:
        return None
    url = connect.coordinator_url
    for path in (connect.token_file, connect.ca_file, connect.client_cert, connect.client_key):
        if path is not None:
            why = file_unreadable(path, uid=uid)
            if why is not None:
                return Check("relay", "fail", why)
    try:
        token = connect.token_file.read_text().strip()
        verify = (
            client_ssl_context(connect.ca_file, connect.client_cert, connect.client_key)
            if url.startswith("https://")
            else True
        )
    except (OSError, FedsiteError) as exc:
        return Check("relay", "fail", f"connect: cannot use the relay's files: {exc}")
    try:
        with httpx.Client(verify=verify, trust_env=True, timeout=timeout_s) as http:
            answer = http.post(
                f"{url}/v1/relay/heartbeat", json={"tasks": []}, headers={"Authorization": f"Bearer {token}"}
            )
    except httpx.HTTPError as exc:
        return Check(
            "relay",
            "fail",
            f"the coordinator's relay at {url} does not answer: {type(exc).__name__}: {exc}",
            ["check connect.coordinator_url, the outbound firewall rule and HTTPS_PROXY / NO_PROXY"],
        )
    if answer.status_code == 401:
        return Check(
            "relay",
            "fail",
            f"the relay at {url} does not know the token in {connect.token_file}",
            ["ask the consortium for this site's token (fedsite relay add-site) and write it there"],
        )
    if answer.status_code != 200:
        return Check(
            "relay", "fail", f"the relay at {url} answered HTTP {answer.status_code}: {answer.text[:200]}"
        )
    return Check("relay", "ok", f"{connect.mode}: the relay at {url} answers and accepts this site's token")


# ---------------------------------------------------------------------------------- the rest


def check_approval(cfg: AgentConfig) -> Check:
    """The policy in force and what it means for the coordinator's plans."""
    if cfg.approval.policy == "manual":
        return Check(
            "approval",
            "ok",
            "manual: a plan runs only once its hash is approved here (fedsite plans approve); "
            "others are refused with 403",
        )
    return Check(
        "approval",
        "ok",
        "auto: any plan whose model is in the registry runs without a person approving it "
        "(approval.policy: manual to review each plan)",
    )


def check_database(cfg: AgentConfig) -> tuple[Check, Database | None]:
    """Reachable and migrated to this version's schema, without creating or migrating anything.
    Returns the open database when usable (for the catalog and clock checks)."""
    path = sqlite_file(cfg.db_url)
    if path is not None and not path.exists():
        return Check("database", "ok", f"{path} does not exist yet; the agent creates it at start"), None
    db = Database(cfg.db_url)
    try:
        current, heads = schema_revisions(db)
    except Exception as exc:  # any driver error: the summary names it, the doctor goes on
        db.dispose()
        return Check(
            "database", "fail", f"cannot reach {safe_url(cfg.db_url)}: {type(exc).__name__}: {exc}"
        ), None
    if current == heads:
        return Check("database", "ok", f"{safe_url(cfg.db_url)} reachable, schema up to date"), db
    if current - heads and not current <= heads:
        extra = ", ".join(sorted(current - heads))
        return (
            Check(
                "database", "fail", f"schema revision {extra} is unknown to this version (a newer fedsite?)"
            ),
            None,
        )
    return (
        Check(
            "database",
            "warn",
            f"schema at {', '.join(sorted(current)) or 'nothing'}, this version needs "
            f"{', '.join(sorted(heads))}: the agent migrates it at start",
        ),
        db,
    )


def free_space(path: Path) -> int:
    """Free bytes on the volume that holds `path`, or will hold it once it is created."""
    where = path
    while not where.exists() and where != where.parent:  # not created yet: the volume it will be on
        where = where.parent
    return shutil.disk_usage(where).free


def check_disk(cfg: AgentConfig) -> Check:
    """Free space where the work directory is (or would be created)."""
    free = free_space(cfg.work_dir)
    text = f"{free / (1 << 30):.1f} GiB free for {cfg.work_dir}"
    if free < MIN_FREE_BYTES:
        return Check("disk", "fail", f"{text}: a round's checkpoint and update need more")
    if free < WARN_FREE_BYTES:
        return Check("disk", "warn", f"{text}: low")
    return Check("disk", "ok", text)


@dataclass(frozen=True)
class GpuProbe:
    """What torch, in this process, makes of the GPU: whether CUDA is usable, the first device's
    name and memory, and torch's version and CUDA build (None: a CPU build)."""

    available: bool
    name: str | None
    memory_gib: float | None
    torch: str
    cuda_build: str | None


def probe_gpu() -> GpuProbe:
    """Ask torch (imported here: only where a GPU's device files exist, as it takes seconds)."""
    import torch

    if not torch.cuda.is_available():
        return GpuProbe(False, None, None, torch.__version__, torch.version.cuda)
    props = torch.cuda.get_device_properties(0)
    return GpuProbe(True, props.name, props.total_memory / 2**30, torch.__version__, torch.version.cuda)


def check_device(
    cfg: AgentConfig,
    *,
    device_nodes: Sequence[str] = GPU_DEVICE_NODES,
    probe: Callable[[], GpuProbe] = probe_gpu,
) -> Check:
    """Where rounds will train: the GPU (its name, and the threads that load its batches) or the
    CPU, and why. `device: cuda` on a machine, or in a container, that shows no usable GPU fails
    here instead of in the first round."""
    cores = len(os.sched_getaffinity(0))
    on_cpu = f"training on the CPU ({cores} cores)"
    if cfg.device == "cpu":
        return Check("device", "ok", f"cpu (set in the config): {on_cpu}; a GPU, if any, is not used")
    gpu_fix = (
        "fix: give the agent the GPU (Compose: add docker-compose.gpu.yml to COMPOSE_FILE; docker run: "
        "--gpus all) in the CUDA image (`make wheelhouse TORCH_VARIANT=cuda`), or set device: auto"
    )
    if not workers_may_use_gpu(cfg.device, device_nodes):
        if cfg.device == "cuda":
            return Check(
                "device",
                "fail",
                f"cuda, but no GPU is visible here (none of {', '.join(device_nodes)}): "
                "every round would fail",
                [gpu_fix],
            )
        return Check("device", "ok", f"auto: no GPU visible: {on_cpu}")
    gpu = probe()
    if not gpu.available:
        build = f"CUDA build {gpu.cuda_build}" if gpu.cuda_build else "a CPU build"
        why = f"torch {gpu.torch} ({build}) cannot use the GPU whose device files are here"
        if cfg.device == "cuda":
            return Check("device", "fail", f"cuda, but {why}: every round would fail", [gpu_fix])
        return Check("device", "warn", f"auto, but {why}: {on_cpu}", [gpu_fix])
    from torch import device as torch_device

    from agent.training.engine import loader_threads

    threads = loader_threads(cfg.loader_threads, torch_device("cuda"))
    return Check(
        "device",
        "ok",
        f"{cfg.device}: {gpu.name} ({gpu.memory_gib:.0f} GiB), mixed precision, "
        f"{threads} loader thread{'s' if threads != 1 else ''}",
    )


def check_clock(cfg: AgentConfig, db: Database | None, now: dt.datetime) -> Check:
    """The clock against what cannot be in the future: the certificates' start of validity and the
    newest audit event. A clock behind them makes TLS refuse valid certificates."""
    marks: list[tuple[dt.datetime, str]] = []
    tls = cfg.api.tls
    if tls is not None:
        try:
            marks.append((load_certificate(tls.cert_file).not_valid_before_utc, "the certificate's start"))
            if tls.client_ca_file is not None:
                for ca in load_certificates(tls.client_ca_file):
                    marks.append((ca.not_valid_before_utc, "the client CA's start"))
        except FedsiteError:
            pass  # the tls check says why
    if db is not None:
        try:
            with db.session() as s:
                ts = s.scalar(select(AuditEvent.ts).order_by(AuditEvent.id.desc()).limit(1))
        except Exception:  # a schema not migrated yet: the database line says so
            ts = None
        if ts:
            last = dt.datetime.fromisoformat(ts)
            marks.append((last if last.tzinfo else last.replace(tzinfo=dt.UTC), "the newest audit event"))
    late = [(when, what) for when, what in marks if when > now + dt.timedelta(minutes=5)]
    if late:
        when, what = max(late)
        return Check(
            "clock",
            "fail",
            f"the clock ({now:%Y-%m-%d %H:%M} UTC) is behind {what} ({when:%Y-%m-%d %H:%M} UTC): "
            "set the time (NTP) on the host",
        )
    return Check("clock", "ok", f"{now:%Y-%m-%d %H:%M} UTC, after every certificate's start and audit event")


def run_doctor(
    cfg: AgentConfig,
    *,
    as_uid: int | None = None,
    hosts: list[str] | None = None,
    now: dt.datetime | None = None,
    sample: int = 20,
) -> DoctorReport:
    """Every check, in the order an admin fixes things: data, TLS, approval, database, disk, the
    device training will use, clock, and the relay in outbound mode."""
    now = now or dt.datetime.now(dt.UTC)
    uid = agent_uid(cfg, as_uid)
    report = DoctorReport()
    db_check, db = check_database(cfg)
    try:
        catalog: dict[str, DatasetSummary] = {}
        if db is not None:
            try:
                catalog = {s.name: s for s in dataset_summaries(db)}
            except Exception:  # a schema not migrated yet: the database line says so
                catalog = {}
        if not cfg.datasets:
            report.checks.append(Check("datasets", "warn", "no dataset configured: nothing to train on"))
        for ds in cfg.datasets:
            report.checks.append(check_dataset(ds, uid, catalog.get(ds.name), sample=sample))
        report.checks.append(check_tls(cfg, uid, hosts or [], now))
        report.checks.append(check_approval(cfg))
        report.checks.append(db_check)
        report.checks.append(check_disk(cfg))
        report.checks.append(check_device(cfg))
        report.checks.append(check_clock(cfg, db, now))
        relay = check_connect(cfg, uid)
        if relay is not None:
            report.checks.append(relay)
    finally:
        if db is not None:
            db.dispose()
    return report
