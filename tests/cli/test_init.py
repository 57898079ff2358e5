"""`fedsite init`: a fresh site folder that checks clean and trains a round; what it refuses;
the modes of what it writes."""

from __future__ import annotations

import contextlib
import hashlib
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from cryptography import x509
from typer.testing import CliRunner

from agent.access.tokens import authenticate
from agent.cli import app
from agent.cli.init import run_site_checks
from agent.config import load_config
from agent.db.engine import open_database
from agent.tls.contexts import client_ssl_context
from agent.tls.files import load_certificate
from coordinator.federation import load_federation
from coordinator.options import RunOptions
from coordinator.report import QuietReporter
from coordinator.runner import Coordinator
from coordinator.weights import initial_weights
from tests.fixtures.agents import REPO, agent_env, free_port
from tests.fixtures.coordinator import results, tiny_plan


def run(*args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), input=input)
    return result.exit_code, result.output


def init_demo(site: Path, *extra: str, subjects: int = 4) -> tuple[int, str]:
    return run(
        "init", str(site), "--non-interactive", "--site-id", "site-1", "--demo-data", str(subjects),
        "--demo-size", "32", *extra,
    )  # fmt: skip


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def san_names(cert_file: Path) -> set[str]:
    ext = load_certificate(cert_file).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in ext.get_values_for_type(x509.DNSName)} | {
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    }


