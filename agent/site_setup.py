"""Writing a new site folder: what `fedsite init` leaves for the admin and for the coordinator.

A site folder holds everything one agent needs and the few things the consortium's
coordinator needs from it, with modes set so that secrets are readable by their owner only::

    SITE/.env                      compose variables (image, data folder, TLS folder, bind, port)
    SITE/config/site.yaml          the agent's config (paths as the agent will see them)
    SITE/tls/                      server.crt, server.key (0600), ca.crt: what the agent mounts
    SITE/pki/ (0700)               the site CA (ca.key: keep it off the agent's host) and clients
    SITE/handoff/ (0700)           for the coordinator: HANDOFF.txt, federation.yaml, the CA
                                   certificate, the client certificate and key, the token (0600)
    SITE/data/                     only with generated demo data
    SITE/work/ (0700)              only for an agent run on this host: its database and caches

Two runtimes, because the config's paths depend on where the agent runs. ``compose``: the
agent runs in the container of ``deploy/docker-compose.yml``, which mounts the data at
``/data``, the TLS folder at ``/etc/fedsite/tls`` and its work volume at ``/var/lib/fedsite``;
its database lives in that volume, out of reach here, so the first coordinator token is
written into the config as its SHA-256 (``api.tokens``). ``local``: `fedsite serve` on this
host with host paths; the token is created in the site's database like `fedsite tokens add`.

Why a library module and not the command: the command line only asks questions and prints;
the tests and any other front end (an admin console) write the same folder through
`write_site`. It sits above the data, access and TLS layers it calls, beside the service.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml

from agent.access.tokens import check_name as check_token_name
from agent.access.tokens import create_token, list_tokens, revoke_token
from agent.audit.chain import AuditLog
from agent.config import DatasetConfig, load_config, parse_config
from agent.data.catalog import discover_subjects
from agent.data.synthetic.sites import site_profile
from agent.data.synthetic.subjects import generate_subject
from agent.data.synthetic.writers import write_nifti_subject
from agent.db.engine import open_database
from agent.errors import CatalogError, ConfigError, TokenError
from agent.fileio import atomic_file
from agent.tls.issue import init_certificates, parse_hosts

Runtime = Literal["compose", "local"]
RUNTIMES: tuple[Runtime, ...] = ("compose", "local")

# The names a check on the agent's own host uses: the guide's `curl https://localhost:PORT`,
# the loopback address, and the compose service name other containers of the project use.
LOCAL_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1")
COMPOSE_SERVICE = "agent"
# Where deploy/docker-compose.yml mounts things inside the container.
CONTAINER_DATA = Path("/data")
CONTAINER_TLS = Path("/etc/fedsite/tls")
CONTAINER_WORK = Path("/var/lib/fedsite")
CONTAINER_PORT = 8443
CLIENT_NAME = "coordinator"
DEFAULT_IMAGE = "fedsite:0.1.0"
# The demo data's dataset, as the generator writes it (one FLAIR image and a label per subject).
DEMO_DATASET = {
    "name": "brain",
    "format": "nifti",
    "modalities": ["flair"],
    "images": "{subject}/{modality}.nii.gz",
    "label": "{subject}/seg.nii.gz",
    "target_labels": [1, 2, 4],
}
APPROVAL_MEANING = {
    "auto": "every valid plan a coordinator sends is trained on",
    "manual": "each new plan is refused (403, naming its hash) until an admin runs "
    "`fedsite plans approve HASH`",
}


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset as the admin describes it: the folder on this host and how files are named."""

    path: Path
    name: str = "brain"
    format: Literal["nifti", "dicom"] = "nifti"
    modalities: tuple[str, ...] = ("flair",)
    images: str = "{subject}/{modality}.nii.gz"
    label: str | None = "{subject}/seg.nii.gz"
    target_labels: tuple[int, ...] = (1,)
    val_fraction: float = 0.2


