"""An agent with nothing to train on says why: `/v1/info` carries each dataset's problems (counts
and reasons, never paths) and the start-up scan logs one line per problem.

The trial's site reported healthy with 0 subjects while its files were unreadable by the agent's
uid; the coordinator could only learn "no usable subjects". The unreadable cases run the agent's
scan and API in a child that dropped to uid 10001, as in the container.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from agent.api.app import create_app
from agent.cli import app as cli_app
from agent.config import AgentConfig, load_config
from agent.service import SiteService
from tests.fixtures.agents import add_tokens, make_site
from tests.fixtures.ownership import AGENT_UID, chown_tree, give_away, needs_root, open_tmp, run_as

__all__ = ["open_tmp"]  # the fixture, used by name


def _info_and_log(cfg: AgentConfig, token: str) -> dict[str, Any]:
    """Scan as the agent does at start, then GET /v1/info; the service's log lines with it."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname} {record.getMessage()}")

    logger = logging.getLogger("fedsite.service")
    handler = Keep()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    service = SiteService.open(cfg)
    try:
        service.scan()
        api = create_app(service)

        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=api)
            async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
                return await client.get("/v1/info", headers={"Authorization": f"Bearer {token}"})

        r = asyncio.run(call())
    finally:
        logger.removeHandler(handler)
        service.db.dispose()
    assert r.status_code == 200, r.text
    return {"info": r.json(), "log": lines}


def _prepared(base: Path) -> tuple[AgentConfig, str]:
    site = make_site(base / "fed", subjects=3, fmt="nifti", overrides={"device": "cpu"})
    token = add_tokens(site.config_path, coordinator="coord")["coord"]
    return load_config(site.config_path), token


@needs_root
def test_info_reports_a_dataset_the_agent_uid_cannot_read_as_unreadable_not_empty(open_tmp: Path) -> None:
    """Files 600 and folders 750 owned by another user, the agent running as uid 10001."""
    cfg, token = _prepared(open_tmp)
    give_away(cfg.datasets[0].root)
    chown_tree(cfg.work_dir, AGENT_UID)

    out = run_as(AGENT_UID, lambda: _info_and_log(cfg, token))

    [ds] = out["info"]["datasets"]
    assert ds["problems"] == [f"dataset folder unreadable by uid {AGENT_UID}"]
    assert ds["num_train"] == ds["num_val"] == 0
    assert "/" not in json.dumps(out["info"])
    [line] = [ln for ln in out["log"] if "dataset brain" in ln]
    assert line.startswith("ERROR") and f"uid {AGENT_UID}" in line and "chmod -R o+rX" in line


@needs_root
def test_info_counts_subjects_whose_files_the_agent_uid_cannot_read(open_tmp: Path) -> None:
    """The trial's case: folders readable, image files 600: each subject is skipped as unreadable."""
    cfg, token = _prepared(open_tmp)
    give_away(cfg.datasets[0].root, dir_mode=0o755)
    chown_tree(cfg.work_dir, AGENT_UID)

    out = run_as(AGENT_UID, lambda: _info_and_log(cfg, token))

    [ds] = out["info"]["datasets"]
    assert ds["problems"] == [f"3 subject(s) unreadable by uid {AGENT_UID}"]
    assert "/" not in json.dumps(out["info"])
    warnings = [ln for ln in out["log"] if ln.startswith("WARNING")]
    assert len(warnings) == 1 and "unreadable by uid" in warnings[0] and "setfacl" in warnings[0]


