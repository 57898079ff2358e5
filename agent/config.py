"""The agent's YAML configuration as pydantic models.

Every error names the file and the key path (``datasets[0].root``) so that a site's IT
admin can fix a config without reading code. Environment variables override the file:
``FEDSITE_API__PORT=9000`` sets ``api.port``; a double underscore separates levels and
the value is parsed as YAML (``FEDSITE_DEVICE=cpu``, ``FEDSITE_EGRESS__CLIP_NORM=5``).
Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.errors import ConfigError
from agent.fsaccess import check_tree
from agent.validation import StrictModel, format_validation_error

ENV_PREFIX = "FEDSITE_"
# The most batch-loading threads one training job may start (`loader_threads`).
MAX_LOADER_THREADS = 64
_SUBJECT = "{subject}"


def check_name(v: str) -> str:
    """Site, dataset and agent names: they appear in file names, URLs and audit events."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
        raise ValueError("must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return v


class SiteConfig(StrictModel):
    id: str = Field(description="Short site identifier shown to the coordinator.")
    name: str = ""
    # Key for the subject pseudonyms (keyed hash of the patient ID). When neither is set the
    # agent creates a random one in the work directory on first use.
    secret: SecretStr | None = None
    secret_file: Path | None = None
    # The uid the agent runs as (10001 in the image). `fedsite doctor` run as root checks the data
    # as this uid; unset: as the uid that runs the command.
    run_as_uid: int | None = Field(default=None, ge=0)

    @field_validator("id")
    @classmethod
    def _id_shape(cls, v: str) -> str:
        return check_name(v)


class WarningCategory(StrEnum):
    """What kind of doubt a volume warning raises; the vocabulary of `datasets[].exclude_warnings`.

    The readers (agent/data/dicom.py, agent/data/volume.py) give each warning its category where they
    create it (`agent.data.volume.VolumeWarning`), so that nothing downstream matches warning text.
    It lives here, below the data layer, because the config validates the option against it.
    """

    # Geometry that cannot be trusted: slices missing or misplaced beyond the spacing tolerance,
    # assumed in-plane spacing (zero or missing PixelSpacing), assumed slice spacing (no positions),
    # assumed orientation (DICOM without ImageOrientationPatient, Analyze or NIfTI without sform/qform).
    GEOMETRY = "geometry"
    # Slices along a tilted axis (CT gantry tilt): the affine follows them, so it is right but not orthogonal.
    TILT = "tilt"
    # Slices dropped: duplicates at the same position, other echoes or repeats at an occupied one.
    SLICES = "slices"
    # The series was split, or files of its folder were skipped.
    SERIES = "series"
    # Mosaic, 4D or multi-volume acquisitions reduced to a 3D volume.
    ACQUISITION = "acquisition"
    # Pixel values transformed or assumed (a lookup table applied, an inverted photometric interpretation).
    PIXELS = "pixels"
    # Anything a reader did not classify.
    OTHER = "other"


class DatasetConfig(StrictModel):
    name: str
    format: Literal["nifti", "dicom"]
    root: Path
    modalities: list[str] = Field(default_factory=lambda: ["flair"], min_length=1)
    # Where each subject's image lies, relative to `root`; `{subject}` and `{modality}` are
    # filled in. NIfTI: a file. DICOM: a folder holding that modality's series.
    images: str = "{subject}/{modality}.nii.gz"
    # Optional label mask (NIfTI for both formats), e.g. "{subject}/seg.nii.gz".
    label: str | None = "{subject}/seg.nii.gz"
    # Label values that make up the training target (whole tumour in BraTS: 1, 2 and 4).
    target_labels: list[int] = Field(default_factory=lambda: [1], min_length=1)
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    # Subjects with a volume warning of one of these categories stay in the catalog (listed, with
    # their warnings) but no round trains or evaluates on them. Default: untrusted geometry.
    exclude_warnings: list[WarningCategory] = Field(default_factory=lambda: [WarningCategory.GEOMETRY])
    # A 4D image (a NIfTI time series or DWI, a DICOM series with several images per slice position,
    # a series of Siemens mosaics) is refused unless this names the volume to take, 0-based in
    # acquisition order, for every subject of the dataset; one rule for both formats, in
    # agent.data.volume.choose_volume. 3D images ignore it.
    volume_index: int | None = Field(default=None, ge=0)

    @field_validator("name")
    @classmethod
    def _name_shape(cls, v: str) -> str:
        return check_name(v)

    @field_validator("images")
    @classmethod
    def _images_pattern(cls, v: str) -> str:
        if _SUBJECT not in v:
            raise ValueError("pattern must contain {subject}")
        return v

    @field_validator("label")
    @classmethod
    def _label_pattern(cls, v: str | None) -> str | None:
        if v is not None and _SUBJECT not in v:
            raise ValueError("pattern must contain {subject}")
        return v


class TlsConfig(StrictModel):
    cert_file: Path
    key_file: Path
    # Mutual TLS: when set, clients must present a certificate signed by this CA...
    client_ca_file: Path | None = None
    # ...whose subject (RFC 4514 string, e.g. "CN=coordinator") is in this list (empty: any).
    allowed_client_subjects: list[str] = Field(default_factory=list)


class StaticToken(StrictModel):
    """A token fixed in the config (for read-only deployments); only its SHA-256 is stored."""

    name: str
    role: Literal["coordinator", "admin"]
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be 64 lower-case hex digits (sha256 of the token)")
        return v


class RefusalsConfig(StrictModel):
    """How refused requests (no or bad token, no allowed client certificate) are throttled and
    audited (`agent.api.throttle`): unauthenticated traffic must not fill the disk."""

    # Refusals an address may collect per window; past it, it is answered 429 with Retry-After
    # until the window ends. Requests with a valid token are never throttled.
    max_per_client: int = Field(default=30, ge=1, le=1_000_000)
    # The window, in seconds, of the throttle and of the audit's summaries.
    window_seconds: int = Field(default=60, ge=1, le=86_400)
    # Refusals recorded one audit event each per window; the rest are counted in one summary
    # event per actor and reason at the end of the window.
    audit_per_window: int = Field(default=20, ge=0, le=100_000)
    # Client addresses tracked at once (the oldest are forgotten first).
    max_clients: int = Field(default=10_000, ge=1, le=10_000_000)


class ApiConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=1, le=65535)
    max_body_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    queue_size: int = Field(default=4, ge=1, le=1000)
    # Serve /metrics on its own port without auth (e.g. for a local Prometheus); None: on
    # the main port, admin token required.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    tls: TlsConfig | None = None
    tokens: list[StaticToken] = Field(default_factory=list)
    refusals: RefusalsConfig = Field(default_factory=RefusalsConfig)


