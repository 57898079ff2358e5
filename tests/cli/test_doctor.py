"""`fedsite doctor` and `fedsite config check`: every check says what is wrong and how to fix it.

The data checks run as the agent's uid: a tree that root reads fine but uid 10001 cannot must be
named with the uid and the command that fixes it, never reported as fine or as empty.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from agent import doctor
from agent.cli import app
from agent.config import load_config
from agent.doctor import check_clock, check_device, check_disk, check_tls, free_space, run_doctor
from agent.tls.issue import init_certificates
from tests.fixtures.agents import make_site
from tests.fixtures.ownership import AGENT_UID, give_away, needs_root, open_tmp, run_as

__all__ = ["open_tmp"]  # the fixture, used by name

runner = CliRunner()


def _site(base: Path, **overrides: object) -> Path:
    return make_site(base / "fed", subjects=3, fmt="nifti", overrides=dict(overrides)).config_path


@needs_root
def test_doctor_names_the_agent_uid_and_the_fix_for_files_it_cannot_read(open_tmp: Path) -> None:
    """Files 600 and folders 750 owned by another user: root reads them, uid 10001 does not."""
    config = _site(open_tmp)
    root = load_config(config).datasets[0].root
    give_away(root)

    res = runner.invoke(app, ["doctor", "--config", str(config), "--as-uid", str(AGENT_UID)])

    assert res.exit_code == 1, res.output
    [line] = [ln for ln in res.output.splitlines() if ln.startswith("FAIL dataset brain")]
    assert f"uid {AGENT_UID}" in line and str(root) in line
    assert f"chmod -R o+rX {root}" in line and f"setfacl -R -m u:{AGENT_UID}:rX {root}" in line
    out = runner.invoke(app, ["doctor", "--config", str(config), "--as-uid", str(AGENT_UID), "--json"])
    report = json.loads(out.stdout)
    assert report["ok"] is False and report["checks"][0]["status"] == "fail"
    # As root, for root, the same tree is fine: the uid is what the check is about.
    assert runner.invoke(app, ["doctor", "--config", str(config), "--as-uid", "0"]).exit_code == 0


@needs_root
def test_doctor_finds_unreadable_files_under_readable_folders(open_tmp: Path) -> None:
    """The trial's case: folders open to all, image files 600: the listing works, reading does not."""
    config = _site(open_tmp)
    root = load_config(config).datasets[0].root
    give_away(root, dir_mode=0o755)

    report = run_doctor(load_config(config), as_uid=AGENT_UID)

    check = report.checks[0]
    assert check.status == "fail" and "file(s)" in check.summary and f"uid {AGENT_UID}" in check.summary


@needs_root
def test_site_run_as_uid_is_the_default_uid_of_the_checks(open_tmp: Path) -> None:
    config = _site(open_tmp, site={"id": "site-1", "run_as_uid": AGENT_UID})
    give_away(load_config(config).datasets[0].root)
    assert not run_doctor(load_config(config)).ok


@needs_root
def test_config_check_shows_the_doctor_and_fails_on_unreadable_data(open_tmp: Path) -> None:
    config = _site(open_tmp)
    give_away(load_config(config).datasets[0].root)

    res = runner.invoke(app, ["config", "check", str(config), "--as-uid", str(AGENT_UID)])

    assert res.exit_code == 1, res.output
    first, *rest = res.output.splitlines()
    assert first.endswith("dataset(s), database " + load_config(config).db_url + ")") and ": OK (" in first
    assert any(ln.startswith("FAIL dataset brain") and f"uid {AGENT_UID}" in ln for ln in rest)
    assert "Traceback" not in res.output


@needs_root
def test_config_check_of_a_folder_behind_an_unreachable_parent_is_one_line(open_tmp: Path) -> None:
    """PermissionError from the path check was a 40-line traceback; now: the folder, the uid, the fix
    (run as the agent's uid, as in its container)."""
    config = _site(open_tmp)
    root = load_config(config).datasets[0].root
    blocked = root.parent / "blocked"
    blocked.mkdir(mode=0o700)
    shutil.move(root, blocked / "data")
    raw = yaml.safe_load(config.read_text())
    raw["datasets"][0]["root"] = str(blocked / "data")
    config.write_text(yaml.safe_dump(raw))

    def check() -> list[object]:
        res = runner.invoke(app, ["config", "check", str(config)])
        return [res.exit_code, res.output]

    code, output = run_as(AGENT_UID, check)

    assert code == 2 and "Traceback" not in output, output
    assert len(output.strip().splitlines()) == 1, output
    assert f"uid {AGENT_UID} cannot enter {blocked}" in output and f"chmod o+x {blocked}" in output


