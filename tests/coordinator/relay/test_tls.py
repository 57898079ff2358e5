"""The relay over HTTPS, with and without client certificates (mutual TLS)."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from agent.tls.issue import init_certificates
from coordinator.federation import RelayTls
from coordinator.relay.server import RelayServer
from tests.fixtures.relay import relay_env


def _register(url: str, token: str, verify: ssl.SSLContext) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/relay/register",
        json={"info": {"site_id": "site-p"}},
        headers={"Authorization": f"Bearer {token}"},
        verify=verify,
        timeout=10,
    )


def test_https_and_mutual_tls(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_certificates(pki, site_id="relay", hosts="127.0.0.1", clients=["site-p"])
    env = relay_env(tmp_path / "relay", ["site-p"])
    store = env.store()
    token = env.tokens["site-p"]
    server_tls = RelayTls(cert_file=pki / "agent" / "server.crt", key_file=pki / "agent" / "server.key")
    try:
        with RelayServer(store, "127.0.0.1", 0, tls=server_tls) as server:
            assert server.url.startswith("https://127.0.0.1:")
            trusting = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            assert _register(server.url, token, trusting).status_code == 200
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                _register(server.url, token, ssl.create_default_context())
        mutual = RelayTls(
            cert_file=pki / "agent" / "server.crt",
            key_file=pki / "agent" / "server.key",
            client_ca_file=pki / "agent" / "ca.crt",
        )
        with RelayServer(store, "127.0.0.1", 0, tls=mutual) as server:
            without = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            with pytest.raises(httpx.TransportError):
                _register(server.url, token, without)
            with_cert = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            with_cert.load_cert_chain(
                str(pki / "clients" / "site-p.crt"), str(pki / "clients" / "site-p.key")
            )
            assert _register(server.url, token, with_cert).status_code == 200
    finally:
        store.close()