class LimitsConfig(StrictModel):
    max_weights_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    max_plan_bytes: int = Field(default=64 * 1024, gt=0)
    # Upper bound on one round's wall time; the worker is stopped past it.
    max_round_seconds: int = Field(default=24 * 3600, gt=0)


class ApprovalConfig(StrictModel):
    # auto: any plan whose model is in the registry runs; manual: only approved plan hashes.
    policy: Literal["auto", "manual"] = "auto"


class EgressConfig(StrictModel):
    # fnmatch patterns of parameter names that never leave the site (zeroed in diffs).
    exclude_parameters: list[str] = Field(default_factory=list)
    # Clip the update's L2 norm (of the difference to the global weights) to this value.
    clip_norm: float | None = Field(default=None, gt=0)
    # Compression modes a plan may not use here (int8, int8_topk); such a round sends its
    # difference uncompressed (the plan's transfer_dtype) and the audit record says why.
    # int8_topk keeps a residual of the site's updates in the work directory between rounds.
    forbid_compression: list[Literal["int8", "int8_topk"]] = Field(default_factory=list)


class RetentionConfig(StrictModel):
    """How long a job's files stay on disk (`agent.jobs.retention`), applied at start and after
    every job. A checkpoint (model plus optimizer state, about three times the update) and the
    received weights go when a job ends; an interrupted round keeps them while it may resume."""

    # A released update is deleted this many days after the coordinator first fetched it.
    update_days_after_fetch: float = Field(default=7.0, ge=0)
    # An update never fetched is deleted this many days after its round completed; null keeps
    # it until it is fetched.
    unfetched_update_days: float | None = Field(default=30.0, ge=0)
    # The checkpoint and received weights of an interrupted round are deleted this many days
    # after the interruption (at once with jobs.resume: never); until then a resend of the
    # round resumes it.
    interrupted_days: float = Field(default=7.0, ge=0)


