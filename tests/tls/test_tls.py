"""TLS: `fedsite certs init`, HTTPS from the config's certificate, and mutual TLS whose
refusals (no certificate, unlisted subject) are answered 403 and written to the audit log.

The server is a real uvicorn on 127.0.0.1 with the keyword arguments `fedsite serve` uses
(`agent.api.server.tls_options`).
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from typer.testing import CliRunner

from agent.api.middleware import subject_allowed
from agent.api.server import tls_options
from agent.audit.chain import AuditLog
from agent.cli import app as cli_app
from agent.config import TlsConfig
from agent.db.engine import open_database
from agent.errors import TlsError
from agent.tls.contexts import client_ssl_context, uvicorn_ssl_kwargs
from agent.tls.files import check_tls_files, load_certificate, parse_subject
from agent.tls.issue import init_certificates
from agent.tls.probe import probe_health
from tests.fixtures.servers import ThreadedServer

runner = CliRunner()


def _init(out: Path, *args: str) -> None:
    result = runner.invoke(cli_app, ["certs", "init", str(out), *args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A site PKI with an allowed and an unlisted client, and a foreign CA's client."""
    root = tmp_path_factory.mktemp("pki")
    site, foreign = root / "site", root / "foreign"
    _init(site, "--site-id", "site-1", "--hosts", "localhost,127.0.0.1", "--client", "coordinator,intruder")
    _init(foreign, "--site-id", "elsewhere", "--client", "coordinator")
    return {"site": site, "foreign": foreign}


# ------------------------------------------------------------------ certs init