@pytest.mark.timeout(600)
def test_a_fresh_site_checks_clean_and_completes_a_fedavg_round(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    site = tmp_path / "site"
    port = free_port()
    code, out = init_demo(site, "--runtime", "local", "--approval", "auto", "--port", str(port))
    assert code == 0, out
    config = site / "config" / "site.yaml"
    # init ran the check itself: the config, then the doctor's checks, all passed.
    assert f"{config}: OK" in out and "doctor: 0 failed" in out
    assert run_site_checks(config) == 0
    code, doctor_out = run("doctor", "--config", str(config))
    assert code == 0, doctor_out
    # The token printed last is the one handed over, and the site's database knows it.
    token = out.strip().splitlines()[-1]
    assert (site / "handoff" / "coordinator.token").read_text().strip() == token
    cfg = load_config(config)
    db = open_database(cfg.db_url)
    try:
        info = authenticate(db, [], token)
        assert info is not None and info.role == "coordinator"
    finally:
        db.dispose()

    fed = load_federation(site / "handoff" / "federation.yaml")
    [entry] = fed.agents
    assert entry.url == f"https://localhost:{port}" and entry.client_cert is not None
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "serve", "--config", str(config)],
        stdout=(site / "agent.log").open("wb"),
        stderr=subprocess.STDOUT,
        env=agent_env(),
        cwd=str(REPO),
    )
    try:
        ca_only = client_ssl_context(entry.ca_file)
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (site / "agent.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{entry.url}/v1/health", verify=ca_only, timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, (site / "agent.log").read_text()
            time.sleep(0.5)
        plan = tiny_plan(size=32)
        options = RunOptions(strategy="fedavg", rounds=1, evaluate=False, evaluate_final=False)
        Coordinator(
            fed,
            plan,
            tmp_path / "out",
            options,
            initial_weights=initial_weights(plan),
            reporter=QuietReporter(),
        ).run()
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    [rnd] = results(tmp_path / "out")["rounds"]
    assert rnd["participants"] == ["site-1"] and rnd["left_out"] == []


def test_init_refuses_a_used_folder_without_force(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "notes.txt").write_text("mine")
    code, out = init_demo(site, subjects=1)
    assert code == 2 and "--force" in out
    assert sorted(p.name for p in site.iterdir()) == ["notes.txt"]
    code, out = init_demo(site, "--force", subjects=1)
    assert code == 0, out
    assert (site / "notes.txt").read_text() == "mine" and (site / "config" / "site.yaml").is_file()


def test_init_refuses_a_missing_or_unmatched_data_path(tmp_path: Path) -> None:
    site = tmp_path / "site"
    typo = tmp_path / "imagin"
    code, out = run("init", str(site), "--non-interactive", "--site-id", "site-1", "--data", str(typo))
    assert code == 2 and f"data path {typo}: does not exist" in out
    # Nothing is created: not the mis-typed data folder, not the site.
    assert not typo.exists() and not site.exists()
    wrong = tmp_path / "wrong"
    (wrong / "p1").mkdir(parents=True)
    (wrong / "p1" / "t1.nii.gz").write_bytes(b"")
    code, out = run("init", str(site), "--non-interactive", "--site-id", "site-1", "--data", str(wrong))
    assert code == 2 and "nothing matches the images pattern" in out and "--images" in out
    assert not site.exists()


def test_compose_site_modes_names_and_token(tmp_path: Path) -> None:
    site = tmp_path / "site"
    code, out = init_demo(site, "--hosts", "fedsite.hospital.example,10.0.0.5", "--port", "9443", subjects=1)
    assert code == 0, out
    # Names for other machines, published on loopback (the default): the admin is told.
    assert "published on 127.0.0.1 only" in out and "--bind" in out
    # Secrets readable by their owner only; the folders that hold them closed to others.
    for secret in (
        "tls/server.key", "pki/ca.key", "handoff/coordinator.key", "handoff/coordinator.token",
        "handoff/HANDOFF.txt", "handoff/federation.yaml",
    ):  # fmt: skip
        assert mode(site / secret) == 0o600, secret
    assert mode(site / "pki") == 0o700 and mode(site / "handoff") == 0o700
    assert mode(site / "tls" / "server.crt") == 0o644 and mode(site / "config" / "site.yaml") == 0o644
    # The admin's names first (the URL's host), then the names a local check uses.
    names = san_names(site / "tls" / "server.crt")
    assert {"fedsite.hospital.example", "10.0.0.5", "localhost", "127.0.0.1", "agent"} <= names
    # Paths as the container sees them; the compose variables point at the host side.
    cfg = load_config(site / "config" / "site.yaml", check_paths=False)
    assert cfg.datasets[0].root == Path("/data") and cfg.api.port == 8443
    assert cfg.api.tls is not None and cfg.api.tls.key_file == Path("/etc/fedsite/tls/server.key")
    assert cfg.api.tls.allowed_client_subjects == ["CN=coordinator"] and cfg.approval.policy == "manual"
    env = dict(
        line.split("=", 1)
        for line in (site / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env["FEDSITE_DATA_DIR"] == str((site / "data").resolve())
    assert env["FEDSITE_TLS_DIR"] == "./tls" and env["FEDSITE_PORT"] == "9443"
    # The database is in the container's volume: the token is in the config, as its SHA-256 only.
    token = (site / "handoff" / "coordinator.token").read_text().strip()
    assert token not in (site / "config" / "site.yaml").read_text()
    assert [t.sha256 for t in cfg.api.tokens] == [hashlib.sha256(token.encode()).hexdigest()]
    fed = yaml.safe_load((site / "handoff" / "federation.yaml").read_text())
    assert fed["agents"][0]["url"] == "https://fedsite.hospital.example:9443"
    assert "https://fedsite.hospital.example:9443" in (site / "handoff" / "HANDOFF.txt").read_text()


def test_init_asks_what_the_flags_do_not_say(tmp_path: Path) -> None:
    site = tmp_path / "site"
    data = tmp_path / "data"
    code, out = init_demo(tmp_path / "seed", subjects=1)  # any readable NIfTI dataset will do
    assert code == 0, out
    (tmp_path / "seed" / "data").rename(data)
    answers = "\n".join(["site-7", str(data), "", "fedsite.example", "auto"]) + "\n"
    code, out = run("init", str(site), "--runtime", "local", "--target-labels", "1,2,4", input=answers)
    assert code == 0, out
    cfg = load_config(site / "config" / "site.yaml")
    assert cfg.site.id == "site-7" and cfg.approval.policy == "auto" and cfg.datasets[0].root == data
    assert "fedsite.example" in san_names(site / "tls" / "server.crt")