def test_an_empty_data_folder_is_flagged(tmp_path: Path) -> None:
    """A mistyped host path gives docker an empty folder: flagged, not quietly passed."""
    config = _site(tmp_path)
    root = load_config(config).datasets[0].root
    shutil.rmtree(root)
    root.mkdir()

    res = runner.invoke(app, ["config", "check", str(config)])

    assert res.exit_code == 0, res.output
    [line] = [ln for ln in res.output.splitlines() if "dataset brain" in ln]
    assert line.startswith("WARN") and "empty" in line


def test_doctor_warns_when_the_folder_lost_subjects_the_catalog_has(tmp_path: Path) -> None:
    config = _site(tmp_path)
    assert runner.invoke(app, ["data", "scan", "--config", str(config), "--no-progress"]).exit_code == 0
    root = load_config(config).datasets[0].root
    for sub in sorted(root.iterdir())[:2]:
        shutil.rmtree(sub)

    report = run_doctor(load_config(config))

    check = report.checks[0]
    assert check.status == "warn" and "1 subject(s) found, the catalog has 3" in check.summary
    assert "--allow-shrink" in check.summary


def test_no_subject_matching_the_pattern_is_flagged(tmp_path: Path) -> None:
    config = _site(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["datasets"][0]["images"] = "{subject}/{modality}.nii"
    config.write_text(yaml.safe_dump(raw))
    check = run_doctor(load_config(config)).checks[0]
    assert check.status == "warn" and "no subject matches the images pattern" in check.summary


def _tls_site(tmp_path: Path, hosts: str, now: dt.datetime | None = None) -> Path:
    files = init_certificates(tmp_path / "pki", site_id="site-1", hosts=hosts, now=now)
    tls = {"cert_file": str(files["server_cert"]), "key_file": str(files["server_key"])}
    return _site(tmp_path, api={"host": "127.0.0.1", "port": 8101, "tls": tls})


def test_tls_names_must_include_the_hosts_clients_use(tmp_path: Path) -> None:
    cfg = load_config(_tls_site(tmp_path, "localhost,127.0.0.1"))
    now = dt.datetime.now(dt.UTC)
    assert check_tls(cfg, 0, ["localhost"], now).status == "ok"
    bad = check_tls(cfg, 0, ["agent.hospital.example"], now)
    assert bad.status == "fail" and "does not name agent.hospital.example" in bad.summary


def test_tls_key_that_is_not_the_certificates_fails(tmp_path: Path) -> None:
    cfg = load_config(_tls_site(tmp_path, "localhost,127.0.0.1"))
    other = init_certificates(tmp_path / "other", site_id="site-2")
    assert cfg.api.tls is not None
    cfg.api.tls.key_file = other["server_key"]
    check = check_tls(cfg, 0, [], dt.datetime.now(dt.UTC))
    assert check.status == "fail" and "is not the key of" in check.summary


def test_tls_expiring_soon_warns(tmp_path: Path) -> None:
    cfg = load_config(_tls_site(tmp_path, "localhost,127.0.0.1"))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=825 - 10)
    check = check_tls(cfg, 0, [], later)
    assert check.status == "warn" and "expires in" in check.summary


def test_a_clock_behind_the_certificate_fails(tmp_path: Path) -> None:
    cfg = load_config(_tls_site(tmp_path, "localhost,127.0.0.1"))
    behind = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    check = check_clock(cfg, None, behind)
    assert check.status == "fail" and "behind the certificate's start" in check.summary
    assert check_clock(cfg, None, dt.datetime.now(dt.UTC)).status == "ok"


@pytest.mark.parametrize(
    ("free", "status", "shown"),
    [(1 << 20, "fail", "0.0 GiB"), (5 << 30, "warn", "5.0 GiB"), (50 << 30, "ok", "50.0 GiB")],
)
def test_disk_check_fails_below_1_gib_and_warns_below_10(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free: int, status: str, shown: str
) -> None:
    cfg = load_config(_site(tmp_path))
    seen: list[Path] = []

    def reported(path: Path) -> int:
        seen.append(path)
        return free

    monkeypatch.setattr(doctor, "free_space", reported)
    check = check_disk(cfg)
    assert check.status == status and f"{shown} free for {cfg.work_dir}" in check.summary
    assert seen == [cfg.work_dir]