def test_a_scan_that_would_empty_a_dataset_keeps_the_catalog_and_says_why(tmp_path: Path) -> None:
    """`root: /data` with /data empty (a mistyped host path): the catalog is kept, /v1/info and the
    log say why; `data scan` refuses without --allow-shrink."""
    cfg, token = _prepared(tmp_path)
    before = _info_and_log(cfg, token)["info"]["datasets"][0]
    assert before["problems"] == [] and before["num_train"] + before["num_val"] == 3
    root = cfg.datasets[0].root
    shutil.rmtree(root)
    root.mkdir()

    out = _info_and_log(cfg, token)

    [ds] = out["info"]["datasets"]
    assert ds["num_train"] + ds["num_val"] == 3
    assert ds["problems"] == ["a scan found 0 of 3 catalogued subjects; the old catalog is kept"]
    assert any(ln.startswith("ERROR") and "--allow-shrink" in ln for ln in out["log"])
    assert cfg.source is not None
    runner = CliRunner()
    refused = runner.invoke(cli_app, ["data", "scan", "--config", str(cfg.source), "--no-progress"])
    assert refused.exit_code == 1 and "--allow-shrink" in refused.output
    allowed = runner.invoke(
        cli_app, ["data", "scan", "--config", str(cfg.source), "--no-progress", "--allow-shrink"]
    )
    assert allowed.exit_code == 0, allowed.output
    [ds] = _info_and_log(cfg, token)["info"]["datasets"]
    assert ds["problems"] == ["no subjects found"]


def test_a_small_shrink_is_scanned_without_a_flag(tmp_path: Path) -> None:
    removed = 1
    cfg, token = _prepared(tmp_path)
    _info_and_log(cfg, token)
    for sub in sorted(cfg.datasets[0].root.iterdir())[:removed]:
        shutil.rmtree(sub)
    [ds] = _info_and_log(cfg, token)["info"]["datasets"]
    assert ds["num_train"] + ds["num_val"] == 3 - removed and ds["problems"] == []


@needs_root
@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_subject_folders_the_agent_uid_cannot_list_count_as_unreadable(open_tmp: Path, fmt: str) -> None:
    """A readable root whose subject folders (NIfTI) or series folders (DICOM) are 750 of another
    user: discovery's glob and a series' rglob pass over them silently; they must count as
    unreadable, not as missing files or empty series."""
    site = make_site(open_tmp / "fed", subjects=3, fmt=fmt, overrides={"device": "cpu"})
    token = add_tokens(site.config_path, coordinator="coord")["coord"]
    cfg = load_config(site.config_path)
    root = cfg.datasets[0].root
    give_away(root, file_mode=0o644, dir_mode=0o755)
    closed = [p for p in root.iterdir()] if fmt == "nifti" else [p for p in root.glob("*/*") if p.is_dir()]
    assert closed
    for folder in closed:
        folder.chmod(0o750)
    chown_tree(cfg.work_dir, AGENT_UID)

    out = run_as(AGENT_UID, lambda: _info_and_log(cfg, token))

    [ds] = out["info"]["datasets"]
    assert ds["problems"] == [f"3 subject(s) unreadable by uid {AGENT_UID}"], ds


@needs_root
def test_a_pattern_below_a_folder_the_agent_uid_cannot_list_is_no_traceback(open_tmp: Path) -> None:
    """images: scans/{subject}/... with scans/ 750 of another user: the scan (at start-up) must not
    raise PermissionError; the dataset reports no subjects and the doctor names the folder."""
    site = make_site(open_tmp / "fed", subjects=3, fmt="nifti", overrides={"device": "cpu"})
    token = add_tokens(site.config_path, coordinator="coord")["coord"]
    cfg = load_config(site.config_path)
    ds = cfg.datasets[0]
    scans = ds.root / "scans"
    scans.mkdir()
    for sub in [p for p in ds.root.iterdir() if p != scans]:
        shutil.move(sub, scans / sub.name)
    ds.images = "scans/" + ds.images
    ds.label = "scans/" + (ds.label or "")
    give_away(scans)
    chown_tree(cfg.work_dir, AGENT_UID)

    out = run_as(AGENT_UID, lambda: _info_and_log(cfg, token))

    [info] = out["info"]["datasets"]
    assert info["problems"] == ["no subjects found"]
    from agent.doctor import run_doctor

    [check] = [c for c in run_doctor(cfg, as_uid=AGENT_UID).checks if c.name == "dataset brain"]
    assert check.status == "fail" and str(scans) in check.summary