@dataclass(frozen=True)
class SiteSpec:
    """Everything `write_site` needs; the command line fills it from flags or prompts."""

    site_dir: Path
    site_id: str
    site_name: str = ""
    runtime: Runtime = "compose"
    # None: generate demo data into SITE/data instead (DEMO_SUBJECTS subjects).
    dataset: DatasetSpec | None = None
    demo_subjects: int = 0
    demo_size: int = 64
    hosts: tuple[str, ...] = ()
    bind: str = "127.0.0.1"
    port: int = 8443
    approval: Literal["auto", "manual"] = "manual"
    mutual_tls: bool = True
    token_name: str = "coordinator"  # noqa: S105 - the token's name, not a token
    image: str = DEFAULT_IMAGE
    force: bool = False
    actor: str = "cli:fedsite-init"


@dataclass
class SiteWritten:
    """What `write_site` wrote; the token is here once, to be shown once."""

    site_dir: Path
    config_path: Path
    env_path: Path
    handoff_path: Path
    federation_path: Path
    token: str
    url: str
    hosts: list[str]
    subjects: int
    files: dict[str, Path] = field(default_factory=dict)


def _write_text(path: Path, text: str, mode: int) -> Path:
    """Write PATH atomically and set MODE (the temporary file is 0600 until then)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)
    return path


def _copy(src: Path, dst: Path, mode: int) -> Path:
    return _write_text(dst, src.read_text(), mode)


def _folder(path: Path, mode: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path


def site_hosts(hosts: Sequence[str]) -> list[str]:
    """The admin's names first (the first is the URL's host), then the local check's names."""
    out: list[str] = []
    for raw in hosts:
        for name in raw.split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    for name in (*LOCAL_NAMES, COMPOSE_SERVICE):
        if name not in out:
            out.append(name)
    return out


def check_site_dir(site_dir: Path, force: bool) -> None:
    """Refuse a file, or a folder with something in it, unless FORCE."""
    if site_dir.exists() and not site_dir.is_dir():
        raise ConfigError(f"{site_dir}: exists and is not a folder")
    if site_dir.is_dir() and any(site_dir.iterdir()) and not force:
        raise ConfigError(
            f"{site_dir}: folder exists and is not empty (a site already?); choose another folder "
            "or pass --force to write the site's files over the ones there"
        )


def check_dataset(spec: DatasetSpec) -> int:
    """The number of subjects the dataset's pattern finds in its folder; refuses, with the
    reason, a folder that is missing, unreadable or holds nothing the pattern matches.

    A missing folder is never created: a mis-typed path would become an empty data folder
    that every later check passes and every scan empties the catalog from.
    """
    path = spec.path
    if not path.exists():
        raise ConfigError(
            f"data path {path}: does not exist (check the spelling; fedsite init never creates it)"
        )
    if not path.is_dir():
        raise ConfigError(f"data path {path}: is not a folder")
    try:
        entries = [e for e in os.listdir(path) if not e.startswith(".")]
    except OSError as exc:
        raise ConfigError(f"data path {path}: cannot be read by uid {os.getuid()}: {exc.strerror}") from None
    if not entries:
        raise ConfigError(f"data path {path}: is empty")
    ds = DatasetConfig(
        name=spec.name,
        format=spec.format,
        root=path,
        modalities=list(spec.modalities),
        images=spec.images,
        label=spec.label,
        target_labels=list(spec.target_labels),
        val_fraction=spec.val_fraction,
    )
    try:
        found = discover_subjects(ds)
    except CatalogError as exc:
        raise ConfigError(f"data path {path}: {exc}") from None
    if not found:
        sample = ", ".join(sorted(entries)[:3])
        raise ConfigError(
            f"data path {path}: nothing matches the images pattern {spec.images!r} for modalities "
            f"{', '.join(spec.modalities)} (the folder holds e.g. {sample}); set the pattern "
            "(--images) to how the files are named"
        )
    return len(found)


