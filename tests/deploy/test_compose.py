"""The deployment files: the compose files pass `docker-compose config` (no engine needed)
and say what the admin guide promises; the Dockerfile and the build context keep secrets out."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SITE = DEPLOY / "docker-compose.yml"
GPU = DEPLOY / "docker-compose.gpu.yml"
POSTGRES = DEPLOY / "docker-compose.postgres.yml"
DEMO = DEPLOY / "federation-demo.yml"
OUTBOUND = DEPLOY / "docker-compose.outbound.yml"
COMPOSE = shutil.which("docker-compose")

# CI installs docker-compose (.ci/run); elsewhere the compose checks need it installed.
needs_compose = pytest.mark.skipif(
    COMPOSE is None and not os.environ.get("CI"), reason="docker-compose is not installed"
)


def _engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None, "docker-compose is not installed (CI must install it)"
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FEDSITE_", "DEMO_", "COMPOSE_")) and not k.upper().endswith("_PROXY")
    }
    full_env.update(env or {})
    return subprocess.run(
        [COMPOSE, *args], capture_output=True, text=True, timeout=120, env=full_env, cwd=ROOT
    )


def _config(
    *files: Path, env: dict[str, str] | None = None, profiles: tuple[str, ...] = ()
) -> dict[str, Any]:
    args: list[str] = []
    for f in files:
        args += ["-f", str(f)]
    for p in profiles:
        args += ["--profile", p]
    proc = _compose(*args, "config", env=env)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def _volumes(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only) for the service's mounts, from either syntax."""
    out: dict[str, tuple[str, bool]] = {}
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            parts = vol.split(":")
            out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
        else:
            out[vol["target"]] = (vol.get("source", ""), bool(vol.get("read_only")))
    return out


@needs_compose
def test_site_compose_mounts_limits_and_restart(tmp_path: Path) -> None:
    cfg = _config(SITE, env={"FEDSITE_DATA_DIR": str(tmp_path)})
    agent = cfg["services"]["agent"]
    assert "profiles" not in agent
    mounts = _volumes(agent)
    assert mounts["/data"] == (str(tmp_path), True)
    assert mounts["/etc/fedsite/config.yaml"][1] is True
    assert mounts["/etc/fedsite/tls"][1] is True
    assert mounts["/var/lib/fedsite"] == ("fedsite-work", False)
    assert "fedsite-work" in cfg["volumes"]
    assert agent["restart"] == "unless-stopped"
    assert agent["mem_limit"] == "8g"
    assert agent["read_only"] is True
    assert agent["cap_drop"] == ["ALL"]
    assert agent["command"] == ["serve", "--config", "/etc/fedsite/config.yaml"]
    assert agent["environment"]["FEDSITE_API__PORT"] == "8443"
    # Published on loopback unless the admin picks an interface.
    ports = agent["ports"]
    assert len(ports) == 1
    port = ports[0] if isinstance(ports[0], str) else f"{ports[0]['host_ip']}:{ports[0]['published']}"
    assert port.startswith("127.0.0.1:8443")


@needs_compose
def test_site_compose_requires_the_data_folder() -> None:
    proc = _compose("-f", str(SITE), "config")
    assert proc.returncode != 0
    assert "FEDSITE_DATA_DIR" in proc.stderr


