"""The admin guide (deploy/README.md) as deploy/guide-check.sh runs it: the blocks it extracts,
in their order, without an engine. `make e2e-docker` runs the same script on a real one."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "deploy" / "README.md"
CHECK = ROOT / "deploy" / "guide-check.sh"


PASSES = ("quick-start", "steps")


def _script(pass_: str = "steps") -> str:
    """The bash script guide-check.sh would run for one pass (`--list` runs nothing)."""
    proc = subprocess.run(
        ["bash", str(CHECK), "--list", pass_], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _commands(pass_: str = "steps") -> list[str]:
    """The guide's commands that the check runs in a pass, one per (continued) line, comments
    dropped."""
    text = re.sub(r"\\\n\s*", " ", _script(pass_))
    out = []
    for line in text.splitlines():
        if line.startswith(("guide_step=", 'echo "[guide-check]', "set -euo", "trap ", 'if [ "$(id -u)"')):
            continue
        out.append(line.split("  #")[0].strip())
    return [c for c in out if c]


def _index(commands: list[str], needle: str) -> int:
    found = [i for i, c in enumerate(commands) if needle in c]
    assert found, f"no command of the guide's checked blocks contains {needle!r}"
    return found[0]


@pytest.mark.parametrize("pass_", PASSES)
def test_the_extracted_guide_is_valid_bash_and_skips_only_marked_blocks(pass_: str) -> None:
    script = _script(pass_)
    proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    fences = re.findall(r"^```sh\s*$", GUIDE.read_text(), flags=re.M)
    blocks = re.findall(r"block \d+ \(deploy/README.md line \d+\)", script)
    assert len(set(blocks)) == len(fences)
    for reason in re.findall(r"skipped: (.*)\" >&2", script):
        assert reason.strip(), "a skipped block must say why"


def test_every_block_runs_in_one_pass_or_is_skipped_with_its_reason() -> None:
    run = {p: set(re.findall(r'guide_step="(block \d+) ', _script(p))) for p in PASSES}
    assert run["quick-start"] and run["steps"]
    assert not run["quick-start"] & run["steps"]
    skipped = set(re.findall(r"\[guide-check\] (block \d+) .* skipped: (?!run in the)", _script("steps")))
    fences = re.findall(r"^```sh\s*$", GUIDE.read_text(), flags=re.M)
    assert len(run["quick-start"] | run["steps"] | skipped) == len(fences)


def test_the_init_quick_start_is_checked_from_init_to_teardown() -> None:
    """The quick start, as guide-check's quick-start pass runs it: `fedsite init` writes the site
    without asking, compose brings it up, the hand-off files reach /v1/info over mutual TLS."""
    cmds = _commands("quick-start")
    init = cmds[_index(cmds, " init ")]
    assert "--non-interactive" in init and "--demo-data" in init
    # No terminal in a script: `docker run -it` would fail before init starts.
    assert not re.search(r"docker run [^|]*-it?\b", init), init
    up = _index(cmds, "docker-compose up -d")
    assert _index(cmds, "chown 10001 tls/server.key") < _index(cmds, " config check ") < up
    info = cmds[_index(cmds, "/v1/info")]
    assert _index(cmds, "/v1/info") > up
    for part in (
        "--cacert handoff/ca.crt",
        "--cert handoff/coordinator.crt",
        "--key handoff/coordinator.key",
        "Authorization: Bearer $(cat handoff/coordinator.token)",
    ):
        assert part in info, info
    hosts = set(["localhost", "127.0.0.1", "agent"]) | set(re.findall(r"--hosts (\S+)", init)[0].split(","))
    assert set(re.findall(r"https://([^:/\s]+)", "\n".join(cmds))) <= hosts
    assert cmds[-1] == "docker-compose down -v"


def test_the_guide_runs_in_the_order_that_works() -> None:
    cmds = _commands()
    certs = _index(cmds, " certs init ")
    check = _index(cmds, " config check ")
    token = _index(cmds, " tokens add ")
    up = _index(cmds, "docker-compose up -d")
    # The config names the TLS files: checking it before they exist always fails.
    assert certs < check < up
    assert token < up
    assert _index(cmds, "Authorization: Bearer") > up
    assert _index(cmds, "--force-recreate") > up
    assert _index(cmds, " coordinate ") > _index(cmds, " plans approve ")
    assert cmds[-1] == "docker-compose down -v"


def test_the_certificate_names_include_every_host_the_guide_connects_to() -> None:
    cmds = _commands()
    hosts = re.search(r"--hosts (\S+)", cmds[_index(cmds, " certs init ")])
    assert hosts is not None
    names = set(hosts.group(1).split(","))
    urls = re.findall(r"https://([^:/\s]+)", "\n".join(cmds))
    assert urls
    assert set(urls) <= names, f"the guide connects to {set(urls) - names} without a certificate name for it"


def test_compose_commands_work_with_debian_compose_and_in_scripts() -> None:
    cmds = _commands("steps") + _commands("quick-start")
    for c in cmds:
        # Debian's package is Compose 1.x: `docker-compose`; v2's `docker compose` is named in prose.
        assert "docker compose " not in c, c
        # Without -T, `exec` (and `run`, where stdout is a file) fail without a terminal.
        if re.search(r"docker-compose (exec|run) ", c):
            assert re.search(r"docker-compose (exec|run) (--rm )?-T ", c), c
    # The audit export reaches the host, not only the work volume.
    export = cmds[_index(cmds, " audit export ")]
    assert re.search(r"> *audit[^>]*\.jsonl$", export) and "-o /var/lib" not in export


def test_the_guide_states_what_the_example_config_sets_and_the_build_without_a_registry() -> None:
    guide = GUIDE.read_text()
    example = yaml.safe_load((ROOT / "deploy" / "config" / "site.yaml.example").read_text())
    policy = example["approval"]["policy"]
    assert f"approval.policy: {policy}" in guide
    # The offline build comes first, with the base image the Debian mirror gives.
    offline = guide.index("Without access to an image registry")
    online = guide.index("With registry access")
    assert offline < online
    first_build = guide[offline:online]
    assert "docker/build-base.sh" in first_build
    assert "make wheelhouse" in first_build
    assert "--build-arg BASE_IMAGE=fedsite-base:bookworm" in first_build
    # setfacl needs its package; a changed config needs a recreated container.
    assert "apt-get install -y acl" in guide
    assert "docker-compose up -d --force-recreate" in guide
