"""The Flower deployment files (deploy/flower/, docker/flower.Dockerfile): the compose files pass
`docker-compose config` (no engine needed) and keep what deploy/README.md promises a site admin:
nothing published, the agent on an internal network with its SuperNode only, the token a file,
the SuperNode's one way out the SuperLink over verified TLS, no package installation at run time.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_compose import ROOT, _compose, _config, _volumes, needs_compose

FLOWER = ROOT / "deploy" / "flower"
SITE = FLOWER / "docker-compose.site.yml"
DEMO = FLOWER / "docker-compose.demo.yml"
APP = ROOT / "integrations" / "flower"
SITE_ENV = {
    "FEDSITE_DATA_DIR": "/srv/imaging",
    "FLOWER_SUPERLINK": "superlink.consortium.example:9092",
    "FEDSITE_SITE_ID": "hospital-a",
}
SITES = ("site-1", "site-2", "site-3")


def _networks(service: dict[str, Any]) -> list[str]:
    return sorted(service.get("networks", ["default"]))


def _arg(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def _node_config(command: list[str]) -> dict[str, str]:
    """The SuperNode's --node-config "k='v' ..." as a dict (Flower parses it as TOML values)."""
    return dict(item.split("=", 1) for item in shlex.split(_arg(command, "--node-config")))


def _members(services: dict[str, Any], network: str) -> list[str]:
    return sorted(name for name, svc in services.items() if network in _networks(svc))


# One site: docker-compose.site.yml


@needs_compose
def test_site_publishes_nothing_and_only_the_supernode_leaves_the_internal_network() -> None:
    cfg = _config(SITE, env=SITE_ENV)
    services = cfg["services"]
    assert sorted(services) == ["agent", "supernode"]
    for name, svc in services.items():
        assert not svc.get("ports"), name
        assert not svc.get("network_mode"), name
    assert cfg["networks"]["site"]["internal"] is True
    assert not cfg["networks"]["egress"].get("internal")
    # The agent has no route out of the site; the SuperNode is its only peer.
    assert _networks(services["agent"]) == ["site"]
    assert _networks(services["supernode"]) == ["egress", "site"]
    assert _members(services, "site") == ["agent", "supernode"]
    assert _members(services, "egress") == ["supernode"]


