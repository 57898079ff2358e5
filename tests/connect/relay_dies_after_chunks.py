"""Test-only: the real relay app with a trap on chunk uploads. When the (K+1)-th chunk PUT
arrives, before that chunk is read, it SIGKILLs either itself (the relay dies mid-upload) or,
with --kill-pid-file, the process whose pid that file holds (the agent dies mid-upload; the
relay answers that request 503 and serves on). The trap fires once. Not a product flag: the
relay in `coordinator.relay` has no such switch. The test knows how many chunks reached the relay.

    python tests/connect/relay_dies_after_chunks.py --federation F --listen 127.0.0.1:PORT --chunks K
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from typing import Any

import uvicorn

from coordinator.federation import load_federation, split_listen
from coordinator.relay.app import create_relay_app
from coordinator.relay.store import RelayStore

PID_WAIT_S = 60.0


class ChunkTrap:
    """ASGI wrapper: counts chunk PUTs and kills a process on the one past the limit, once."""

    def __init__(self, app: Any, chunks: int, pid_file: Path | None) -> None:
        self.app = app
        self.chunks = chunks
        self.pid_file = pid_file
        self.seen = 0
        self.fired = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "PUT" and "/chunks/" in scope["path"]:
            if not self.fired and self.seen >= self.chunks:
                self.fired = True
                if self.pid_file is None:
                    print(f"relay test trap: killing the relay at chunk PUT {self.seen + 1}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
                pid = self._pid()
                print(f"relay test trap: killing pid {pid} at chunk PUT {self.seen + 1}", flush=True)
                os.kill(pid, signal.SIGKILL)
                await send({"type": "http.response.start", "status": 503, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            self.seen += 1
        await self.app(scope, receive, send)

    def _pid(self) -> int:
        assert self.pid_file is not None
        deadline = time.monotonic() + PID_WAIT_S
        while not self.pid_file.is_file() or not self.pid_file.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no pid in {self.pid_file} within {PID_WAIT_S:.0f} s")
            time.sleep(0.05)
        return int(self.pid_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--federation", required=True, type=Path)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--chunks", required=True, type=int)
    parser.add_argument("--kill-pid-file", type=Path, default=None)
    args = parser.parse_args()
    fed = load_federation(args.federation)
    assert fed.relay is not None
    host, port = split_listen(args.listen)
    store = RelayStore.from_settings(fed.relay)
    app = ChunkTrap(create_relay_app(store), args.chunks, args.kill_pid_file)
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    main()
