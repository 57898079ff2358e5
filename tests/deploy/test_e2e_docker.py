"""The image and the federation demo under a real Docker engine (`make e2e-docker`).

`make e2e-docker` starts the engine, builds the image and sets FEDSITE_E2E_IMAGE; run by
hand, these tests use that image (default fedsite:latest) and skip when no engine answers.
The compose project is always brought down, volumes included, whatever the outcome.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The project-wide pytest timeout (600 s) is too short for a federation brought up on a loaded
# machine; these tests have their own bounds (compose up 900 s + the coordinator 1200 s +
# down 300 s), and this one only catches a hang outside them.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(2520)]

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "deploy" / "federation-demo.yml"
IMAGE = os.environ.get("FEDSITE_E2E_IMAGE", "fedsite:latest")
SITES = ["site-1", "site-2", "site-3"]
# site-3 runs outbound-only (pull mode, through the coordinator's relay); the others listen.
PULL_SITE = "site-3"
ROUNDS = 2


def _engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


requires_engine = pytest.mark.skipif(not _engine_available(), reason="no Docker engine answers")


def _run(
    args: list[str], *, check: bool = True, timeout: float = 600, **kw: Any
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} -> {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def _docker_run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["docker", "run", "--rm", *args], check=check)


@requires_engine
def test_image_runs_as_non_root_without_secrets_and_cannot_write_the_data_mount(tmp_path: Path) -> None:
    inspect = json.loads(_run(["docker", "image", "inspect", IMAGE]).stdout)[0]["Config"]
    assert inspect["User"] == "10001:10001"
    assert inspect["Entrypoint"] == ["fedsite"]
    assert inspect["Cmd"] == ["serve", "--config", "/etc/fedsite/config.yaml"]
    assert "probe_health" in json.dumps(inspect["Healthcheck"])
    env = dict(item.split("=", 1) for item in inspect["Env"])
    assert not [k for k in env if any(w in k.upper() for w in ("TOKEN", "SECRET", "PASSWORD", "KEY"))]

    data = tmp_path / "data"
    data.mkdir()
    (data / "scan.nii.gz").write_bytes(b"image-bytes")
    # World-writable on the host: only the read-only mount stops the container.
    data.chmod(0o777)
    (data / "scan.nii.gz").chmod(0o666)
    # One container for all checks: on the vfs storage driver each container is a full copy.
    script = (
        "import errno, os, subprocess, torch\n"
        "out = [str(os.getuid()), str(os.getgid()), torch.__version__]\n"
        "out.append(str(sorted(os.listdir('/etc/fedsite'))))\n"
        "out.append(open('/data/scan.nii.gz', 'rb').read().decode())\n"
        "for op in ('create', 'modify', 'delete'):\n"
        "    try:\n"
        "        if op == 'create': open('/data/new.txt', 'w').write('x')\n"
        "        elif op == 'modify': open('/data/scan.nii.gz', 'a').write('x')\n"
        "        else: os.remove('/data/scan.nii.gz')\n"
        "        out.append(op + ':written')\n"
        "    except OSError as exc:\n"
        "        out.append(op + ':' + errno.errorcode[exc.errno])\n"
        "out.append(subprocess.run(['fedsite', 'version'], capture_output=True, text=True).stdout.strip())\n"
        "print(' '.join(out))\n"
    )
    proc = _docker_run("-v", f"{data}:/data:ro", "--read-only", "--entrypoint", "python", IMAGE, "-c", script)
    uid, gid, torch_version, config_dir, content, *writes, version = proc.stdout.split()
    assert (uid, gid) == ("10001", "10001")
    assert torch_version.endswith("+cpu")
    # No config, key or token is baked in: /etc/fedsite is an empty mount point.
    assert config_dir == "[]"
    assert content == "image-bytes"
    assert writes == ["create:EROFS", "modify:EROFS", "delete:EROFS"]
    assert version
    assert sorted(p.name for p in data.iterdir()) == ["scan.nii.gz"]
    assert (data / "scan.nii.gz").read_bytes() == b"image-bytes"


class Compose:
    def __init__(self, project: str) -> None:
        self.project = project
        self.base = ["docker-compose", "-f", str(DEMO), "-p", project]
        self.env = {**os.environ, "FEDSITE_IMAGE": IMAGE, "DEMO_ROUNDS": str(ROUNDS)}

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return _run([*self.base, *args], check=check, timeout=timeout, env=self.env)

    def container(self, service: str) -> str:
        cid = self("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def logs(self) -> str:
        return self("logs", "--no-color", "--tail", "60", check=False).stdout


@pytest.fixture(scope="module")
def federation() -> Iterator[Compose]:
    if not _engine_available():
        pytest.skip("no Docker engine answers")
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed")
    compose = Compose(f"fedsite-e2e-{uuid.uuid4().hex[:8]}")
    try:
        up = compose("up", "-d", check=False, timeout=900)
        if up.returncode != 0:
            raise AssertionError(f"compose up failed:\n{up.stderr[-2000:]}\n{compose.logs()}")
        coordinator = compose.container("coordinator")
        try:
            waited = _run(["docker", "wait", coordinator], timeout=1200).stdout.strip()
        except subprocess.TimeoutExpired:
            raise AssertionError(f"coordinator still running after 1200 s\n{compose.logs()}") from None
        if waited != "0":
            raise AssertionError(f"coordinator exited with {waited}\n{compose.logs()}")
        yield compose
    finally:
        compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False, timeout=300)


def _results(compose: Compose) -> dict[str, Any]:
    # `docker cp` reads the exited coordinator's volume without starting another container.
    source = f"{compose.container('coordinator')}:/results/fedavg/results.json"
    proc = subprocess.run(["docker", "cp", source, "-"], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        member = tar.extractfile("results.json")
        assert member is not None
        return json.loads(member.read())


@requires_engine
def test_federation_demo_runs_fedavg_rounds_over_mutual_tls_and_the_relay(federation: Compose) -> None:
    results = _results(federation)
    assert results["status"] == "completed", results
    assert len(results["rounds"]) == ROUNDS
    for record in results["rounds"]:
        dice = record["weighted_dice"]
        assert isinstance(dice, float) and 0.0 <= dice <= 1.0
    # Every agent came up healthy through the image's TLS-aware probe.
    for site in SITES:
        state = json.loads(_run(["docker", "inspect", federation.container(site)]).stdout)[0]["State"]
        assert state["Health"]["Status"] == "healthy", (site, state["Health"]["Log"][-1:])


@requires_engine
def test_every_site_audit_chain_verifies_and_records_the_rounds(federation: Compose) -> None:
    for site in SITES:
        proc = federation(
            "exec", "-T", site, "fedsite", "audit", "verify", "--config", f"/demo/sites/{site}/config.yaml"
        )
        assert proc.returncode == 0
        script = (
            "import json\n"
            "from agent.audit.chain import AuditLog\n"
            "from agent.db.engine import open_database\n"
            "from agent.config import load_config\n"
            f"cfg = load_config('/demo/sites/{site}/config.yaml')\n"
            "log = AuditLog(open_database(cfg.db_url))\n"
            "print(json.dumps(sorted({e['action'] for e in log.iter_all()})))\n"
        )
        actions = json.loads(federation("exec", "-T", site, "python", "-c", script).stdout)
        assert {"round.completed", "egress.update"} <= set(actions), (site, actions)


@requires_engine
def test_agent_in_container_refuses_clients_without_the_coordinator_certificate(federation: Compose) -> None:
    # From another container on the project network, with site-1's CA but no client certificate.
    script = (
        "import json, ssl, urllib.request, urllib.error\n"
        "ctx = ssl.create_default_context(cafile='/demo/pki/site-1/ca.crt')\n"
        "try:\n"
        "    urllib.request.urlopen('https://site-1:8443/v1/info', context=ctx, timeout=10)\n"
        "    print('allowed')\n"
        "except urllib.error.HTTPError as exc:\n"
        "    print(exc.code, json.loads(exc.read())['detail'])\n"
    )
    proc = federation("exec", "-T", "site-2", "python", "-c", script)
    assert proc.stdout.strip() == "403 client certificate required"
    script = (
        "from agent.audit.chain import AuditLog\n"
        "from agent.db.engine import open_database\n"
        "from agent.config import load_config\n"
        "log = AuditLog(open_database(load_config('/demo/sites/site-1/config.yaml').db_url))\n"
        "events = log.find('api.refused')\n"
        "print(events[-1]['details']['reason'] if events else 'none', log.verify().ok)\n"
    )
    assert federation("exec", "-T", "site-1", "python", "-c", script).stdout.split("\n")[0] == (
        "no client certificate True"
    )


def _audit_events(compose: Compose, site: str, *actions: str) -> dict[str, list[dict[str, Any]]]:
    """ACTIONS' events in SITE's audit log, read in its running container."""
    script = (
        "import json, sys\n"
        "from agent.audit.chain import AuditLog\n"
        "from agent.db.engine import open_database\n"
        "from agent.config import load_config\n"
        f"cfg = load_config('/demo/sites/{site}/config.yaml')\n"
        "log = AuditLog(open_database(cfg.db_url))\n"
        "print(json.dumps({a: log.find(a) for a in sys.argv[1:]}, default=str))\n"
    )
    out = compose("exec", "-T", site, "python", "-c", script, *actions).stdout
    events: dict[str, list[dict[str, Any]]] = json.loads(out)
    return events


@requires_engine
def test_mixed_federation_the_pull_site_trains_and_evaluates_in_every_round(federation: Compose) -> None:
    results = _results(federation)
    assert results["status"] == "completed", results
    assert sorted(results["sites"]) == SITES
    for record in results["rounds"]:
        assert sorted(record["participants"]) == SITES, record["label"]
        assert not record["left_out"], record["left_out"]
        assert PULL_SITE in record["evaluation"], record["label"]
        update = record["training"][PULL_SITE]
        assert update["num_samples"] > 0
        assert len(update["update_sha256"]) == 64


@requires_engine
def test_the_pull_agent_publishes_no_port_listens_on_loopback_only_and_has_no_route_out(
    federation: Compose,
) -> None:
    info = json.loads(_run(["docker", "inspect", federation.container(PULL_SITE)]).stdout)[0]
    assert not info["HostConfig"]["PortBindings"], info["HostConfig"]["PortBindings"]
    # The image EXPOSEs 8443 (listed, bound to nothing); no port is bound on the host.
    assert all(not bound for bound in (info["NetworkSettings"]["Ports"] or {}).values())
    networks = sorted(info["NetworkSettings"]["Networks"])
    assert networks == [f"{federation.project}_pull"], networks
    network = json.loads(_run(["docker", "network", "inspect", networks[0]]).stdout)[0]
    assert network["Internal"] is True
    members = sorted(c["Name"] for c in network["Containers"].values())
    assert all("_site-3_" in name or "_coordinator_" in name for name in members), members
    # Every listening TCP socket in the container (IPv4 and IPv6) is on a loopback address:
    # health and /metrics for the container's probe (and Docker's DNS resolver, 127.0.0.11),
    # no control API. /proc/net/tcp* lists addresses as little-endian 32-bit words in hex.
    script = (
        "import ipaddress, json\n"
        "out = []\n"
        "for path in ('/proc/net/tcp', '/proc/net/tcp6'):\n"
        "    for line in open(path).read().splitlines()[1:]:\n"
        "        local, state = line.split()[1], line.split()[3]\n"
        "        if state != '0A':\n"
        "            continue\n"
        "        raw, port = bytes.fromhex(local.split(':')[0]), int(local.split(':')[1], 16)\n"
        "        ip = ipaddress.ip_address(b''.join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))\n"
        "        mapped = getattr(ip, 'ipv4_mapped', None)\n"
        "        out.append([str(ip), port, (mapped or ip).is_loopback])\n"
        "print(json.dumps(out))\n"
    )
    listening = json.loads(federation("exec", "-T", PULL_SITE, "python", "-c", script).stdout)
    assert all(loopback for _ip, _port, loopback in listening), listening
    # The health endpoint for the container's probe: api.port on 127.0.0.1.
    assert ["127.0.0.1", 8443, True] in listening, listening


@requires_engine
def test_the_pull_agent_audit_records_fetches_and_commits_with_the_released_update_hash(
    federation: Compose,
) -> None:
    events = _audit_events(
        federation,
        PULL_SITE,
        "connect.registered",
        "connect.task_received",
        "connect.weights_fetched",
        "connect.commit",
        "egress.sent",
    )
    assert events["connect.registered"]
    received = events["connect.task_received"]
    assert {e["details"]["kind"] for e in received} == {"train", "evaluate"}
    assert events["connect.weights_fetched"]
    for fetched in events["connect.weights_fetched"]:
        assert len(fetched["details"]["sha256"]) == 64 and fetched["details"]["bytes"] > 0
    sent = [e["details"]["sha256"] for e in events["egress.sent"]]
    committed = [e["details"]["sha256"] for e in events["connect.commit"] if e["details"]["sha256"]]
    # One released update per round, and what was committed to the relay is exactly that.
    assert len(sent) == ROUNDS
    assert sorted(committed) == sorted(sent)
    results = _results(federation)
    assert sorted(r["training"][PULL_SITE]["update_sha256"] for r in results["rounds"]) == sorted(sent)


@requires_engine
def test_the_relay_recorded_the_pull_site_and_accepted_its_commits(
    federation: Compose, tmp_path: Path
) -> None:
    """The coordinator's side of the same exchange: the relay's append-only events (in the
    relay volume, read from the exited coordinator) say site-3 registered and which update
    hashes it accepted from it, and those are the updates the run aggregated."""
    source = f"{federation.container('coordinator')}:/relay"
    proc = subprocess.run(["docker", "cp", source, "-"], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith("relay/relay.db"):
                extracted = tar.extractfile(member)
                assert extracted is not None
                (tmp_path / Path(member.name).name).write_bytes(extracted.read())
    db = sqlite3.connect(tmp_path / "relay.db")
    try:
        rows = db.execute("SELECT site, action, details FROM relay_events ORDER BY id").fetchall()
    finally:
        db.close()
    assert {site for site, _action, _details in rows} == {PULL_SITE}
    actions = [action for _site, action, _details in rows]
    assert "site.registered" in actions
    assert not {"commit.refused", "task.failed", "lease.expired"} & set(actions), actions
    accepted = [json.loads(details)["sha256"] for _s, action, details in rows if action == "commit.accepted"]
    # Per round one training commit (an update) and one evaluation commit (metrics only).
    assert len(accepted) == 2 * ROUNDS
    results = _results(federation)
    updates = sorted(r["training"][PULL_SITE]["update_sha256"] for r in results["rounds"])
    assert sorted(sha for sha in accepted if sha) == updates
