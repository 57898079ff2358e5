"""The relay client: the standard proxy variables are honoured (a hospital's one way out), the
token goes in the Authorization header, and a task that is not what the protocol says is
refused by the model that validates it."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from agent.config import ConnectConfig
from agent.connect.relay_client import RelayClient, Task, detail_of

REGISTERED = b'{"site": "pull-1", "heartbeat_s": 30, "lease_s": 90, "chunk_bytes": 4194304, "max_wait_s": 25}'


class OneShotProxy:
    """A socket on 127.0.0.1 that answers one HTTP request with REGISTERED and keeps what it got."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.sock.settimeout(20)
        self.port = self.sock.getsockname()[1]
        self.request = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(10)
            while b"\r\n\r\n" not in self.request:
                self.request += conn.recv(65536)
            head, _, body = self.request.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(REGISTERED)}\r\n\r\n".encode()
                + REGISTERED
            )
        self.sock.close()


def _cfg(tmp_path: Path, url: str) -> ConnectConfig:
    token = tmp_path / "relay.token"
    token.write_text("s3cret-token\n")
    return ConnectConfig(mode="outbound", coordinator_url=url, token_file=token)


def test_requests_go_through_the_proxy_of_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = OneShotProxy()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = RelayClient(_cfg(tmp_path, "http://relay.invalid:8700"))
    try:
        reg = client.register({"site_id": "site-1"}, [])
    finally:
        client.close()
    proxy.thread.join(10)
    assert reg.site == "pull-1"
    # The proxy got the absolute URL (a name this machine cannot resolve itself) and the token.
    assert proxy.request.startswith(b"POST http://relay.invalid:8700/v1/relay/register HTTP/1.1\r\n")
    assert b"\r\nauthorization: bearer s3cret-token\r\n" in proxy.request.lower()


def test_no_proxy_bypasses_the_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing there: using it would fail differently
    monkeypatch.setenv("NO_PROXY", "relay.invalid")
    client = RelayClient(_cfg(tmp_path, "http://relay.invalid:8700"))
    try:
        with pytest.raises(httpx.ConnectError) as err:
            client.register({}, [])
    finally:
        client.close()
    # Straight to the relay's name, which does not resolve; not a refused connection to the proxy.
    assert "Connection refused" not in detail_of(err.value)


def test_a_task_must_be_what_the_protocol_says() -> None:
    good = {
        "task_id": "ab" * 16,
        "lease_id": "cd" * 16,
        "lease_expires_at": "2026-11-30T12:00:00+00:00",
        "kind": "train",
        "job_id": "round-1",
        "plan": {"dataset": "brain"},
        "weights": {"sha256": "e" * 64, "bytes": 10},
    }
    assert Task.model_validate(good).weights is not None
    for broken, where in (
        ({**good, "plan": "not an object"}, "plan"),
        ({**good, "kind": "exfiltrate"}, "kind"),
        ({**good, "task_id": "../../etc"}, "task_id"),
        ({**good, "weights": {"sha256": "short", "bytes": 10}}, "weights.sha256"),
        ({**good, "extra": 1}, "extra"),
    ):
        with pytest.raises(ValidationError) as err:
            Task.model_validate(broken)
        assert where.split(".")[0] in str(err.value)


def test_https_with_the_relay_ca_and_a_client_certificate(tmp_path: Path) -> None:
    from agent.tls.issue import init_certificates
    from coordinator.federation import RelayTls
    from coordinator.relay.server import RelayServer
    from tests.fixtures.relay import relay_env

    pki = tmp_path / "pki"
    init_certificates(pki, site_id="relay", hosts="127.0.0.1,localhost", clients=["pull-1"])
    other = tmp_path / "other"
    init_certificates(other, site_id="other", hosts="127.0.0.1")
    env = relay_env(tmp_path / "fed", pull=["pull-1"])
    tls = RelayTls(
        cert_file=pki / "agent" / "server.crt",
        key_file=pki / "agent" / "server.key",
        client_ca_file=pki / "agent" / "ca.crt",
    )
    with RelayServer(env.store(), "127.0.0.1", 0, tls=tls) as relay:
        assert relay.url.startswith("https://")

        def client(**files: Path) -> RelayClient:
            cfg = ConnectConfig(
                mode="outbound", coordinator_url=relay.url, token_file=env.token_files["pull-1"], **files
            )
            return RelayClient(cfg)

        mutual = client(
            ca_file=pki / "ca.crt",
            client_cert=pki / "clients" / "pull-1.crt",
            client_key=pki / "clients" / "pull-1.key",
        )
        try:
            assert mutual.register({"site_id": "site-1"}, []).site == "pull-1"
        finally:
            mutual.close()
        # A relay certificate from another CA is not trusted.
        stranger = client(ca_file=other / "ca.crt")
        try:
            with pytest.raises(httpx.ConnectError) as err:
                stranger.register({}, [])
            assert "CERTIFICATE_VERIFY_FAILED" in detail_of(err.value)
        finally:
            stranger.close()
        # The right CA but no client certificate: the relay ends the handshake.
        anonymous = client(ca_file=pki / "ca.crt")
        try:
            with pytest.raises(httpx.TransportError):
                anonymous.register({}, [])
        finally:
            anonymous.close()
