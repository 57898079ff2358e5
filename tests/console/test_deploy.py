"""How a site reaches its console: the compose override and the admin guide's section."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERRIDE = ROOT / "deploy" / "docker-compose.console.yml"
GUIDE = ROOT / "deploy" / "README.md"


def test_the_console_override_publishes_on_the_hosts_loopback_and_never_the_api_port() -> None:
    agent = yaml.safe_load(OVERRIDE.read_text())["services"]["agent"]
    assert agent["environment"]["FEDSITE_CONSOLE__PORT"] == "8444"
    (port,) = agent["ports"]
    bind, host_port, container_port = re.fullmatch(r"\$\{(.+)\}:\$\{(.+)\}:(\d+)", port).groups()  # type: ignore[union-attr]
    assert bind == "FEDSITE_CONSOLE_BIND:-127.0.0.1"
    assert host_port == "FEDSITE_CONSOLE_PORT:-8444" and container_port == "8444"
    site = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    assert site["x-agent"]["environment"]["FEDSITE_API__PORT"] != container_port


def test_the_guide_says_how_to_reach_the_console_and_make_an_account() -> None:
    guide = GUIDE.read_text()
    section = guide[guide.index("## The admin console") :]
    section = section[: section.index("\n## ", 4)] if "\n## " in section[4:] else section
    for needed in (
        "console:",
        "enabled: true",
        "fedsite admin-users add",
        "ssh -L 8444:127.0.0.1:8444",
        "docker-compose.console.yml",
        "FEDSITE_CONSOLE_BIND",
        "console.tls",
    ):
        assert needed in section, needed


@pytest.mark.skipif(
    shutil.which("docker-compose") is None and not os.environ.get("CI"),
    reason="docker-compose is not installed",
)
def test_compose_merges_the_override_with_the_listen_and_the_outbound_site(tmp_path: Path) -> None:
    compose = shutil.which("docker-compose")
    assert compose is not None, "docker-compose is not installed (CI must install it)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDSITE_", "COMPOSE_"))}
    env["FEDSITE_DATA_DIR"] = str(tmp_path)
    published = {}
    for site in ("docker-compose.yml", "docker-compose.outbound.yml"):
        proc = subprocess.run(
            [compose, "-f", site, "-f", OVERRIDE.name, "config"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=ROOT / "deploy",
        )
        assert proc.returncode == 0, proc.stderr
        ports = yaml.safe_load(proc.stdout)["services"]["agent"]["ports"]
        published[site] = sorted(str(p if isinstance(p, str) else p["published"]) for p in ports)
    assert any("127.0.0.1:8444:8444" in p or p == "8444" for p in published["docker-compose.outbound.yml"])
    assert len(published["docker-compose.outbound.yml"]) == 1
    assert len(published["docker-compose.yml"]) == 2


def test_the_readme_shows_two_screenshots_of_the_console() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The admin console") :]
    section = section[: section.index("\n## ", 4)]
    shots = re.findall(r"!\[[^\]]+\]\((docs/console-[a-z-]+\.png)\)", section)
    assert len(shots) == 2
    for shot in shots:
        data = (ROOT / shot).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
