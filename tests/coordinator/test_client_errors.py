"""The coordinator names the real cause of a failed request, one test per cause: a plan the site
has not approved (a real agent with approval policy manual), a token the site refuses (401), an
agent that is down (a closed port; a port whose forwarder closes the connection) and a
certificate that does not name the host (a real TLS server on 127.0.0.1).

Every server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.tls.issue import init_certificates
from agent.training.plan import parse_plan, plan_hash
from coordinator.client import AgentClient
from coordinator.errors import AgentAuthError, AgentPlanRefused, AgentTlsError, AgentUnreachable
from coordinator.federation import Retries, Timeouts, parse_federation
from coordinator.options import RunOptions
from coordinator.runner import Coordinator
from tests.fixtures.agents import RunningAgent, add_tokens, free_port, make_site, start_agent, tiny_plan

# A connection attempt per test: nothing is retried in these tests' time.
ONE_TRY = Retries(attempts=2, backoff=0.0, max_backoff=0.0)


def _client(url: str, token: str = "tok", **entry: str) -> AgentClient:
    fed = parse_federation({"agents": [{"name": "site-x", "url": url, "token": token, **entry}]})
    return AgentClient(fed.agents[0], retries=ONE_TRY, timeouts=Timeouts(connect=5.0, read=10.0))


@pytest.fixture(scope="module")
def manual_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningAgent, str]]:
    site = make_site(
        tmp_path_factory.mktemp("manual") / "fed",
        subjects=4,
        fmt="nifti",
        size=32,
        overrides={"approval": {"policy": "manual"}},
    )
    token = add_tokens(site.config_path, coordinator="coord")["coord"]
    agent = start_agent(site.config_path)
    try:
        yield agent, token
    finally:
        agent.stop()


def test_an_unapproved_plan_names_the_site_the_hash_and_the_admins_command(
    manual_agent: tuple[RunningAgent, str],
) -> None:
    agent, token = manual_agent
    plan = tiny_plan(init="random", round_id="r-unapproved")
    digest = plan_hash(parse_plan(plan))
    with _client(agent.url, token) as client, pytest.raises(AgentPlanRefused) as info:
        client.start_round(plan, None)
    assert info.value.plan_hash == digest and info.value.status_code == 403
    assert f"site site-x has not approved plan {digest}" in str(info.value)
    assert f"`fedsite plans approve {digest} --by NAME`" in str(info.value)
    assert "token" not in str(info.value)  # not reported as a credentials problem


def test_a_refused_token_is_named_as_such(manual_agent: tuple[RunningAgent, str]) -> None:
    agent, _ = manual_agent
    with _client(agent.url, "not-the-token") as client, pytest.raises(AgentAuthError) as info:
        client.info()
    assert info.value.status_code == 401
    assert "site site-x refused the coordinator's token" in str(info.value)


def test_an_agent_that_is_down_is_unreachable_not_a_tls_error() -> None:
    port = free_port()  # nothing listens there
    url = f"https://127.0.0.1:{port}"
    with _client(url) as client, pytest.raises(AgentUnreachable) as info:
        client.info()
    assert f"agent site-x at {url} is not reachable (connection refused" in str(info.value)
    assert "SSL" not in str(info.value) and "certificate" not in str(info.value)


def test_a_port_that_closes_the_connection_is_unreachable_not_a_tls_error() -> None:
    # What docker's port forwarder does while the agent behind it is down: accept, then close.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"https://127.0.0.1:{listener.getsockname()[1]}"

        def close_each(n: int) -> None:
            for _ in range(n):
                conn, _ = listener.accept()
                conn.close()

        closer = threading.Thread(target=close_each, args=(ONE_TRY.attempts,), daemon=True)
        closer.start()
        with _client(url) as client, pytest.raises(AgentUnreachable) as info:
            client.info()
        closer.join(10)
    assert f"agent site-x at {url} is not reachable (the connection was closed" in str(info.value)
    assert "SSL" not in str(info.value)


class _TlsServer:
    """A real TLS server on 127.0.0.1 presenting CERT; it completes handshakes and closes."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                conn.close()

    def __enter__(self) -> _TlsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close()


def test_a_certificate_for_another_name_is_named_with_the_names_it_has(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_certificates(pki, site_id="site-x", hosts="agent.other.example")
    with _TlsServer(pki / "agent" / "server.crt", pki / "agent" / "server.key") as server:
        url = f"https://127.0.0.1:{server.port}"
        with _client(url, ca_file=str(pki / "ca.crt")) as client, pytest.raises(AgentTlsError) as info:
            client.info()
        assert "the certificate of site-x does not name 127.0.0.1 (it names agent.other.example)" in str(
            info.value
        )

        # Before the first round: the run stops with this cause, instead of taking the site for
        # one that is down and asking it again each round.
        fed = parse_federation({"agents": [{"name": "site-x", "url": url, "token": "tok"}]})
        client = _client(url, ca_file=str(pki / "ca.crt"))
        coord = Coordinator(
            fed,
            {"dataset": "brain"},
            tmp_path / "out",
            RunOptions(),
            initial_weights={},
            clients={"site-x": client},
        )
        with client, pytest.raises(AgentTlsError, match=r"does not name 127\.0\.0\.1"):
            coord.preflight()

        # A certificate from a CA the coordinator was not given is a trust problem, named so.
        other = tmp_path / "other"
        init_certificates(other, site_id="elsewhere", hosts="127.0.0.1")
        with _client(url, ca_file=str(other / "ca.crt")) as client, pytest.raises(AgentTlsError) as info:
            client.info()
        assert "the certificate of site-x at" in str(info.value) and "cannot be trusted" in str(info.value)