def _generate_demo(data_dir: Path, subjects: int, size: int) -> DatasetSpec:
    """SUBJECTS made-up subjects (the project's generator, site profile 1) in DATA_DIR."""
    profile = site_profile(0, 1, size=size)
    for j in range(subjects):
        subject = generate_subject(0, 1, j, modalities=("flair",), size=size, profile=profile)
        write_nifti_subject(subject, data_dir / subject.patient_id)
    return DatasetSpec(
        path=data_dir,
        name=str(DEMO_DATASET["name"]),
        format="nifti",
        modalities=("flair",),
        images=str(DEMO_DATASET["images"]),
        label=str(DEMO_DATASET["label"]),
        target_labels=(1, 2, 4),
        val_fraction=0.25,
    )


def _config_doc(
    spec: SiteSpec, ds: DatasetSpec, site_dir: Path, token_sha256: str | None
) -> dict[str, object]:
    compose = spec.runtime == "compose"
    tls_dir = CONTAINER_TLS if compose else site_dir / "tls"
    tls: dict[str, object] = {
        "cert_file": str(tls_dir / "server.crt"),
        "key_file": str(tls_dir / "server.key"),
    }
    if spec.mutual_tls:
        tls["client_ca_file"] = str(tls_dir / "ca.crt")
        tls["allowed_client_subjects"] = [f"CN={CLIENT_NAME}"]
    api: dict[str, object] = {
        "host": "0.0.0.0" if compose else spec.bind,  # noqa: S104 - inside the container; published on FEDSITE_BIND
        "port": CONTAINER_PORT if compose else spec.port,
        "tls": tls,
    }
    if token_sha256 is not None:
        api["tokens"] = [{"name": spec.token_name, "role": "coordinator", "sha256": token_sha256}]
    dataset: dict[str, object] = {
        "name": ds.name,
        "format": ds.format,
        "root": str(CONTAINER_DATA if compose else ds.path),
        "modalities": list(ds.modalities),
        "images": ds.images,
        "label": ds.label,
        "target_labels": list(ds.target_labels),
        "val_fraction": ds.val_fraction,
    }
    return {
        "site": {"id": spec.site_id, "name": spec.site_name or spec.site_id},
        "datasets": [dataset],
        "work_dir": str(CONTAINER_WORK if compose else site_dir / "work"),
        "device": "auto",
        "api": api,
        "approval": {"policy": spec.approval},
    }


def _config_text(spec: SiteSpec, doc: dict[str, object]) -> str:
    where = (
        "the agent's container (deploy/docker-compose.yml): /data is FEDSITE_DATA_DIR, "
        "/etc/fedsite/tls is FEDSITE_TLS_DIR, /var/lib/fedsite the work volume"
        if spec.runtime == "compose"
        else "`fedsite serve` on this host"
    )
    return (
        f"# fedsite agent configuration for site {spec.site_id}, written by `fedsite init`.\n"
        f"# Paths are as seen by {where}.\n"
        "# Every key is explained in config.example.yaml; check it with `fedsite config check`.\n"
        f"# approval.policy {spec.approval}: {APPROVAL_MEANING[spec.approval]}.\n"
        + yaml.safe_dump(doc, sort_keys=False)
    )


def _env_text(spec: SiteSpec, data_dir: Path) -> str:
    return (
        "# Compose variables for deploy/docker-compose.yml, written by `fedsite init`. Copy the compose\n"
        "# file into this folder and run compose here (the relative paths below are this folder's):\n"
        "#   cp deploy/docker-compose*.yml deploy/.gitignore SITE/ && cd SITE && docker-compose up -d\n"
        "COMPOSE_PROJECT_NAME=fedsite\n"
        "COMPOSE_FILE=docker-compose.yml\n"
        f"FEDSITE_IMAGE={spec.image}\n"
        "# Host folder with the imaging data (checked by fedsite init); mounted read-only at /data.\n"
        f"FEDSITE_DATA_DIR={data_dir}\n"
        "FEDSITE_CONFIG_FILE=./config/site.yaml\n"
        "FEDSITE_TLS_DIR=./tls\n"
        "# The interface the coordinator reaches, and the port (the URL in handoff/HANDOFF.txt).\n"
        f"FEDSITE_BIND={spec.bind}\n"
        f"FEDSITE_PORT={spec.port}\n"
        "FEDSITE_MEM_LIMIT=8g\n"
    )


