"""`fedsite doctor` in outbound mode: does the coordinator's relay answer and accept the token."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from agent.config import AgentConfig, parse_config
from agent.doctor import check_connect, check_tls
from tests.fixtures.agents import free_port
from tests.fixtures.relay import relay_env, relay_in_thread


def _cfg(tmp_path: Path, url: str, token: str, mode: str = "outbound") -> AgentConfig:
    token_file = tmp_path / "relay.token"
    token_file.write_text(token + "\n")
    raw = {
        "site": {"id": "site-1"},
        "connect": {"mode": mode, "coordinator_url": url, "token_file": str(token_file)},
    }
    return parse_config(raw, source=tmp_path / "config.yaml", environ={})


def test_the_relay_check_accepts_the_right_token_and_names_the_wrong_one(tmp_path: Path) -> None:
    env = relay_env(tmp_path / "fed", pull=["pull-1"])
    with relay_in_thread(env.store()) as relay:
        good = check_connect(_cfg(tmp_path, relay.url, env.tokens["pull-1"]), uid=os.geteuid())
        assert good is not None and good.status == "ok", good
        assert "accepts this site's token" in good.summary
        bad = check_connect(_cfg(tmp_path, relay.url, "not-the-token"), uid=os.geteuid())
        assert bad is not None and bad.status == "fail"
        assert "does not know the token" in bad.summary and "fedsite relay add-site" in bad.details[0]


def test_an_unreachable_relay_fails_with_the_fix(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    check = check_connect(_cfg(tmp_path, url, "t"), uid=os.geteuid(), timeout_s=2.0)
    assert check is not None and check.status == "fail"
    assert f"the coordinator's relay at {url} does not answer: ConnectError" in check.summary
    assert "HTTPS_PROXY" in check.details[0]


def test_listen_mode_has_no_relay_check_and_outbound_needs_no_api_tls(tmp_path: Path) -> None:
    listen = parse_config({"site": {"id": "site-1"}}, source=tmp_path / "config.yaml", environ={})
    assert check_connect(listen, uid=os.geteuid()) is None
    outbound = _cfg(tmp_path, "http://127.0.0.1:1", "t")
    tls = check_tls(outbound, uid=os.geteuid(), hosts=[], now=dt.datetime.now(dt.UTC))
    assert tls.status == "ok" and "no control API" in tls.summary