def test_certs_init_layout_modes_and_chain(pki: dict[str, Path]) -> None:
    site = pki["site"]
    for key in [site / "ca.key", site / "agent" / "server.key", site / "clients" / "coordinator.key"]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = load_certificate(site / "ca.crt")
    server = load_certificate(site / "agent" / "server.crt")
    client = load_certificate(site / "clients" / "coordinator.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for leaf in (server, client):
        leaf.verify_directly_issued_by(ca)
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert client.subject.rfc4514_string() == "CN=coordinator"
    assert (site / "agent" / "ca.crt").read_bytes() == (site / "ca.crt").read_bytes()
    # The agent's folder holds nothing it must not have: no CA key, no client key.
    assert sorted(p.name for p in (site / "agent").iterdir()) == ["ca.crt", "server.crt", "server.key"]


def test_certs_init_refuses_overwrite_and_reuses_ca(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    init_certificates(out, site_id="s1", clients=["coordinator"])
    ca_before = (out / "ca.crt").read_bytes()
    server_before = (out / "agent" / "server.crt").read_bytes()
    result = runner.invoke(cli_app, ["certs", "init", str(out), "--site-id", "s1"])
    assert result.exit_code == 2
    assert "server.crt: exists; pass --force" in result.output
    assert (out / "agent" / "server.crt").read_bytes() == server_before

    written = init_certificates(out, site_id="s1", clients=["auditor"], force=True)
    assert "ca_cert" not in written
    assert (out / "ca.crt").read_bytes() == ca_before
    load_certificate(out / "clients" / "auditor.crt").verify_directly_issued_by(
        load_certificate(out / "ca.crt")
    )
    assert (out / "agent" / "server.crt").read_bytes() != server_before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"site_id": "bad id"}, "--site-id"),
        ({"site_id": "s", "hosts": "ok.example,not a host"}, "'not a host' is neither"),
        ({"site_id": "s", "hosts": " , "}, "at least one host"),
        ({"site_id": "s", "clients": ["a/b"]}, "--client: 'a/b'"),
        ({"site_id": "s", "clients": ["a", "a"]}, "given twice"),
        ({"site_id": "s", "days": 0}, "positive"),
    ],
)
def test_certs_init_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        init_certificates(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_certs_init_refuses_half_a_ca(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(FileExistsError, match="without its pair"):
        init_certificates(tmp_path, site_id="s")


def test_certs_show_prints_subject(pki: dict[str, Path]) -> None:
    result = runner.invoke(cli_app, ["certs", "show", str(pki["site"] / "clients" / "intruder.crt")])
    assert result.exit_code == 0, result.output
    assert "subject: CN=intruder" in result.output
    result = runner.invoke(cli_app, ["certs", "show", str(pki["site"] / "nope.crt")])
    assert result.exit_code == 2
    assert "nope.crt: cannot read certificate" in result.output


# ------------------------------------------------------------------ checks


def _tls(site: Path, *, mutual: bool = True, allowed: list[str] | None = None) -> TlsConfig:
    return TlsConfig(
        cert_file=site / "agent" / "server.crt",
        key_file=site / "agent" / "server.key",
        client_ca_file=site / "agent" / "ca.crt" if mutual else None,
        allowed_client_subjects=["CN=coordinator"] if allowed is None else allowed,
    )


def test_check_tls_files_names_the_problem(pki: dict[str, Path], tmp_path: Path) -> None:
    site, foreign = pki["site"], pki["foreign"]
    check_tls_files(_tls(site))
    wrong_key = _tls(site).model_copy(update={"key_file": foreign / "agent" / "server.key"})
    with pytest.raises(TlsError, match=r"api.tls.key_file: .* is not the key of api.tls.cert_file"):
        check_tls_files(wrong_key)
    with pytest.raises(TlsError, match=r"allowed_client_subjects\[0\]: not an RFC 4514 subject"):
        check_tls_files(_tls(site, allowed=["coordinator"]))
    with pytest.raises(TlsError, match="client_ca_file is not"):
        check_tls_files(_tls(site, mutual=False))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(TlsError, match=r"garbage\.pem: not a PEM certificate"):
        check_tls_files(_tls(site).model_copy(update={"cert_file": garbage}))
    with pytest.raises(TlsError, match=r"garbage\.pem: not a PEM private key"):
        check_tls_files(_tls(site).model_copy(update={"key_file": garbage}))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=900)
    with pytest.raises(TlsError, match=r"server\.crt: certificate expired on"):
        check_tls_files(_tls(site), now=later)


def test_subject_matching_ignores_order_and_attribute_case() -> None:
    name = x509.Name.from_rfc4514_string("CN=coordinator,O=Consortium")
    assert subject_allowed(name, ["o=Consortium,cn=coordinator"])
    assert subject_allowed(name, [])
    assert not subject_allowed(name, ["CN=coordinator"])
    assert not subject_allowed(name, ["CN=Coordinator,O=Consortium"])
    with pytest.raises(ValueError, match="empty subject"):
        parse_subject("  ")


def test_client_context_requires_cert_and_key_together(pki: dict[str, Path]) -> None:
    site = pki["site"]
    with pytest.raises(TlsError, match="together"):
        client_ssl_context(site / "ca.crt", site / "clients" / "coordinator.crt", None)
    with pytest.raises(TlsError, match="cannot use with"):
        client_ssl_context(
            site / "ca.crt", site / "clients" / "coordinator.crt", site / "clients" / "intruder.key"
        )


# ------------------------------------------------------------------ a real server


class _Server(ThreadedServer):
    def __init__(self, tls: TlsConfig, audit: AuditLog) -> None:
        api = FastAPI()

        @api.get("/v1/health")
        def health() -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/v1/info")
        def info() -> dict[str, str]:
            return {"site_id": "site-1"}

        super().__init__(api, **tls_options(tls, audit))

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"


@pytest.fixture(scope="module")
def mtls_server(
    pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[_Server, AuditLog]]:
    db = open_database(f"sqlite:///{tmp_path_factory.mktemp('db') / 'audit.db'}")
    audit = AuditLog(db)
    with _Server(_tls(pki["site"]), audit) as server:
        yield server, audit


def _get(server: _Server, path: str, ctx: ssl.SSLContext) -> httpx.Response:
    with httpx.Client(verify=ctx, timeout=10) as client:
        return client.get(server.url(path))


def _refusals(audit: AuditLog) -> list[dict[str, Any]]:
    return audit.events(action="api.refused", limit=1000)


def test_https_serves_health_to_a_client_trusting_the_site_ca(pki: dict[str, Path], tmp_path: Path) -> None:
    audit = AuditLog(open_database(f"sqlite:///{tmp_path / 'a.db'}"))
    with _Server(_tls(pki["site"], mutual=False, allowed=[]), audit) as server:
        ctx = client_ssl_context(pki["site"] / "ca.crt")
        assert _get(server, "/v1/health", ctx).json() == {"status": "ok"}
        # Without mutual TLS every path is open at the TLS layer (the API's tokens still apply).
        assert _get(server, "/v1/info", ctx).status_code == 200
        # A client that trusts another CA refuses the server.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            _get(server, "/v1/health", client_ssl_context(pki["foreign"] / "ca.crt"))
        # Plain HTTP to the TLS port gets nothing.
        with pytest.raises(httpx.TransportError), httpx.Client(timeout=5) as plain:
            plain.get(f"http://127.0.0.1:{server.port}/v1/health")
    assert _refusals(audit) == []


def test_mtls_allows_the_listed_client(mtls_server: tuple[_Server, AuditLog], pki: dict[str, Path]) -> None:
    server, _audit = mtls_server
    site = pki["site"]
    ctx = client_ssl_context(
        site / "ca.crt", site / "clients" / "coordinator.crt", site / "clients" / "coordinator.key"
    )
    resp = _get(server, "/v1/info", ctx)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"site_id": "site-1"}