def test_free_space_is_that_of_the_volume_the_work_directory_will_be_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[Path] = []

    def usage(path: Path) -> tuple[int, int, int]:
        asked.append(Path(path))
        return shutil._ntuple_diskusage(3 << 30, 1 << 30, 2 << 30)  # type: ignore[attr-defined,no-any-return]

    monkeypatch.setattr(shutil, "disk_usage", usage)
    assert free_space(tmp_path / "work" / "not-yet") == 2 << 30
    assert asked == [tmp_path]  # the nearest folder that exists
    (tmp_path / "work").mkdir()
    assert free_space(tmp_path / "work") == 2 << 30 and asked[-1] == tmp_path / "work"


def test_database_unreachable_or_unmigrated(tmp_path: Path) -> None:
    config = _site(tmp_path)
    cfg = load_config(config)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    (cfg.work_dir / "fedsite.db").write_bytes(b"not a database" * 100)
    [db] = [c for c in run_doctor(cfg).checks if c.name == "database"]
    assert db.status == "fail" and "cannot reach" in db.summary
    (cfg.work_dir / "fedsite.db").unlink()
    import sqlite3

    sqlite3.connect(cfg.work_dir / "fedsite.db").close()  # an empty database: not migrated
    [db] = [c for c in run_doctor(cfg).checks if c.name == "database"]
    assert db.status == "warn" and "migrates it at start" in db.summary


def test_approval_policy_is_explained(tmp_path: Path) -> None:
    manual = load_config(_site(tmp_path, approval={"policy": "manual"}))
    [check] = [c for c in run_doctor(manual).checks if c.name == "approval"]
    assert check.summary.startswith("manual:") and "approved" in check.summary


def _gpu(available: bool) -> doctor.GpuProbe:
    if available:
        return doctor.GpuProbe(True, "NVIDIA H200", 139.8, "2.11.0+cu130", "13.0")
    return doctor.GpuProbe(False, None, None, "2.13.0+cpu", None)


def _no_probe() -> doctor.GpuProbe:
    raise AssertionError("torch was asked although no GPU device file exists")


def test_device_check_without_a_gpu_never_imports_torch_and_fails_only_when_cuda_is_required(
    tmp_path: Path,
) -> None:
    absent = [str(tmp_path / "nvidia0")]
    auto = check_device(load_config(_site(tmp_path)), device_nodes=absent, probe=_no_probe)
    assert auto.status == "ok" and "no GPU visible: training on the CPU" in auto.summary
    cpu = check_device(load_config(_site(tmp_path / "c", device="cpu")), device_nodes=absent, probe=_no_probe)
    assert cpu.status == "ok" and cpu.summary.startswith("cpu (set in the config): training on the CPU")
    cuda = check_device(
        load_config(_site(tmp_path / "g", device="cuda")), device_nodes=absent, probe=_no_probe
    )
    assert cuda.status == "fail" and "no GPU is visible here" in cuda.summary
    assert "docker-compose.gpu.yml" in cuda.details[0] and "TORCH_VARIANT=cuda" in cuda.details[0]


def test_device_check_with_a_gpu_names_it_or_says_why_torch_cannot_use_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = tmp_path / "nvidia0"
    node.touch()
    present = [str(node)]
    auto_cfg = load_config(_site(tmp_path))
    cuda_cfg = load_config(_site(tmp_path / "g", device="cuda"))
    monkeypatch.setattr(doctor.os, "sched_getaffinity", lambda _pid: set(range(16)))
    from agent.training import engine

    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda _pid: set(range(16)))
    ok = check_device(auto_cfg, device_nodes=present, probe=lambda: _gpu(True))
    assert ok.status == "ok" and ok.summary == (
        "auto: NVIDIA H200 (140 GiB), mixed precision, 4 loader threads"
    )
    auto_cfg.loader_threads = 1
    assert check_device(auto_cfg, device_nodes=present, probe=lambda: _gpu(True)).summary.endswith(
        "1 loader thread"
    )
    # A CPU build of torch in a GPU container: training would silently run on the CPU.
    unusable = check_device(auto_cfg, device_nodes=present, probe=lambda: _gpu(False))
    assert unusable.status == "warn"
    assert (
        unusable.summary
        == "auto, but torch 2.13.0+cpu (a CPU build) cannot use the GPU whose device files are here: "
        "training on the CPU (16 cores)"
    )
    failing = check_device(cuda_cfg, device_nodes=present, probe=lambda: _gpu(False))
    assert failing.status == "fail" and "every round would fail" in failing.summary


def test_the_doctor_reports_the_device(tmp_path: Path) -> None:
    [device] = [
        c for c in run_doctor(load_config(_site(tmp_path, device="cpu"))).checks if c.name == "device"
    ]
    assert device.status == "ok" and "training on the CPU" in device.summary