@needs_compose
def test_site_data_and_work_volume_are_the_agents_only() -> None:
    services = _config(SITE, env=SITE_ENV)["services"]
    agent, supernode = _volumes(services["agent"]), _volumes(services["supernode"])
    assert agent["/data"] == ("/srv/imaging", True)
    assert agent["/var/lib/fedsite"] == ("fedsite-work", False)
    assert agent["/etc/fedsite/config.yaml"][1] is True
    # The SuperNode sees the SuperLink's CA certificate (read-only) and nothing of the agent's.
    assert list(supernode) == ["/etc/flower/superlink-ca.crt"]
    assert supernode["/etc/flower/superlink-ca.crt"][1] is True
    for svc in services.values():
        assert svc["read_only"] is True
        assert svc["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in svc["security_opt"]


@needs_compose
def test_site_supernode_command_talks_tls_to_the_superlink_and_names_its_agent() -> None:
    services = _config(SITE, env=SITE_ENV)["services"]
    command = services["supernode"]["command"]
    assert command[0] == "flower-supernode"
    assert _arg(command, "--superlink") == SITE_ENV["FLOWER_SUPERLINK"]
    assert _arg(command, "--root-certificates") == "/etc/flower/superlink-ca.crt"
    assert _arg(command, "--isolation") == "subprocess"
    assert "--insecure" not in command
    # A run must not install packages from an index at this site.
    assert "--allow-runtime-dependency-installation" not in command
    # Flower 1.42 refuses every bundle not fetched from Flower Hub under --trusted-entities
    # (flwr/supernode/start_client_internal.py): enabling it would refuse this federation's own
    # app. deploy/README.md says so; this test fails if someone adds it without changing both.
    assert "--trusted-entities" not in command
    node = _node_config(command)
    agent_port = services["agent"]["environment"]["FEDSITE_API__PORT"]
    assert node == {
        "agent-url": f"http://agent:{agent_port}",
        "token-file": "/run/secrets/agent_token",
        "site": SITE_ENV["FEDSITE_SITE_ID"],
    }


@needs_compose
def test_site_agent_token_is_a_secret_file_never_inline(tmp_path: Path) -> None:
    token = tmp_path / "agent.token"
    cfg = _config(SITE, env={**SITE_ENV, "FLOWER_AGENT_TOKEN_FILE": str(token)})
    assert cfg["secrets"] == {"agent_token": {"file": str(token)}}
    secrets = cfg["services"]["supernode"]["secrets"]
    assert [s["source"] if isinstance(s, dict) else s for s in secrets] == ["agent_token"]
    # The agent does not get it, and no environment carries a token.
    assert "secrets" not in cfg["services"]["agent"]
    for svc in cfg["services"].values():
        assert not [k for k in svc.get("environment", {}) if "TOKEN" in k.upper()]


@needs_compose
@pytest.mark.parametrize("missing", ["FLOWER_SUPERLINK", "FEDSITE_SITE_ID", "FEDSITE_DATA_DIR"])
def test_site_refuses_to_start_without_its_required_settings(missing: str) -> None:
    env = {k: v for k, v in SITE_ENV.items() if k != missing}
    proc = _compose("-f", str(SITE), "config", env=env)
    assert proc.returncode != 0
    assert missing in proc.stderr


def test_site_env_example_names_every_variable_the_site_file_reads() -> None:
    text = SITE.read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = (FLOWER / "site.env.example").read_text()
    defined = set(re.findall(r"^([A-Z_]+)=", example, flags=re.M))
    # FEDSITE_DATABASE_URL is the PostgreSQL override's (deploy/docker-compose.postgres.yml).
    assert used - {"FEDSITE_DATABASE_URL"} <= defined, used - defined
    assert re.search(r"^COMPOSE_FILE=docker-compose\.site\.yml$", example, flags=re.M)


# The local federation: docker-compose.demo.yml


@needs_compose
def test_demo_sites_are_each_on_their_own_internal_network_with_their_supernode() -> None:
    cfg = _config(DEMO)
    services = cfg["services"]
    assert sorted(services) == sorted(
        ["setup", "superlink", "runner", *SITES, *(f"supernode-{k}" for k in (1, 2, 3))]
    )
    for name, svc in services.items():
        assert not svc.get("ports"), name
    for k, site in enumerate(SITES, start=1):
        assert cfg["networks"][site]["internal"] is True
        assert _networks(services[site]) == [site]
        assert _networks(services[f"supernode-{k}"]) == ["fleet", site]
        assert _members(services, site) == [site, f"supernode-{k}"]
    assert cfg["networks"]["fleet"]["internal"] is True
    assert _members(services, "fleet") == ["runner", "superlink", "supernode-1", "supernode-2", "supernode-3"]
    # The set-up runs before anything is on a network (no network of the demo's own).
    assert _networks(services["setup"]) == ["default"]


@needs_compose
def test_demo_supernodes_reach_their_own_agent_with_their_own_token() -> None:
    services = _config(DEMO)["services"]
    for k, site in enumerate(SITES, start=1):
        node = services[f"supernode-{k}"]
        command = node["command"]
        assert _arg(command, "--superlink") == "superlink:9092"
        assert _arg(command, "--root-certificates") == "/flower/superlink-ca.crt"
        assert "--insecure" not in command
        assert "--allow-runtime-dependency-installation" not in command
        port = services[site]["environment"]["FEDSITE_API__PORT"]
        assert _node_config(command) == {
            "agent-url": f"http://{site}:{port}",
            "token-file": "/flower/agent.token",
            "site": site,
        }
        # Its own volume, read-only: the token of its site and the SuperLink's CA, nothing else.
        assert _volumes(node) == {"/flower": (f"flower-site-{k}", True)}
        assert node["depends_on"][site]["condition"] == "service_healthy"
        assert _volumes(services[site])["/var/lib/fedsite"] == (f"site-{k}-work", False)
        assert _volumes(services[site])["/demo"] == ("demo", True)


@needs_compose
def test_demo_superlink_serves_tls_and_installs_nothing_at_run_time() -> None:
    services = _config(DEMO)["services"]
    command = services["superlink"]["command"]
    assert command[0] == "flower-superlink"
    # One HTTP address for the Fleet, Control and Runtime APIs in Flower 1.42: the one the
    # SuperNodes and the runner are given.
    assert (_arg(command, "--host"), _arg(command, "--port")) == ("0.0.0.0", "9092")
    run = (FLOWER / "demo-run.sh").read_text()
    assert 'address = "superlink:9092"' in run
    assert _arg(command, "--ssl-certfile") == "/flower/superlink/server.crt"
    assert _arg(command, "--ssl-keyfile") == "/flower/superlink/server.key"
    assert _arg(command, "--ssl-ca-certfile") == "/flower/superlink/ca.crt"
    assert "--insecure" not in command
    assert "--disable-runtime-dependency-installation" in command
    mounts = _volumes(services["superlink"])
    assert mounts["/flower/superlink"] == ("flower-superlink", True)
    assert mounts["/results"] == ("results", False)
    runner = _volumes(services["runner"])
    assert runner["/app"] == (str(APP), True)
    assert runner["/flower"] == ("flower-runner", True)


@needs_compose
def test_demo_only_the_setup_writes_the_flower_volumes() -> None:
    services = _config(DEMO)["services"]
    setup = _volumes(services["setup"])
    flower_volumes = {f"flower-site-{k}" for k in (1, 2, 3)} | {"flower-superlink", "flower-runner"}
    assert {src for src, ro in setup.values() if not ro} >= flower_volumes | {"demo", "results"}
    for name, svc in services.items():
        if name == "setup":
            continue
        for target, (src, ro) in _volumes(svc).items():
            if src in flower_volumes or src == "demo":
                assert ro, f"{name} mounts {src} at {target} writable"


def test_demo_run_config_keys_are_the_apps_and_the_setup_writes_the_files_they_name() -> None:
    app_config = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    run = (FLOWER / "demo-run.sh").read_text()
    keys = set(re.findall(r"([a-z][a-z-]+)=['$0-9]", " ".join(re.findall(r'run_config="([^"]*)"', run))))
    assert keys == {"plan-file", "initial-weights", "out-dir", "num-server-rounds", "min-nodes", "sites"}
    assert keys <= set(app_config)
    setup = (FLOWER / "demo-setup.sh").read_text()
    for path in re.findall(r"'(/flower/superlink/[^']+)'", run):
        assert f'"$link/{Path(path).name}"' in setup, path
    # Every file the compose file hands to Flower's commands is one the set-up writes.
    for name in ("server.crt", "server.key", "ca.crt"):
        assert f'"$link/{name}"' in setup
    assert '"$dir/agent.token"' in setup and '"$dir/superlink-ca.crt"' in setup
    assert "/flower/runner/superlink-ca.crt" in setup


def test_node_config_keys_are_the_ones_the_client_app_reads() -> None:
    """The bridge reads its node config by these names (fedsite_flower/agent_api.py and
    client_app.py); checked in the source, as the agent's venv has no flwr to import it with."""
    source = "\n".join(p.read_text() for p in (APP / "fedsite_flower").glob("*.py"))
    for key in ("agent-url", "token-file", "site"):
        assert f'"{key}"' in source, key


def test_flower_scripts_are_valid_sh() -> None:
    for name in ("demo-setup.sh", "demo-run.sh"):
        proc = subprocess.run(["sh", "-n", str(FLOWER / name)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


def test_flower_compose_files_are_plain_yaml_without_secrets() -> None:
    for path in (SITE, DEMO):
        text = path.read_text()
        yaml.safe_load(text)
        assert not re.search(r"(?i)(password|token|secret)\s*:\s*['\"]?[A-Za-z0-9+/]{12,}", text), path
        assert not re.search(r"(?i)token\s*=\s*['\"]?[A-Za-z0-9_-]{16,}", text), path


def test_flower_site_files_are_git_ignored() -> None:
    paths = ["deploy/flower/.env", "deploy/flower/config/site.yaml", "deploy/flower/flower/agent.token"]
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert sorted(proc.stdout.split()) == sorted(paths), proc.stderr


# The image


def _instructions(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_flower_dockerfile_is_offline_torch_free_and_not_root() -> None:
    ins = _instructions(ROOT / "docker" / "flower.Dockerfile")
    froms = [i for i, (w, _) in enumerate(ins) if w == "FROM"]
    assert [ins[i][1] for i in froms] == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"]
    runtime = ins[froms[1] :]
    assert ("USER", "10002:10002") in runtime
    assert [rest for word, rest in runtime if word == "COPY"] == ["--from=builder /opt/venv /opt/venv"]
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    for setting in ("FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_UPDATE_CHECK=1", "PATH=/opt/venv/bin:$PATH"):
        assert setting in env
    build = " ".join(rest for word, rest in ins[: froms[1]] if word == "RUN")
    assert "PIP_NO_INDEX=1" in build
    assert "find_spec('torch') is None" in build


def test_wheelhouse_script_has_a_flower_variant() -> None:
    text = (ROOT / "docker" / "wheelhouse.sh").read_text()
    assert 'if [ "$variant" = flower ]' in text
    assert "integrations/flower" in text
    # The agent's variants are unchanged; an unknown one names the Flower variant too.
    proc = subprocess.run(
        ["bash", str(ROOT / "docker" / "wheelhouse.sh"), "/nonexistent/wh", "rocm"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "or flower" in proc.stderr