def test_mtls_refuses_and_audits_a_client_without_certificate(
    mtls_server: tuple[_Server, AuditLog], pki: dict[str, Path]
) -> None:
    server, audit = mtls_server
    before = len(_refusals(audit))
    resp = _get(server, "/v1/info", client_ssl_context(pki["site"] / "ca.crt"))
    assert resp.status_code == 403
    assert resp.json() == {"detail": "client certificate required"}
    assert len(resp.headers.get_list("date")) == 1  # given by the gate's connection, not uvicorn
    events = _refusals(audit)
    assert len(events) == before + 1
    event = events[-1]
    assert event["actor"] == "anonymous"
    assert event["details"]["reason"] == "no client certificate"
    assert event["details"]["path"] == "/v1/info"
    assert event["details"]["client"] == "127.0.0.1"
    assert audit.verify().ok


def test_mtls_refuses_and_audits_an_unlisted_subject(
    mtls_server: tuple[_Server, AuditLog], pki: dict[str, Path]
) -> None:
    server, audit = mtls_server
    site = pki["site"]
    before = len(_refusals(audit))
    ctx = client_ssl_context(
        site / "ca.crt", site / "clients" / "intruder.crt", site / "clients" / "intruder.key"
    )
    resp = _get(server, "/v1/rounds/x", ctx)
    assert resp.status_code == 403
    assert resp.json() == {"detail": "client certificate subject not allowed: CN=intruder"}
    events = _refusals(audit)
    assert len(events) == before + 1
    assert events[-1]["actor"] == "tls:CN=intruder"
    assert events[-1]["details"]["reason"] == "client certificate subject not allowed"
    assert events[-1]["details"]["subject"] == "CN=intruder"
    assert audit.verify().ok


def test_mtls_foreign_ca_certificate_fails_the_handshake(
    mtls_server: tuple[_Server, AuditLog], pki: dict[str, Path]
) -> None:
    server, audit = mtls_server
    foreign = pki["foreign"]
    before = len(_refusals(audit))
    ctx = client_ssl_context(
        pki["site"] / "ca.crt",
        foreign / "clients" / "coordinator.crt",
        foreign / "clients" / "coordinator.key",
    )
    with pytest.raises(httpx.TransportError):
        _get(server, "/v1/info", ctx)
    # Rejected by TLS before any request exists: nothing for the application to record.
    assert len(_refusals(audit)) == before


def test_mtls_leaves_health_open_for_probes(
    mtls_server: tuple[_Server, AuditLog], pki: dict[str, Path], tmp_path: Path
) -> None:
    server, audit = mtls_server
    before = len(_refusals(audit))
    assert _get(server, "/v1/health", client_ssl_context(pki["site"] / "ca.crt")).json() == {"status": "ok"}
    assert len(_refusals(audit)) == before
    site = pki["site"]
    config = tmp_path / "config.yaml"
    config.write_text(
        "site: {id: site-1}\n"
        f"api:\n  host: 0.0.0.0\n  port: {server.port}\n  tls:\n"
        f"    cert_file: {site / 'agent' / 'server.crt'}\n    key_file: {site / 'agent' / 'server.key'}\n"
        f"    client_ca_file: {site / 'agent' / 'ca.crt'}\n"
    )
    assert probe_health(config) == 0