@needs_compose
def test_site_compose_postgres_override_and_database_url(tmp_path: Path) -> None:
    url = "postgresql+psycopg://fedsite:pw@postgres:5432/fedsite"
    cfg = _config(SITE, POSTGRES, env={"FEDSITE_DATA_DIR": str(tmp_path), "FEDSITE_DATABASE_URL": url})
    assert sorted(cfg["services"]) == ["agent", "postgres"]
    agent = cfg["services"]["agent"]
    assert agent["environment"]["FEDSITE_DATABASE_URL"] == url
    assert "postgres" in agent["depends_on"]
    pg = cfg["services"]["postgres"]
    assert pg["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "POSTGRES_PASSWORD" not in pg["environment"]
    assert _volumes(pg)["/var/lib/postgresql/data"][0] == "fedsite-postgres"
    assert cfg["secrets"]["postgres_password"]["file"].endswith("postgres_password.txt")


@needs_compose
def test_site_compose_without_postgres_has_no_secret_file(tmp_path: Path) -> None:
    """docker-compose 1.x checks every secret file on every command (`ps`, `run`, `up`) and
    warns about a missing one, profile or not: a SQLite site must define none."""
    cfg = _config(SITE, env={"FEDSITE_DATA_DIR": str(tmp_path)})
    assert sorted(cfg["services"]) == ["agent"]
    assert "secrets" not in cfg


@needs_compose
@pytest.mark.skipif(not _engine_answers(), reason="no Docker engine answers")
def test_site_compose_commands_print_no_warning_about_the_postgres_secret(tmp_path: Path) -> None:
    # `ps` builds the whole project, as `run` and `up` do, and changes nothing.
    proc = _compose(
        "-f", str(SITE), "-p", "fedsite-compose-test", "ps", env={"FEDSITE_DATA_DIR": str(tmp_path)}
    )
    assert proc.returncode == 0, proc.stderr
    assert "secret" not in proc.stderr.lower(), proc.stderr
    assert "postgres" not in proc.stderr.lower(), proc.stderr


def test_site_files_and_the_ca_key_are_git_ignored() -> None:
    """The guide makes the site's folder from deploy/ (and copies deploy/.gitignore into it):
    the CA key under pki/ and every other site file must never be committed."""
    paths = [
        "deploy/pki/ca.key",
        "deploy/pki/clients/coordinator.key",
        "deploy/tls/server.key",
        "deploy/.env",
        "deploy/config/site.yaml",
        "deploy/coordinator.token",
        "deploy/postgres_password.txt",
        "deploy/audit-2026-01-01.jsonl",
    ]
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert sorted(proc.stdout.split()) == sorted(paths), proc.stderr


@needs_compose
def test_gpu_override_reserves_a_device(tmp_path: Path) -> None:
    cfg = _config(SITE, GPU, env={"FEDSITE_DATA_DIR": str(tmp_path)})
    agent = cfg["services"]["agent"]
    devices = agent["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "count": 1, "driver": "nvidia"}]
    assert agent["environment"]["FEDSITE_DEVICE"] == "cuda"
    # The override adds to the site file; the mounts stay.
    assert _volumes(agent)["/data"] == (str(tmp_path), True)


@needs_compose
def test_federation_demo_three_sites_over_mutual_tls() -> None:
    cfg = _config(DEMO, env={"DEMO_ROUNDS": "2"})
    services = cfg["services"]
    assert sorted(services) == ["coordinator", "setup", "site-1", "site-2", "site-3"]
    for name, svc in services.items():
        # Traffic stays on the project's network: nothing is published on the host.
        assert not svc.get("ports"), name
    # site-1 and site-2 listen (push mode); site-3 is outbound-only (the tests at the end).
    for k in (1, 2):
        site = services[f"site-{k}"]
        env = site["environment"]
        assert env["FEDSITE_API__TLS__CERT_FILE"] == f"/demo/pki/site-{k}/agent/server.crt"
        assert env["FEDSITE_API__TLS__KEY_FILE"] == f"/demo/pki/site-{k}/agent/server.key"
        assert env["FEDSITE_API__TLS__CLIENT_CA_FILE"] == f"/demo/pki/site-{k}/agent/ca.crt"
        assert yaml.safe_load(env["FEDSITE_API__TLS__ALLOWED_CLIENT_SUBJECTS"]) == ["CN=coordinator"]
        mounts = _volumes(site)
        assert mounts["/demo"] == ("demo", True)
        assert mounts["/var/lib/fedsite"] == (f"site-{k}-work", False)
        assert site["command"] == ["serve", "--config", f"/demo/sites/site-{k}/config.yaml"]
        assert site["depends_on"]["setup"]["condition"] == "service_completed_successfully"
        assert f"/demo/pki/site-{k}/agent/ca.crt" in site["healthcheck"]["test"]
        assert site["read_only"] is True and site["mem_limit"]
    for k in (1, 2, 3):
        # The setup service writes each site's database through the same volume.
        assert _volumes(services["setup"])[f"/work/site-{k}"] == (f"site-{k}-work", False)
    coordinator = services["coordinator"]
    command = coordinator["command"]
    assert command[:1] == ["coordinate"]
    assert command[command.index("--strategy") + 1] == "fedavg"
    assert command[command.index("--rounds") + 1] == "2"
    assert command[command.index("--federation") + 1] == "/demo/federation-docker.yaml"
    assert {s: d["condition"] for s, d in coordinator["depends_on"].items()} == {
        f"site-{k}": "service_healthy" for k in (1, 2, 3)
    }


def test_demo_setup_script_is_valid_sh_and_writes_the_federation_keys() -> None:
    script = DEPLOY / "demo-setup.sh"
    proc = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    for key in ("token_file:", "ca_file:", "client_cert:", "client_key:", "url: https://"):
        assert key in text
    for path in ("e2e-docker.sh", "guide-check.sh"):
        proc = subprocess.run(["bash", "-n", str(DEPLOY / path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_compose_files_are_plain_yaml_without_secrets() -> None:
    for path in (SITE, GPU, POSTGRES, DEMO, OUTBOUND):
        text = path.read_text()
        yaml.safe_load(text)
        assert not re.search(r"(?i)(password|token|secret)\s*:\s*['\"]?[A-Za-z0-9+/]{12,}", text), path


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_shape() -> None:
    ins = _dockerfile_instructions()
    assert ins[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"]
    runtime = ins[[i for i, (w, _) in enumerate(ins) if w == "FROM"][1] :]
    assert ("USER", "10001:10001") in runtime
    assert ("ENTRYPOINT", '["fedsite"]') in runtime
    assert ("CMD", '["serve", "--config", "/etc/fedsite/config.yaml"]') in runtime
    health = [rest for word, rest in runtime if word == "HEALTHCHECK"]
    assert len(health) == 1 and "probe_health" in health[0]
    # The venv is the only thing taken from the builder: no wheelhouse, no source tree.
    assert [rest for word, rest in runtime if word == "COPY"] == ["--from=builder /opt/venv /opt/venv"]
    build = " ".join(rest for word, rest in ins if word == "RUN")
    assert "PIP_NO_INDEX=1" in build
    assert "torch==${TORCH_VERSION}+cpu" in build
    assert "ARG TORCH_VARIANT=cpu" in (ROOT / "docker" / "Dockerfile").read_text()


def test_build_context_is_an_allow_list() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "agent", "coordinator", "wheelhouse"}


def test_wheelhouse_script_rejects_an_unknown_variant(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "docker" / "wheelhouse.sh"), str(tmp_path / "wh"), "rocm"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "TORCH_VARIANT must be cpu or cuda, not 'rocm'" in proc.stderr
    assert not (tmp_path / "wh").exists()


def test_make_targets_exist() -> None:
    proc = subprocess.run(
        ["make", "-n", "wheelhouse", "e2e-docker", "TORCH_VARIANT=cuda"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "docker/wheelhouse.sh wheelhouse cuda" in proc.stdout
    assert "deploy/e2e-docker.sh" in proc.stdout


# Outbound-only mode: the site compose file without a published port, the demo's pull site.


def _without(service: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in service.items() if k not in keys}


@needs_compose
def test_site_compose_outbound_publishes_no_port_and_is_the_listen_agent_otherwise(tmp_path: Path) -> None:
    env = {"FEDSITE_DATA_DIR": str(tmp_path)}
    outbound = _config(OUTBOUND, env=env)
    listen = _config(SITE, env=env)
    assert sorted(outbound["services"]) == ["agent"]
    agent = outbound["services"]["agent"]
    assert "ports" not in agent
    assert "profiles" not in agent
    # Health and /metrics (the only things an outbound agent serves) stay inside the container.
    assert agent["environment"]["FEDSITE_API__HOST"] == "127.0.0.1"
    assert listen["services"]["agent"]["ports"]
    # The same agent otherwise (image, limits, mounts, volume, command), so that the postgres and
    # gpu overrides and the guide's commands apply to both files alike.
    listen_env = listen["services"]["agent"]["environment"]
    assert {k: v for k, v in agent["environment"].items() if k != "FEDSITE_API__HOST"} == listen_env
    assert _without(agent, "environment") == _without(listen["services"]["agent"], "environment", "ports")
    assert outbound["volumes"] == listen["volumes"]


@needs_compose
def test_site_compose_outbound_takes_the_postgres_and_gpu_overrides(tmp_path: Path) -> None:
    url = "postgresql+psycopg://fedsite:pw@postgres:5432/fedsite"
    env = {"FEDSITE_DATA_DIR": str(tmp_path), "FEDSITE_DATABASE_URL": url}
    cfg = _config(OUTBOUND, POSTGRES, GPU, env=env)
    agent = cfg["services"]["agent"]
    assert sorted(cfg["services"]) == ["agent", "postgres"]
    assert "ports" not in agent and "ports" not in cfg["services"]["postgres"]
    assert agent["environment"]["FEDSITE_DATABASE_URL"] == url
    assert agent["environment"]["FEDSITE_DEVICE"] == "cuda"
    assert "postgres" in agent["depends_on"]


@needs_compose
@pytest.mark.parametrize("path", [SITE, OUTBOUND], ids=["listen", "outbound"])
def test_site_compose_passes_the_proxy_settings_to_the_agent(tmp_path: Path, path: Path) -> None:
    """The connector (outbound and both modes) honours HTTPS_PROXY/NO_PROXY: set in .env or
    the shell, they reach the container; unset, they are empty (a direct connection)."""
    proxy = {
        "HTTPS_PROXY": "http://proxy.hospital.example:3128",
        "NO_PROXY": "localhost,127.0.0.1,.hospital.example",
    }
    env = _config(path, env={"FEDSITE_DATA_DIR": str(tmp_path), **proxy})["services"]["agent"]["environment"]
    assert {k: env[k] for k in proxy} == proxy
    assert env["HTTP_PROXY"] == ""
    unset = _config(path, env={"FEDSITE_DATA_DIR": str(tmp_path)})["services"]["agent"]["environment"]
    assert {k: unset[k] for k in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY")} == dict.fromkeys(
        ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"), ""
    )


def _networks(service: dict[str, Any]) -> list[str]:
    # A list, or a mapping of network name to options: sorted() gives the names either way.
    return sorted(service.get("networks", ["default"]))


@needs_compose
def test_federation_demo_pull_site_is_on_an_internal_network_shared_only_with_the_coordinator() -> None:
    cfg = _config(DEMO)
    services = cfg["services"]
    assert cfg["networks"]["pull"]["internal"] is True
    members = sorted(name for name, svc in services.items() if "pull" in _networks(svc))
    assert members == ["coordinator", "site-3"]
    # The pull site is on no other network: no route to anything but the coordinator.
    assert _networks(services["site-3"]) == ["pull"]
    assert _networks(services["coordinator"]) == ["default", "pull"]
    for name in ("setup", "site-1", "site-2"):
        assert _networks(services[name]) == ["default"], name
    # demo-setup.sh makes exactly the sites on that network pull sites.
    pull = services["setup"]["environment"]["DEMO_PULL_SITES"].replace(",", " ").split()
    assert [f"site-{k}" for k in pull] == ["site-3"]


@needs_compose
def test_federation_demo_pull_site_opens_no_port_and_probes_its_loopback() -> None:
    site = _config(DEMO)["services"]["site-3"]
    assert not site.get("ports")
    env = site["environment"]
    assert env["FEDSITE_API__HOST"] == "127.0.0.1"
    # No API to serve: no server certificate, no client subjects.
    assert not [k for k in env if k.startswith("FEDSITE_API__TLS")]
    assert site["command"] == ["serve", "--config", "/demo/sites/site-3/config.yaml"]
    assert _volumes(site)["/demo"] == ("demo", True)
    assert _volumes(site)["/var/lib/fedsite"] == ("site-3-work", False)
    probe = " ".join(site["healthcheck"]["test"])
    assert "http://127.0.0.1:8443/v1/health" in probe
    assert site["depends_on"]["setup"]["condition"] == "service_completed_successfully"


@needs_compose
def test_federation_demo_coordinator_serves_the_relay_from_its_own_volume() -> None:
    services = _config(DEMO)["services"]
    command = services["coordinator"]["command"]
    assert command[command.index("--serve") + 1] == "0.0.0.0:8700"
    # The relay's database and chunks: a volume the setup service prepares (relay tokens) and
    # the coordinator writes; the demo volume stays read-only for it.
    assert _volumes(services["coordinator"])["/relay"] == ("relay", False)
    assert _volumes(services["setup"])["/relay"] == ("relay", False)
    assert _volumes(services["coordinator"])["/demo"] == ("demo", True)


def test_demo_setup_script_writes_the_pull_site_connect_section_and_its_relay_token() -> None:
    text = (DEPLOY / "demo-setup.sh").read_text()
    for key in (
        "relay add-site",
        "--token-file",
        "pull: true",
        "relay:",
        "connect:",
        "mode: outbound",
        "coordinator_url: $relay_url",
        "client_ca_file:",
    ):
        assert key in text, key
    # The relay's certificate names the host the pull sites connect to.
    url = re.search(r"^relay_url=(\S+)$", text, flags=re.M)
    assert url is not None
    host = url.group(1).split("//")[1].split(":")[0]
    hosts = re.search(r'certs init "\$demo/pki/relay" .*--hosts "([^"]+)"', text)
    assert hosts is not None and host in hosts.group(1).split(",")
    assert url.group(1).endswith(":8700")
