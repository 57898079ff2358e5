"""Test-only: the real relay app, which SIGKILLs its own process when the (K+1)-th chunk PUT
arrives, before that chunk is read. Not a product flag: the relay in `coordinator.relay` has no
such switch. The test that runs this knows exactly K chunks reached the relay's disk.

    python tests/connect/relay_dies_after_chunks.py --federation F --listen 127.0.0.1:PORT --chunks K
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import uvicorn

from coordinator.federation import load_federation, split_listen
from coordinator.relay.app import create_relay_app
from coordinator.relay.store import RelayStore


class DieAfterChunks:
    """ASGI wrapper: counts chunk PUTs and kills the process on the one past the limit."""

    def __init__(self, app: Any, chunks: int) -> None:
        self.app = app
        self.chunks = chunks
        self.seen = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "PUT" and "/chunks/" in scope["path"]:
            if self.seen >= self.chunks:
                print(f"relay test wrapper: killing myself at chunk PUT {self.seen + 1}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            self.seen += 1
        await self.app(scope, receive, send)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--federation", required=True, type=Path)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--chunks", required=True, type=int)
    args = parser.parse_args()
    fed = load_federation(args.federation)
    assert fed.relay is not None
    host, port = split_listen(args.listen)
    store = RelayStore.from_settings(fed.relay)
    app = DieAfterChunks(create_relay_app(store), args.chunks)
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    main()