def test_probe_health_reports_an_unreachable_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text(f"site: {{id: s}}\napi: {{port: {port}}}\n")
    assert probe_health(config, timeout=2) == 1
    assert f"http://127.0.0.1:{port}/v1/health" in capsys.readouterr().err
    assert probe_health(tmp_path / "missing.yaml") == 1


def test_uvicorn_kwargs_plain_http_and_bad_material(pki: dict[str, Path]) -> None:
    assert uvicorn_ssl_kwargs(None) == {}
    assert tls_options(None) == {}
    site = pki["site"]
    bad = _tls(site).model_copy(update={"key_file": site / "clients" / "coordinator.key"})
    with pytest.raises(TlsError, match="is not the key of"):
        uvicorn_ssl_kwargs(bad)
    with pytest.raises(TlsError, match="is not the key of"):
        tls_options(bad)


def test_generated_keys_are_p256(pki: dict[str, Path]) -> None:
    cert = load_certificate(pki["site"] / "agent" / "server.crt")
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"


# ------------------------------------------------------------------ `fedsite serve`


def test_fedsite_serve_enforces_mutual_tls_and_audits(pki: dict[str, Path], tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    site = pki["site"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text(
        "site: {id: site-1}\n"
        f"work_dir: {tmp_path / 'work'}\n"
        "device: cpu\n"
        f"api:\n  host: 127.0.0.1\n  port: {port}\n  tls:\n"
        f"    cert_file: {site / 'agent' / 'server.crt'}\n    key_file: {site / 'agent' / 'server.key'}\n"
        f"    client_ca_file: {site / 'agent' / 'ca.crt'}\n"
        '    allowed_client_subjects: ["CN=coordinator"]\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSITE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "serve", "--config", str(config), "--no-scan"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ca_only = client_ssl_context(site / "ca.crt")
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                with httpx.Client(verify=ca_only, timeout=5) as client:
                    if client.get(f"https://localhost:{port}/v1/health").status_code == 200:
                        break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "fedsite serve did not answer over HTTPS"
            time.sleep(0.5)
        with httpx.Client(verify=ca_only, timeout=10) as client:
            refused = client.get(f"https://localhost:{port}/v1/info")
        assert refused.status_code == 403
        assert refused.json() == {"detail": "client certificate required"}
        coordinator = client_ssl_context(
            site / "ca.crt", site / "clients" / "coordinator.crt", site / "clients" / "coordinator.key"
        )
        with httpx.Client(verify=coordinator, timeout=10) as client:
            # Past the certificate gate, the API's own token check answers.
            assert client.get(f"https://localhost:{port}/v1/info").status_code == 401
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    audit = AuditLog(open_database(f"sqlite:///{tmp_path / 'work' / 'fedsite.db'}"))
    events = audit.find("api.refused")
    reasons = [e["details"].get("reason") for e in events]
    # The certificate gate's refusal; the token check audits the second request itself.
    assert reasons.count("no client certificate") == 1
    assert "client certificate subject not allowed" not in reasons
    assert audit.verify().ok


def test_fedsite_serve_names_bad_tls_material(pki: dict[str, Path], tmp_path: Path) -> None:
    site = pki["site"]
    config = tmp_path / "config.yaml"
    config.write_text(
        "site: {id: site-1}\n"
        f"work_dir: {tmp_path / 'work'}\n"
        f"api:\n  tls:\n    cert_file: {site / 'agent' / 'server.crt'}\n"
        f"    key_file: {site / 'clients' / 'coordinator.key'}\n"
    )
    result = runner.invoke(cli_app, ["serve", "--config", str(config)])
    assert result.exit_code == 2
    assert "is not the key of api.tls.cert_file" in result.output
    assert not (tmp_path / "work" / "fedsite.db").exists()
