"""Local agents (`fedsite demo`, the benchmarks) get distinct ports, and one that lost its port is refused.

A port that `free_port` found free is not reserved: the OS may offer it again before the agent
given it has bound it. Two agents of one federation on one port made the reproduction's
coordinator talk to another site's agent (HTTP 401) while the real one had exited.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator import local
from coordinator.errors import LocalAgentError


def _fake_spawn(exit_code: dict[str, int]) -> object:
    def spawn(
        name: str, config: Path, *, port: int | None = None, log_dir: Path, env: object = None
    ) -> local.LocalAgent:
        code = exit_code.get(name)
        script = f"import sys; sys.exit({code})" if code is not None else "import time; time.sleep(30)"
        proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)  # as spawn_agent
        if code is not None:
            proc.wait(timeout=30)
        log = log_dir / f"{name}.log"
        log.write_text(f"{name}: [Errno 98] address already in use\n" if code else "")
        assert port is not None
        return local.LocalAgent(name=name, config=config, port=port, process=proc, log_path=log)

    return spawn


@pytest.fixture
def ports(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    offered = [5001, 5001, 5002, 5001, 5002, 5003]
    handed: list[int] = []

    def free_port() -> int:
        handed.append(offered.pop(0))
        return handed[-1]

    monkeypatch.setattr(local, "free_port", free_port)
    monkeypatch.setattr(local, "wait_healthy", lambda agent, timeout: None)
    yield handed


def test_agents_started_together_get_distinct_ports_even_when_the_os_offers_one_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ports: list[int]
) -> None:
    monkeypatch.setattr(local, "spawn_agent", _fake_spawn({}))
    with local.LocalFederation(tmp_path) as fed:
        agents = fed.start_many({n: tmp_path / f"{n}.yaml" for n in ("a", "b", "c")})
        assert [agents[n].port for n in ("a", "b", "c")] == [5001, 5002, 5003]
    assert ports == [5001, 5001, 5002, 5001, 5002, 5003]


def test_an_agent_that_exited_after_its_health_check_passed_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ports: list[int]
) -> None:
    monkeypatch.setattr(local, "spawn_agent", _fake_spawn({"b": 1}))
    with local.LocalFederation(tmp_path) as fed, pytest.raises(LocalAgentError) as err:
        fed.start_many({n: tmp_path / f"{n}.yaml" for n in ("a", "b")})
    message = str(err.value)
    assert message.startswith(
        "b: the agent exited with code 1 after another process answered on its port 5002"
    )
    assert "address already in use" in message