class JobsConfig(StrictModel):
    """What happens to rounds that a crash, a reboot or a shutdown interrupted, and to job files."""

    # auto: at start, an interrupted round whose checkpoint and received weights are
    # intact is queued again and continues from its last completed epoch (for a fixed
    # seed on the CPU its update is bit-identical to an uninterrupted round's); never: an
    # interrupted round stays interrupted, as before. auto is the default: the coordinator
    # gets its round after an outage without starting it again, and a resumed round is the
    # round it asked for.
    resume: Literal["auto", "never"] = "auto"
    # A round that was resumed this often and was interrupted again is not resumed any
    # more: a round that brings the host down must not do so at every start.
    max_resumes: int = Field(default=3, ge=0)
    # Rounds interrupted longer ago than this are not resumed at start (the coordinator has
    # moved on); a coordinator that resends such a round's id resumes it all the same.
    resume_window_hours: float = Field(default=24.0, gt=0)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)


class ConnectConfig(StrictModel):
    """Outbound-only mode (`agent.connect`): the agent reaches the coordinator's relay, never the
    other way round, because hospital firewalls allow outbound connections only. `listen` keeps
    the push API alone; `outbound` opens no control port at all; `both` runs the two."""

    mode: Literal["listen", "outbound", "both"] = "listen"
    # The relay's base URL (http or https, with a host); required for outbound and both.
    coordinator_url: str | None = None
    # The site's token for the relay, in a file of its own (relative to the config file).
    token_file: Path | None = None
    # HTTPS: the CA bundle that signed the relay's certificate (None: the system's CAs).
    ca_file: Path | None = None
    # Mutual TLS: a client certificate and its key, both or neither.
    client_cert: Path | None = None
    client_key: Path | None = None
    # The long-poll wait asked of the relay (it clamps it to its own maximum).
    poll_wait_s: float = Field(default=25.0, ge=0, le=600)
    # Heartbeat interval, +-20% jitter; the relay's answer overrides it.
    heartbeat_s: float = Field(default=30.0, gt=0, le=3600)
    # Upload chunk size; the relay's chunk_bytes is the upper bound.
    chunk_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    # The cap of the reconnect backoff (exponential with full jitter from 0.5 s).
    max_backoff_s: float = Field(default=60.0, ge=0.5, le=3600)
    # Attempts per upload before the task waits for the next pass of the loop.
    upload_attempts: int = Field(default=5, ge=1, le=100)

    @field_validator("coordinator_url")
    @classmethod
    def _url_shape(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {v!r}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(f"must be a base URL without credentials, query or fragment, got {v!r}")
        return v.rstrip("/")

    @property
    def enabled(self) -> bool:
        """True when the connector runs (outbound or both)."""
        return self.mode != "listen"

    @property
    def serves_control_api(self) -> bool:
        """True when the push API is mounted (listen or both)."""
        return self.mode != "outbound"


class PrivacyBudget(StrictModel):
    """One dataset's differential-privacy budget: the most (ε, δ) that all rounds together,
    from every coordinator, may spend on it (`agent.privacy`)."""

    epsilon: float = Field(gt=0, le=1000)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    # False: every training round on the dataset must train with DP (plan privacy.dp).
    allow_non_dp: bool = False


class PrivacyConfig(StrictModel):
    """The site's differential-privacy ledger and budgets (`agent.privacy`).

    ``budgets`` maps a dataset name (or ``"*"``, any dataset without its own entry) to its
    budget. The ledger keeps one accountant; RDP and PRV give different ε for one history,
    so changing ``accountant`` once rounds are recorded is refused, never mixed.
    """

    accountant: Literal["rdp", "prv"] = "rdp"
    budgets: dict[str, PrivacyBudget] = Field(default_factory=dict)

    def budget(self, dataset: str) -> PrivacyBudget | None:
        return self.budgets.get(dataset, self.budgets.get("*"))


class SecureAggregationConfig(StrictModel):
    """What this site accepts of secure aggregation (plans with ``aggregation.mode: secure``).

    ``site_key_file`` is the site's long-term Ed25519 signing key (PEM, 0600; `fedsite secagg
    keygen` writes it and prints its public key). ``peers`` is the consortium's roster: every
    site id that may take part, with the base64 of its 32-byte public key, this site included.
    The coordinator relays the sites' round keys but cannot substitute them: each is checked
    against this roster. A secure plan whose threshold is below ``min_threshold``, or a round
    with fewer than ``min_sites`` sites, is refused: the site decides how weak is too weak.
    """

    site_key_file: Path | None = None
    peers: dict[str, str] = Field(default_factory=dict)
    min_threshold: int = Field(default=2, ge=2, le=65535)
    min_sites: int = Field(default=2, ge=2, le=65535)
    # True: refuse every training plan that is not secure (the coordinator sees only sums).
    require: bool = False

    @field_validator("peers")
    @classmethod
    def _peer_keys(cls, peers: dict[str, str]) -> dict[str, str]:
        for site, key in peers.items():
            try:
                check_name(site)
            except ValueError as exc:
                raise ValueError(f"site id {site!r}: {exc}") from None
            try:
                raw = base64.b64decode(str(key).encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError, ValueError):
                raise ValueError(
                    f"{site}: not base64 (expected the output of `fedsite secagg public-key`)"
                ) from None
            if len(raw) != 32:
                raise ValueError(f"{site}: {len(raw)} bytes, an Ed25519 public key is 32")
        return peers

    @property
    def configured(self) -> bool:
        """True when this site can take part in secure rounds: a key and a roster."""
        return self.site_key_file is not None and bool(self.peers)


class ConsoleConfig(StrictModel):
    """The site admin's web console (`agent.console`): its own listener, never the coordinator-facing
    port, off unless enabled. Admins log in with accounts made by `fedsite admin-users add`."""

    enabled: bool = False
    # Loopback by default: reach it over an SSH tunnel, or bind the hospital's internal interface.
    host: str = "127.0.0.1"
    port: int = Field(default=8444, ge=1, le=65535)
    # HTTPS for the console (its cookies are then marked Secure); None: plain HTTP, for loopback.
    tls: TlsConfig | None = None
    # A login lasts at most this long, and ends after this long without a request.
    session_minutes: int = Field(default=480, ge=1, le=7 * 24 * 60)
    idle_minutes: int = Field(default=30, ge=1, le=7 * 24 * 60)
    # Failed logins an address may make per window; past it the login answers 429 until the window ends.
    login_failures: int = Field(default=5, ge=1, le=1000)
    # Failed logins for one account name per window, from any address: a guesser with many
    # addresses is held back too. Past it, that name's login answers 429 until the window ends
    # (`fedsite admin-users` on the host still works).
    login_failures_per_name: int = Field(default=20, ge=1, le=100_000)
    login_window_seconds: int = Field(default=900, ge=1, le=86_400)
    # A browser that logged in as an admin keeps a signed cookie for this many days; its logins
    # as that admin are counted per browser, so a throttled name does not lock it out
    # (`agent.console.known_browsers`). 0: no such cookie, every login counts per name.
    known_browser_days: int = Field(default=30, ge=0, le=365)


class AgentConfig(StrictModel):
    site: SiteConfig
    datasets: list[DatasetConfig] = Field(default_factory=list)
    work_dir: Path = Path("work")
    # SQLAlchemy URL; default: SQLite (WAL) file in the work directory.
    database_url: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Threads that load training batches while the current batch trains. On a GPU one thread
    # cannot load 3D volumes as fast as the GPU trains on them (a 128^3 U-Net with four
    # channels: 40 volumes per second against 120 on an H200), so auto gives a GPU job up to
    # four; on the CPU the training itself uses every core, and auto gives none. The batches,
    # and so the updates, are the same whatever the number.
    loader_threads: Literal["auto"] | int = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    api: ApiConfig = Field(default_factory=ApiConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    approval: ApprovalConfig = Field(default_factory=ApprovalConfig)
    egress: EgressConfig = Field(default_factory=EgressConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    connect: ConnectConfig = Field(default_factory=ConnectConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = Field(default_factory=SecureAggregationConfig)

    # Set by load_config: the file this config came from (not a YAML key).
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("loader_threads", mode="before")
    @classmethod
    def _loader_threads(cls, v: Any) -> Any:
        # One message for every wrong value (a union's errors would name its parts), and no
        # bool: YAML's `yes` is not a number of threads.
        if v == "auto" or (type(v) is int and 0 <= v <= MAX_LOADER_THREADS):
            return v
        raise ValueError(f"must be auto or a whole number from 0 to {MAX_LOADER_THREADS}, not {v!r}")

    @model_validator(mode="after")
    def _unique_dataset_names(self) -> AgentConfig:
        seen: set[str] = set()
        for ds in self.datasets:
            if ds.name in seen:
                raise ValueError(f"dataset name {ds.name!r} appears twice")
            seen.add(ds.name)
        return self

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.work_dir / 'fedsite.db').as_posix()}"

    def dataset(self, name: str) -> DatasetConfig:
        for ds in self.datasets:
            if ds.name == name:
                return ds
        raise KeyError(name)

    def site_secret(self) -> bytes:
        """The key for subject pseudonyms; created once in the work directory if not configured."""
        if self.site.secret is not None:
            return self.site.secret.get_secret_value().encode()
        path = self.site.secret_file or (self.work_dir / "site.secret")
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(os.urandom(32).hex())
        return path.read_text().strip().encode()


def _apply_env(raw: dict[str, Any], environ: dict[str, str]) -> None:
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key.startswith(ENV_PREFIX + "TEST_"):
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = yaml.safe_load(value) if value != "" else None


def _resolve_paths(cfg: AgentConfig, base: Path) -> None:
    def fix(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    cfg.work_dir = fix(cfg.work_dir)
    if cfg.site.secret_file is not None:
        cfg.site.secret_file = fix(cfg.site.secret_file)
    for ds in cfg.datasets:
        ds.root = fix(ds.root)
    if cfg.api.tls is not None:
        tls = cfg.api.tls
        tls.cert_file = fix(tls.cert_file)
        tls.key_file = fix(tls.key_file)
        if tls.client_ca_file is not None:
            tls.client_ca_file = fix(tls.client_ca_file)
    connect = cfg.connect
    for key in ("token_file", "ca_file", "client_cert", "client_key"):
        value = getattr(connect, key)
        if value is not None:
            setattr(connect, key, fix(value))
    if cfg.secure_aggregation.site_key_file is not None:
        cfg.secure_aggregation.site_key_file = fix(cfg.secure_aggregation.site_key_file)
    if cfg.console.tls is not None:
        for key in ("cert_file", "key_file"):
            setattr(cfg.console.tls, key, fix(getattr(cfg.console.tls, key)))
    if (
        cfg.database_url
        and cfg.database_url.startswith("sqlite:///")
        and not cfg.database_url.startswith("sqlite:////")
    ):
        rel = cfg.database_url[len("sqlite:///") :]
        if rel and rel != ":memory:":
            cfg.database_url = f"sqlite:///{fix(Path(rel)).as_posix()}"


def _check_connect(cfg: AgentConfig, where: str) -> None:
    """What the connect section's keys require of each other; one line per problem, each naming
    its key, so that an outbound site is not started without a place to go or a credential."""
    connect = cfg.connect
    problems: list[str] = []
    if connect.enabled:
        if connect.coordinator_url is None:
            problems.append(f"connect.coordinator_url: required when connect.mode is {connect.mode!r}")
        if connect.token_file is None:
            problems.append(f"connect.token_file: required when connect.mode is {connect.mode!r}")
    if (connect.client_cert is None) != (connect.client_key is None):
        pair = ("client_cert", "client_key")
        have, lack = pair if connect.client_key is None else pair[::-1]
        problems.append(f"connect.{lack}: required with connect.{have} (a client certificate and its key)")
    url = connect.coordinator_url
    if url is not None and url.startswith("http://"):
        for key in ("ca_file", "client_cert", "client_key"):
            if getattr(connect, key) is not None:
                problems.append(f"connect.{key}: only used with an https:// coordinator_url, which is {url}")
    if problems:
        raise ConfigError(f"{where}: " + f"\n{where}: ".join(problems))


def _check_secure_aggregation(cfg: AgentConfig, where: str) -> None:
    """A roster that names this site and can hold a round of min_sites; a key to go with it."""
    sa = cfg.secure_aggregation
    problems: list[str] = []
    if sa.peers and cfg.site.id not in sa.peers:
        problems.append(
            f"secure_aggregation.peers: does not list this site ({cfg.site.id}); add its public key "
            "(`fedsite secagg public-key`)"
        )
    if sa.peers and len(sa.peers) < sa.min_sites:
        problems.append(
            f"secure_aggregation.min_sites: {sa.min_sites} but secure_aggregation.peers lists only "
            f"{len(sa.peers)} site(s)"
        )
    if (sa.site_key_file is None) != (not sa.peers):
        have, lack = ("peers", "site_key_file") if sa.site_key_file is None else ("site_key_file", "peers")
        problems.append(f"secure_aggregation.{lack}: required with secure_aggregation.{have}")
    if problems:
        raise ConfigError(f"{where}: " + f"\n{where}: ".join(problems))


def _check_console(cfg: AgentConfig, where: str) -> None:
    """The console never shares the coordinator-facing port (or the metrics port) of its host."""
    console = cfg.console
    if not console.enabled:
        return
    for key in ("port", "metrics_port"):
        if getattr(cfg.api, key) == console.port:
            raise ConfigError(
                f"{where}: console.port: {console.port} is api.{key}; the console needs a port of its own"
            )
    if console.tls is not None and console.tls.client_ca_file is not None:
        raise ConfigError(
            f"{where}: console.tls.client_ca_file: not used by the console (admins log in with a password)"
        )


def _check_paths(cfg: AgentConfig, where: str) -> None:
    missing: list[str] = []
    for i, ds in enumerate(cfg.datasets):
        try:
            found = ds.root.is_dir()
        except PermissionError:
            # A folder above the root that this uid cannot enter: one line naming it, the uid and the
            # fix, never a traceback (agent.fsaccess words it as the doctor does).
            access = check_tree(ds.root, sample=0, max_folders=1)
            missing.append(f"datasets[{i}].root: {access.message() or f'cannot be read: {ds.root}'}")
            continue
        if not found:
            missing.append(f"datasets[{i}].root: folder does not exist: {ds.root}")
    if cfg.api.tls is not None:
        tls = cfg.api.tls
        for key in ("cert_file", "key_file", "client_ca_file"):
            value = getattr(tls, key)
            if value is not None and not Path(value).is_file():
                missing.append(f"api.tls.{key}: file does not exist: {value}")
    for key in ("token_file", "ca_file", "client_cert", "client_key"):
        value = getattr(cfg.connect, key)
        if value is not None and not Path(value).is_file():
            missing.append(f"connect.{key}: file does not exist: {value}")
    token_file = cfg.connect.token_file
    if cfg.connect.enabled and token_file is not None and token_file.is_file():
        try:
            if not token_file.read_text().strip():
                missing.append(f"connect.token_file: the file is empty: {token_file}")
        except (OSError, UnicodeDecodeError) as exc:
            missing.append(f"connect.token_file: cannot be read: {token_file}: {exc}")
    if cfg.site.secret_file is not None and cfg.site.secret_file.exists() and cfg.site.secret_file.is_dir():
        missing.append(f"site.secret_file: is a folder: {cfg.site.secret_file}")
    key_file = cfg.secure_aggregation.site_key_file
    if key_file is not None and not key_file.is_file():
        missing.append(
            f"secure_aggregation.site_key_file: file does not exist: {key_file} "
            "(create it with `fedsite secagg keygen`)"
        )
    if missing:
        raise ConfigError(f"{where}: " + f"\n{where}: ".join(missing))


def parse_config(
    raw: Any, *, source: Path | None = None, environ: dict[str, str] | None = None, check_paths: bool = True
) -> AgentConfig:
    """Validate an already-parsed YAML document (plus environment overrides)."""
    where = str(source) if source else "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys, got {type(raw).__name__}")
    _apply_env(raw, dict(os.environ) if environ is None else environ)
    try:
        cfg = AgentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None
    cfg.source = source
    _check_connect(cfg, where)
    _check_console(cfg, where)
    _check_secure_aggregation(cfg, where)
    _resolve_paths(cfg, source.parent.resolve() if source else Path.cwd())
    if check_paths:
        _check_paths(cfg, where)
    return cfg


def load_config(
    path: str | Path, *, environ: dict[str, str] | None = None, check_paths: bool = True
) -> AgentConfig:
    """Read, override from the environment, validate and resolve a config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(raw, source=path, environ=environ, check_paths=check_paths)