def _handoff_text(spec: SiteSpec, url: str, hosts: list[str], files: dict[str, str]) -> str:
    lines = [
        f"fedsite site {spec.site_id}: what to hand the consortium's coordinator",
        "",
        f"URL:          {url}",
        f"CA:           {files['ca_file']}  (the CA that signed the agent's certificate: trust only this)",
    ]
    if spec.mutual_tls:
        lines.append(
            f"client cert:  {files['client_cert']}  and its key {files['client_key']}  (CN={CLIENT_NAME})"
        )
    lines += [
        f"token:        {files['token_file']}  (role coordinator, name {spec.token_name!r})",
        f"server names: {', '.join(hosts)}",
        f"approval:     {spec.approval}: {APPROVAL_MEANING[spec.approval]}",
        "",
        "federation.yaml beside this file is the coordinator's entry for this site (paths relative",
        "to it). Send the token and the client key over a channel you trust, then delete them here.",
        "",
    ]
    return "\n".join(lines)


def write_site(spec: SiteSpec) -> SiteWritten:
    """Write the site folder SPEC describes; see the module's docstring for what goes where.

    Nothing is written before the inputs are checked (folder, data, names, token name); each
    file is written atomically with its mode. The returned token is not stored anywhere in
    clear but in the hand-off folder's token file (0600).
    """
    if spec.runtime not in RUNTIMES:
        raise ConfigError(f"runtime {spec.runtime!r}: must be one of {', '.join(RUNTIMES)}")
    site_dir = spec.site_dir.expanduser().resolve()
    check_site_dir(site_dir, spec.force)
    hosts = site_hosts(spec.hosts)
    try:
        parse_hosts(",".join(hosts))
        check_token_name(spec.token_name)
    except (ValueError, TokenError) as exc:
        raise ConfigError(str(exc)) from None
    if not 1 <= spec.port <= 65535:
        raise ConfigError(f"port {spec.port}: must be from 1 to 65535")
    if spec.dataset is None and spec.demo_subjects < 1:
        raise ConfigError("give a data path, or ask for generated demo data (at least 1 subject)")
    subjects = check_dataset(spec.dataset) if spec.dataset is not None else 0
    # Validate the config before writing anything: a bad site id or pattern is refused here.
    probe = DatasetSpec(path=site_dir / "data") if spec.dataset is None else spec.dataset
    parse_config(_config_doc(spec, probe, site_dir, None), check_paths=False)

    _folder(site_dir, 0o755)
    files: dict[str, Path] = {}
    if spec.dataset is None:
        data_dir = site_dir / "data"
        if data_dir.exists() and spec.force:
            shutil.rmtree(data_dir)
        ds = _generate_demo(data_dir, spec.demo_subjects, spec.demo_size)
        subjects = check_dataset(ds)
    else:
        ds = spec.dataset
    ds = replace(ds, path=ds.path.expanduser().resolve())

    # TLS: the CA and the client's key stay in pki/ (0700); the agent's three files go to tls/.
    pki = _folder(site_dir / "pki", 0o700)
    issued = init_certificates(
        pki,
        site_id=spec.site_id,
        hosts=",".join(hosts),
        clients=[CLIENT_NAME] if spec.mutual_tls else [],
        force=spec.force,
    )
    files.update({f"pki:{k}": v for k, v in issued.items()})
    tls_dir = _folder(site_dir / "tls", 0o755)
    files["server_cert"] = _copy(pki / "agent" / "server.crt", tls_dir / "server.crt", 0o644)
    files["server_key"] = _copy(pki / "agent" / "server.key", tls_dir / "server.key", 0o600)
    files["ca_cert"] = _copy(pki / "ca.crt", tls_dir / "ca.crt", 0o644)

    # The first coordinator token: in the database where this host can reach it, else in the config.
    token = secrets.token_urlsafe(32)
    token_sha256 = hashlib.sha256(token.encode()).hexdigest() if spec.runtime == "compose" else None
    config_dir = _folder(site_dir / "config", 0o755)
    config_path = _write_text(
        config_dir / "site.yaml", _config_text(spec, _config_doc(spec, ds, site_dir, token_sha256)), 0o644
    )
    if spec.runtime == "local":
        _folder(site_dir / "work", 0o700)
        token = _create_db_token(config_path, spec)
    files["config"] = config_path
    env_path = _write_text(site_dir / ".env", _env_text(spec, ds.path), 0o644)
    files["env"] = env_path

    handoff = _folder(site_dir / "handoff", 0o700)
    files["handoff_ca"] = _copy(pki / "ca.crt", handoff / "ca.crt", 0o644)
    files["handoff_token"] = _write_text(handoff / f"{spec.token_name}.token", token + "\n", 0o600)
    entry: dict[str, object] = {
        "name": spec.site_id,
        "url": f"https://{_url_host(hosts[0])}:{spec.port}",
        "token_file": f"{spec.token_name}.token",
        "ca_file": "ca.crt",
    }
    rel = {"ca_file": "ca.crt", "token_file": f"{spec.token_name}.token"}
    if spec.mutual_tls:
        files["handoff_client_cert"] = _copy(
            pki / "clients" / f"{CLIENT_NAME}.crt", handoff / f"{CLIENT_NAME}.crt", 0o644
        )
        files["handoff_client_key"] = _copy(
            pki / "clients" / f"{CLIENT_NAME}.key", handoff / f"{CLIENT_NAME}.key", 0o600
        )
        entry["client_cert"] = rel["client_cert"] = f"{CLIENT_NAME}.crt"
        entry["client_key"] = rel["client_key"] = f"{CLIENT_NAME}.key"
    url = str(entry["url"])
    federation_path = _write_text(
        handoff / "federation.yaml",
        "# The coordinator's entry for this site (`fedsite coordinate --federation`);\n"
        "# paths are relative to this file.\n"
        + yaml.safe_dump({"agents": [entry], "min_sites": 1}, sort_keys=False),
        0o600,
    )
    handoff_path = _write_text(handoff / "HANDOFF.txt", _handoff_text(spec, url, hosts, rel), 0o600)
    files["handoff"] = handoff_path
    files["federation"] = federation_path
    return SiteWritten(
        site_dir=site_dir,
        config_path=config_path,
        env_path=env_path,
        handoff_path=handoff_path,
        federation_path=federation_path,
        token=token,
        url=url,
        hosts=hosts,
        subjects=subjects,
        files=files,
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _create_db_token(config_path: Path, spec: SiteSpec) -> str:
    """The coordinator token in the site's database (audited as `token.created`), as
    `fedsite tokens add` creates it. With --force, an active token of that name is revoked first
    (audited too): the new hand-off replaces the old one."""
    cfg = load_config(config_path, check_paths=False)
    db = open_database(cfg.db_url)
    try:
        audit = AuditLog(db)
        active = [t for t in list_tokens(db, include_revoked=False) if t.name == spec.token_name]
        if active:
            if not spec.force:
                raise ConfigError(
                    f"an active token named {spec.token_name!r} exists; pass --force to replace it"
                )
            revoke_token(db, audit, spec.token_name, spec.actor)
        try:
            return create_token(db, audit, spec.token_name, "coordinator", spec.actor)
        except TokenError as exc:
            raise ConfigError(str(exc)) from None
    finally:
        db.dispose()
