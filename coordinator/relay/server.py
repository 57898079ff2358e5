"""Serving the relay: in a background thread of `fedsite coordinate`, or on its own.

`RelayServer` runs uvicorn in a daemon thread (so the coordinator's run goes on in the main
thread) plus a sweeper thread that expires leases every second even when no site calls.
`main` is the standalone relay (`fedsite relay serve`, `python -m coordinator.relay.server`):
the same database and directory as the coordinator's federation file names, so a coordinator
process can queue tasks and read results while this process talks to the sites.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from coordinator.errors import FederationError
from coordinator.federation import RelayTls, load_federation, split_listen
from coordinator.relay.app import create_relay_app
from coordinator.relay.store import RelayStore

log = logging.getLogger("fedsite.relay")

SWEEP_EVERY_S = 1.0


def _uvicorn_tls(tls: RelayTls | None) -> dict[str, Any]:
    if tls is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
    if tls.client_ca_file is not None:
        options.update(ssl_ca_certs=str(tls.client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


class _Sweeper(threading.Thread):
    """Expires leases every SWEEP_EVERY_S seconds until stopped."""

    def __init__(self, store: RelayStore) -> None:
        super().__init__(name="relay-sweeper", daemon=True)
        self.store = store
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(SWEEP_EVERY_S):
            try:
                self.store.sweep()
            except Exception:  # a locked or vanished database must not end the sweeps for good
                log.exception("relay: lease sweep failed; trying again in %.0f s", SWEEP_EVERY_S)


class RelayServer:
    """`with RelayServer(store, "127.0.0.1", 8700) as server:` serves the relay until the block ends.

    Port 0 picks a free port (`server.port` says which). The socket is bound here, before the
    thread starts, so that a port in use fails at once with a message naming it.
    """

    def __init__(
        self,
        store: RelayStore,
        host: str,
        port: int,
        *,
        tls: RelayTls | None = None,
        start_timeout_s: float = 20.0,
        log_level: str = "warning",
    ) -> None:
        self.store = store
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise FederationError(f"relay: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.port: int = self.sock.getsockname()[1]
        self.scheme = "https" if tls is not None else "http"
        self.start_timeout_s = start_timeout_s
        config = uvicorn.Config(
            create_relay_app(store),
            lifespan="off",
            log_level=log_level,
            timeout_graceful_shutdown=5,
            **_uvicorn_tls(tls),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="relay-http", daemon=True
        )
        self.sweeper = _Sweeper(store)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> RelayServer:
        self.store.resume_polls()
        self.thread.start()
        self.sweeper.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise RuntimeError(f"relay did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop answering: long polls are woken (they answer 204), then uvicorn shuts down."""
        self.sweeper.stopped.set()
        self.server.should_exit = True
        self.store.wake_all()
        if self.thread.is_alive():
            self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> RelayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(store: RelayStore, host: str, port: int, *, tls: RelayTls | None = None) -> None:
    """Serve the relay in this process until SIGINT or SIGTERM."""
    done = threading.Event()

    def stop(_sig: int, _frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    with RelayServer(store, host, port, tls=tls, log_level="info") as server:
        print(f"relay: serving {server.url} (dir {store.root})", flush=True)
        done.wait()


def main(argv: list[str] | None = None) -> None:
    """`python -m coordinator.relay.server --federation F [--listen HOST:PORT]`."""
    parser = argparse.ArgumentParser(description="The fedsite relay for pull-mode sites, standalone.")
    parser.add_argument(
        "--federation", required=True, type=Path, help="Federation file with a relay: section."
    )
    parser.add_argument("--listen", default=None, help="HOST:PORT (default: relay.listen of the file).")
    args = parser.parse_args(argv)
    try:
        fed = load_federation(args.federation)
        if fed.relay is None:
            raise FederationError(f"{args.federation}: no 'relay:' section")
        host, port = split_listen(args.listen or fed.relay.listen)
    except (FederationError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    store = RelayStore.from_settings(fed.relay)
    try:
        serve_forever(store, host, port, tls=fed.relay.tls)
    finally:
        store.close()


if __name__ == "__main__":
    main()
