"""At start the agent logs `fedsite doctor`'s checks, one line each: an agent with nothing to train
on says why in its log, before anyone asks /v1/info."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from agent.api.server import log_doctor
from agent.config import load_config
from tests.fixtures.agents import make_site
from tests.fixtures.ownership import AGENT_UID, give_away, needs_root, open_tmp

__all__ = ["open_tmp"]  # the fixture, used by name


def test_start_up_logs_an_empty_data_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(make_site(tmp_path / "fed", subjects=3, fmt="nifti").config_path)
    shutil.rmtree(cfg.datasets[0].root)
    cfg.datasets[0].root.mkdir()

    with caplog.at_level(logging.INFO, logger="fedsite.serve"):
        log_doctor(cfg)

    [line] = [r for r in caplog.records if "dataset brain" in r.getMessage()]
    assert line.levelno == logging.WARNING and "is empty" in line.getMessage()
    assert any(r.getMessage().startswith("doctor: OK   approval: auto") for r in caplog.records)


@needs_root
def test_start_up_logs_data_the_agent_uid_cannot_read_with_the_fix(
    open_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = make_site(
        open_tmp / "fed", subjects=3, fmt="nifti", overrides={"site": {"id": "s1", "run_as_uid": AGENT_UID}}
    )
    cfg = load_config(site.config_path)
    give_away(cfg.datasets[0].root)

    with caplog.at_level(logging.INFO, logger="fedsite.serve"):
        log_doctor(cfg)

    [line] = [r for r in caplog.records if "dataset brain" in r.getMessage()]
    assert line.levelno == logging.ERROR
    assert f"uid {AGENT_UID}" in line.getMessage() and "setfacl -R -m u:10001:rX" in line.getMessage()
