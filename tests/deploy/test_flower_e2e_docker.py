"""The Flower federation demo under a real Docker engine (deploy/flower/docker-compose.demo.yml).

Needs both images: the agent's (FEDSITE_E2E_IMAGE, default fedsite:latest; it must have the
`fedsite flower` command) and the Flower image (FEDSITE_E2E_FLOWER_IMAGE, default
fedsite-flower:latest, docker/flower.Dockerfile); skipped when no engine answers or an image is
missing. Marked `docker`: not part of `make test`. How to build the images and run it is in
deploy/README.md, "The Flower federation demo". The compose project is always brought down,
volumes included, whatever the outcome.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Bounded below: compose up 900 s, the run 1200 s, down 300 s; this only catches a hang outside.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(2520)]

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "deploy" / "flower" / "docker-compose.demo.yml"
IMAGE = os.environ.get("FEDSITE_E2E_IMAGE", "fedsite:latest")
FLOWER_IMAGE = os.environ.get("FEDSITE_E2E_FLOWER_IMAGE", "fedsite-flower:latest")
SITES = ("site-1", "site-2", "site-3")
ROUNDS = 2


def _run(args: list[str], *, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} -> {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def _ready() -> str | None:
    """Why the test cannot run here, or None."""
    if shutil.which("docker") is None or shutil.which("docker-compose") is None:
        return "docker and docker-compose are needed"
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
            return "no Docker engine answers"
    except subprocess.TimeoutExpired:
        return "no Docker engine answers"
    for image in (IMAGE, FLOWER_IMAGE):
        if (
            subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=60).returncode
            != 0
        ):
            return f"image {image} is not built"
    return None


class Demo:
    def __init__(self, project: str) -> None:
        self.project = project
        self.base = ["docker-compose", "-f", str(DEMO), "-p", project]
        self.env = {
            **os.environ,
            "FEDSITE_IMAGE": IMAGE,
            "FEDSITE_FLOWER_IMAGE": FLOWER_IMAGE,
            "DEMO_ROUNDS": str(ROUNDS),
        }

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=timeout, env=self.env
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} -> {proc.returncode}\n{proc.stderr[-4000:]}")
        return proc

    def container(self, service: str) -> str:
        cid = self("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def logs(self) -> str:
        return self("logs", "--no-color", "--tail", "60", check=False).stdout[-8000:]

    def read(self, service: str, path: str) -> bytes:
        """A file from a (possibly exited) container's mounts, via `docker cp` (no new container)."""
        proc = subprocess.run(
            ["docker", "cp", f"{self.container(service)}:{path}", "-"], capture_output=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
            member = tar.extractfile(Path(path).name)
            assert member is not None, path
            return member.read()


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    reason = _ready()
    if reason is not None:
        pytest.skip(reason)
    d = Demo(f"fedsite-flower-e2e-{uuid.uuid4().hex[:8]}")
    try:
        up = d("up", "-d", check=False, timeout=900)
        if up.returncode != 0:
            raise AssertionError(f"compose up failed:\n{up.stderr[-2000:]}\n{d.logs()}")
        runner = d.container("runner")
        try:
            waited = _run(["docker", "wait", runner], timeout=1200).stdout.strip()
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the runner still runs after 1200 s\n{d.logs()}") from None
        if waited != "0":
            raise AssertionError(f"the runner exited with {waited}\n{d.logs()}")
        yield d
    finally:
        d("down", "-v", "--remove-orphans", "--timeout", "20", check=False, timeout=300)


def _audit_events(demo: Demo, site: str) -> list[dict[str, Any]]:
    proc = demo(
        "exec", "-T", site, "fedsite", "audit", "export", "--config", f"/demo/sites/{site}/config.yaml"
    )
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_two_fedavg_rounds_under_flower_complete_at_every_site(demo: Demo) -> None:
    results = json.loads(demo.read("superlink", "/results/flower/results.json"))
    rounds = results["rounds"]
    assert [r["index"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:
        assert sorted(r["participants"]) == list(SITES), r
        assert r["left_out"] == []


def test_each_agent_released_exactly_what_the_server_app_received(demo: Demo) -> None:
    received = [
        json.loads(line)
        for line in demo.read("superlink", "/results/flower/received_updates.jsonl").splitlines()
    ]
    for site in SITES:
        events = _audit_events(demo, site)
        sent = [e["details"]["sha256"] for e in events if e["action"] == "egress.sent"]
        got = [r["sha256"] for r in sorted(received, key=lambda r: r["round"]) if r["site"] == site]
        # One release per round, and the ServerApp's hash of each is the audit log's.
        assert len(sent) == ROUNDS, (site, sent)
        assert got == sent, (site, got, sent)
        verify = demo(
            "exec", "-T", site, "fedsite", "audit", "verify", "--config", f"/demo/sites/{site}/config.yaml"
        )
        assert verify.returncode == 0


_PROBE = (
    "import socket, sys\n"
    "for t in sys.argv[1:]:\n"
    "    h, p = t.rsplit(':', 1)\n"
    "    try:\n"
    "        socket.create_connection((h, int(p)), timeout=5).close(); print(t, 'open')\n"
    "    except OSError:\n"
    "        print(t, 'closed')\n"
)


def _probe(demo: Demo, service: str, *targets: str) -> dict[str, str]:
    proc = demo("exec", "-T", service, "python", "-c", _PROBE, *targets)
    return dict(line.split() for line in proc.stdout.splitlines())


def test_an_agent_reaches_nothing_and_a_supernode_only_its_agent_and_the_superlink(demo: Demo) -> None:
    assert _probe(demo, "site-1", "superlink:9092", "supernode-2:9094", "site-2:8443") == {
        "superlink:9092": "closed",
        "supernode-2:9094": "closed",
        "site-2:8443": "closed",
    }
    assert _probe(demo, "supernode-1", "site-1:8443", "superlink:9092", "site-2:8443") == {
        "site-1:8443": "open",
        "superlink:9092": "open",
        "site-2:8443": "closed",
    }
    for cid in demo("ps", "-q").stdout.split():
        ports = json.loads(
            _run(["docker", "inspect", "--format", "{{json .NetworkSettings.Ports}}", cid]).stdout
        )
        assert not any(ports.values()), (cid, ports)
