"""The console's own listener (`ConsoleServer`): it answers with a Date header of its own and
stops at once when asked, though its server no longer wakes on a timer (`quiet_server`)."""

from __future__ import annotations

import email.utils
import socket
import time
from pathlib import Path

import httpx

from agent.config import load_config
from agent.console.server import ConsoleServer
from agent.service import SiteService
from tests.fixtures.agents import make_site


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_console_answers_with_one_date_and_stops_when_asked(tmp_path: Path) -> None:
    port = _free_port()
    site = make_site(
        tmp_path / "fed",
        subjects=2,
        fmt="nifti",
        overrides={"console": {"enabled": True, "host": "127.0.0.1", "port": port}},
    )
    service = SiteService.open(load_config(site.config_path))
    console = ConsoleServer(service)
    try:
        console.start()
        before = int(time.time())
        r = httpx.get(f"http://127.0.0.1:{port}/login", timeout=30)
        assert r.status_code == 200, r.text
        assert len(r.headers.get_list("date")) == 1, r.headers
        assert before <= email.utils.parsedate_to_datetime(r.headers["date"]).timestamp() <= time.time()
        thread = console._thread
        assert thread is not None and thread.is_alive()
        console.stop()  # joins the thread for at most 15 s: a server that stays asleep outlives it
        assert not thread.is_alive()
    finally:
        console.stop()
        service.close()
