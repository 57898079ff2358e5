"""The demo federation on disk (`coordinator.demo_federation`) and `fedsite demo-data`.

Sites with generated data, their agent configs, the federation file and the default plan.
Everything is generated small (in-plane size 32) so that the whole file runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from agent.cli.demo import demo_data_app
from agent.data.synthetic.subjects import SyntheticSubject
from agent.errors import SyntheticDataError
from coordinator import demo_federation
from coordinator.demo_federation import (
    PAPER_SPLIT,
    FederationLayout,
    default_plan,
    generate_federation,
)

SIZE = 32


@pytest.fixture(scope="module")
def nifti_fed(tmp_path_factory: pytest.TempPathFactory) -> FederationLayout:
    out = tmp_path_factory.mktemp("nifti") / "fed"
    return generate_federation(
        out, sites=2, subjects_per_site=[2, 1], fmt="nifti", modalities=["flair", "t1"], size=SIZE, seed=3,
        extra_sites=1, extra_subjects=1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dicom_fed(tmp_path_factory: pytest.TempPathFactory) -> FederationLayout:
    out = tmp_path_factory.mktemp("dicom") / "fed"
    return generate_federation(
        out, sites=2, subjects_per_site=[1, 1], fmt="dicom", modalities=["flair", "t1"], size=SIZE, seed=3
    )


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- determinism -----------------------------------------------------------------------------


def test_federation_files_are_byte_identical_for_a_seed(tmp_path: Path) -> None:
    kwargs = {"sites": 1, "subjects_per_site": [1], "size": SIZE, "seed": 9, "extra_sites": 1}
    for fmt in ("nifti", "dicom"):
        a = generate_federation(tmp_path / f"a-{fmt}", fmt=fmt, **kwargs)  # type: ignore[arg-type]
        b = generate_federation(tmp_path / f"b-{fmt}", fmt=fmt, **kwargs)  # type: ignore[arg-type]
        assert _tree_digest(a.root) == _tree_digest(b.root)
        assert a.sites[0].subjects == b.sites[0].subjects
    c = generate_federation(tmp_path / "c", fmt="nifti", **{**kwargs, "seed": 10})  # type: ignore[arg-type]
    assert _tree_digest(c.root) != _tree_digest(tmp_path / "a-nifti")


def test_adding_sites_does_not_change_existing_ones(tmp_path: Path) -> None:
    small = generate_federation(tmp_path / "small", sites=1, subjects_per_site=[1], size=SIZE, seed=2)
    large = generate_federation(tmp_path / "large", sites=2, subjects_per_site=[1, 1], size=SIZE, seed=2)
    assert _tree_digest(small.sites[0].data_dir) == _tree_digest(large.sites[0].data_dir)


def test_site_data_folders_are_the_subjects(nifti_fed: FederationLayout) -> None:
    site = nifti_fed.sites[0]
    assert [p.name for p in sorted(site.data_dir.iterdir())] == sorted(site.subjects)


# --- configs, federation file, plan ----------------------------------------------------------


@pytest.mark.parametrize("which", ["nifti_fed", "dicom_fed"])
def test_site_configs_load_and_point_at_the_data(which: str, request: pytest.FixtureRequest) -> None:
    from agent.config import load_config

    layout: FederationLayout = request.getfixturevalue(which)
    for site in layout.all_sites:
        text = site.config_path.read_text()
        assert text.startswith("#") and "token" not in yaml.safe_load(text)["api"]
        cfg = load_config(site.config_path, environ={})
        assert cfg.site.id == site.site_id
        assert cfg.api.host == "127.0.0.1" and cfg.api.port == 8100 + site.index == site.port
        assert cfg.approval.policy == "auto" and cfg.device == "auto"
        assert cfg.work_dir == site.work_dir.resolve()
        (ds,) = cfg.datasets
        assert ds.name == "brain" and ds.format == layout.fmt and ds.root == site.data_dir.resolve()
        assert ds.modalities == ["flair", "t1"] and ds.target_labels == [1, 2, 4] and ds.val_fraction == 0.25
        for pid in site.subjects:
            for modality in ds.modalities:
                path = ds.root / ds.images.format(subject=pid, modality=modality)
                assert path.is_dir() if layout.fmt == "dicom" else path.is_file()
            assert ds.label is not None and (ds.root / ds.label.format(subject=pid)).is_file()
        # The made-up institution is patient data (a DICOM header value), not the site's name.
        assert cfg.site.name != site.institution


def test_federation_file_lists_inside_and_outside_sites(nifti_fed: FederationLayout) -> None:
    from coordinator.errors import FederationError
    from coordinator.federation import load_federation

    doc = yaml.safe_load(nifti_fed.federation_path.read_text())
    assert [a["name"] for a in doc["agents"]] == ["site-1", "site-2"]
    assert [a["name"] for a in doc["outside"]] == ["site-3"]
    for entry in doc["agents"] + doc["outside"]:
        site = nifti_fed.site(entry["name"])
        assert entry["url"] == site.url == f"http://127.0.0.1:{site.port}"
        assert (nifti_fed.root / entry["token_file"]) == site.token_file
    assert nifti_fed.outside[0].outside and not nifti_fed.sites[0].outside
    # The tokens are created later, by whoever starts the agents; until then the coordinator
    # says which file is missing.
    with pytest.raises(FederationError, match=r"site-1/coordinator\.token"):
        load_federation(nifti_fed.federation_path)
    for site in nifti_fed.all_sites:
        site.token_file.write_text("token-" + site.site_id)
    try:
        fed = load_federation(nifti_fed.federation_path)
        assert fed.names == ["site-1", "site-2"] and fed.outside_names == ["site-3"]
        assert fed.agent("site-2").bearer_token() == "token-site-2"
    finally:
        for site in nifti_fed.all_sites:
            site.token_file.unlink()


def test_plan_is_the_default_fedavg_plan_and_valid(nifti_fed: FederationLayout) -> None:
    from agent.training.plan import parse_plan

    raw = json.loads(nifti_fed.plan_path.read_text())
    assert raw == default_plan(modalities=["flair", "t1"], size=SIZE)
    assert raw["model"]["in_channels"] == 2 and raw["data"]["roi_size"] == [SIZE, SIZE]
    assert raw["loss"] == "log_dice" and raw["send"] == "weights" and raw["dataset"] == "brain"
    plan = parse_plan(raw)
    assert plan.model.name == "unet" and plan.data.spatial_dims == 2


# --- command line ----------------------------------------------------------------------------


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(demo_data_app, args)
    return result.exit_code, result.output


def test_cli_writes_a_federation_and_summarises_it(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ["--sites", "2", "--subjects-per-site", "2,1", "--extra-sites", "1", "--size", "32", "--seed", "4"]
    code, output = _run([str(out), *args, "--base-port", "9300", "--format", "dicom"])
    assert code == 0, output
    assert "site-1" in output and "site-3" in output and "outside the federation" in output
    assert str(out / "federation.yaml") in output
    assert sorted(p.name for p in out.iterdir()) == [
        "federation.yaml",
        "plan.json",
        "site-1",
        "site-2",
        "site-3",
    ]
    assert len(list((out / "site-1" / "data").iterdir())) == 2
    cfg = yaml.safe_load((out / "site-2" / "config.yaml").read_text())
    assert cfg["api"]["port"] == 9302 and cfg["datasets"][0]["images"] == "{subject}/{modality}"
    assert not list(tmp_path.glob(".demo.partial-*"))


def test_cli_paper_split_and_extra_sites(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []

    def fake(out: Path, **kwargs: Any) -> object:
        calls.append(kwargs)
        raise SyntheticDataError("stop here")

    monkeypatch.setattr("agent.cli.demo.generate_federation", fake)
    code, output = _run([str(tmp_path / "x"), "--paper-split", "--extra-sites", "2"])
    assert code == 2 and "stop here" in output
    assert calls[0]["sites"] == 10 and list(calls[0]["subjects_per_site"]) == [
        70,
        27,
        17,
        12,
        11,
        9,
        6,
        6,
        4,
        3,
    ]
    assert list(PAPER_SPLIT) == [70, 27, 17, 12, 11, 9, 6, 6, 4, 3] and sum(PAPER_SPLIT) == 165
    assert calls[0]["extra_sites"] == 2
    code, output = _run([str(tmp_path / "y"), "--subjects-per-site", "5"])
    assert calls[1]["sites"] == 3 and list(calls[1]["subjects_per_site"]) == [5, 5, 5]


def test_extra_sites_are_numbered_after_the_federation(tmp_path: Path) -> None:
    layout = generate_federation(
        tmp_path / "f", sites=3, subjects_per_site=[1, 1, 1], size=SIZE, extra_sites=2
    )
    assert [s.site_id for s in layout.outside] == ["site-4", "site-5"]
    assert [len(s.subjects) for s in layout.outside] == [1, 1]
    assert layout.config_paths == [tmp_path / "f" / f"site-{k}" / "config.yaml" for k in (1, 2, 3)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sites", "3", "--subjects-per-site", "8,6"], "lists 2 counts for 3 site(s)"),
        (["--sites", "0"], "--sites must be at least 1"),
        (["--subjects-per-site", "4,x,2"], "'x' is not a whole number"),
        (["--subjects-per-site", "4,0,2"], "subjects_per_site[1] must be from 1"),
        (["--paper-split", "--sites", "4"], "--paper-split makes 10 sites"),
        (["--format", "png"], "--format must be nifti or dicom"),
        (["--modalities", "flair,dwi"], "unknown dwi"),
        (["--modalities", "flair,flair"], "listed twice"),
        (["--size", "30"], "size must be a multiple of 8"),
        (["--base-port", "65534"], "base_port"),
    ],
)
def test_cli_refuses_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    code, output = _run([str(tmp_path / "out"), *args])
    assert code == 2 and message in output, output
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_used_folder_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, output = _run([str(out), "--sites", "1", "--subjects-per-site", "1", "--size", "32"])
    assert code == 2 and "not empty" in output and "--force" in output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    code, output = _run([str(out), "--sites", "2", "--subjects-per-site", "1", "--size", "32", "--force"])
    assert code == 0, output
    stale = out / "site-2" / "data" / "PAT-00000"
    stale.mkdir()
    code, output = _run([str(out), "--sites", "1", "--subjects-per-site", "1", "--size", "32", "--force"])
    assert code == 0, output
    # A forced run replaces what an earlier run generated and keeps everything else.
    assert sorted(p.name for p in out.iterdir()) == ["federation.yaml", "notes.txt", "plan.json", "site-1"]
    assert (out / "notes.txt").read_text() == "keep me"

    target = tmp_path / "a-file"
    target.write_text("x")
    code, output = _run([str(target), "--size", "32"])
    assert code == 2 and "not a folder" in output


def test_a_failure_half_way_leaves_the_output_folder_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "fed"
    first = generate_federation(out, sites=1, subjects_per_site=[1], size=SIZE, seed=1)
    before = _tree_digest(out)
    written: list[int] = []

    def failing(subject: SyntheticSubject, folder: Path) -> list[Path]:
        if written:
            raise OSError("disk full")
        written.append(1)
        return real(subject, folder)

    real = demo_federation.write_nifti_subject
    monkeypatch.setattr(demo_federation, "write_nifti_subject", failing)
    with pytest.raises(OSError, match="disk full"):
        generate_federation(out, sites=2, subjects_per_site=[1, 1], size=SIZE, seed=2, force=True)
    assert _tree_digest(out) == before and first.sites[0].subjects
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fed"]


def test_library_errors_name_the_argument(tmp_path: Path) -> None:
    with pytest.raises(SyntheticDataError, match="subjects_per_site lists 1 count"):
        generate_federation(tmp_path / "a", sites=2, subjects_per_site=[3], size=SIZE)
    with pytest.raises(SyntheticDataError, match="extra_sites must be 0 or more"):
        generate_federation(tmp_path / "b", sites=1, subjects_per_site=[1], size=SIZE, extra_sites=-1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
