"""Generated multi-site brain-MRI-like data and `fedsite demo-data`.

Everything is generated small (in-plane size 32) so that the whole file runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from typer.testing import CliRunner

from agent.data import synthetic
from agent.data.demo_data import demo_data_app
from agent.data.synthetic import (
    MODALITIES,
    PAPER_SPLIT,
    TARGET_LABELS,
    FederationLayout,
    SyntheticDataError,
    default_plan,
    generate_federation,
    generate_subject,
    patient_identity,
    site_profile,
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


def _nii(path: Path) -> nib.Nifti1Image:
    img = nib.load(path)
    assert isinstance(img, nib.Nifti1Image), path
    return img


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray, list[pydicom.FileDataset]]:
    """An independent reader: slices sorted by position along the normal, affine in RAS from IPP/IOP."""
    slices = [pydicom.dcmread(p) for p in folder.iterdir()]
    iop = np.array([float(v) for v in slices[0].ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    slices.sort(key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))
    array = np.stack(
        [
            ds.pixel_array.T.astype(np.float32) * np.float32(ds.RescaleSlope)
            + np.float32(ds.RescaleIntercept)
            for ds in slices
        ],
        axis=-1,
    )
    first = np.array([float(v) for v in slices[0].ImagePositionPatient])
    last = np.array([float(v) for v in slices[-1].ImagePositionPatient])
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row * col_spacing
    lps[:3, 1] = col * row_spacing
    lps[:3, 2] = (last - first) / (len(slices) - 1)
    lps[:3, 3] = first
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, slices


# --- determinism -----------------------------------------------------------------------------


def test_subject_is_a_pure_function_of_seed_site_and_index() -> None:
    a = generate_subject(11, 2, 1, modalities=MODALITIES, size=SIZE)
    b = generate_subject(11, 2, 1, modalities=MODALITIES, size=SIZE)
    for m in MODALITIES:
        assert a.stored[m].tobytes() == b.stored[m].tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert np.array_equal(a.affine, b.affine)
    assert a.identity == b.identity
    other = generate_subject(12, 2, 1, size=SIZE)
    assert other.stored["flair"].tobytes() != a.stored["flair"].tobytes()


def test_more_modalities_leave_flair_and_label_unchanged() -> None:
    only = generate_subject(4, 1, 0, modalities=["flair"], size=SIZE)
    every = generate_subject(4, 1, 0, modalities=["t2", "flair", "t1gd"], size=SIZE)
    assert np.array_equal(only.stored["flair"], every.stored["flair"])
    assert np.array_equal(only.label, every.label)


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


# --- sites differ ----------------------------------------------------------------------------


def test_site_profiles_differ_like_institutions() -> None:
    profiles = [site_profile(0, k, size=64) for k in range(1, 11)]
    for attr in ("scale", "gamma", "noise", "bias_strength", "lesion_radius_mm", "slice_thickness"):
        values = [getattr(p, attr) for p in profiles]
        assert len(set(values)) >= 8, (attr, values)
    assert len({p.spacing for p in profiles}) >= 8
    assert len({p.shape for p in profiles}) >= 4
    assert len({p.lesion_direction for p in profiles}) == 10
    # Deterministic per (seed, site), independent of how many sites are asked for.
    assert site_profile(0, 3, size=64) == profiles[2]
    assert site_profile(1, 3, size=64) != profiles[2]
    # Default in-plane size 64 gives volumes of about 64 x 64 x 30-45.
    for p in profiles:
        assert 40 <= p.shape[0] <= 64 and 48 <= p.shape[1] <= 64 and 26 <= p.shape[2] <= 48, p.shape
    # Twice the in-plane size: about twice the matrix, and thinner slices.
    big = site_profile(0, 1, size=128)
    assert big.shape[1] >= 2 * profiles[0].shape[1] - 8 and big.spacing[2] < profiles[0].spacing[2]


def test_intensity_statistics_differ_across_sites() -> None:
    bright, noise = [], []
    for site in (1, 2, 3):
        sub = generate_subject(0, site, 0, size=SIZE)
        img = sub.image("flair")
        bright.append(float(np.percentile(img, 95)))  # tissue, not air
        corner = img[:3, :3, :]  # air: only offset and noise
        noise.append(float(corner.std()) / float(sub.profile.scale))
    ordered = sorted(bright)
    assert ordered[1] > 1.3 * ordered[0] and ordered[2] > 1.3 * ordered[1], bright
    assert len({round(n, 4) for n in noise}) == 3


def test_lesions_are_hyperintense_on_flair_at_every_site() -> None:
    # What makes the task learnable: at every site the whole tumour stands out from the brain
    # around it on FLAIR by several noise standard deviations.
    for site in range(1, 7):
        sub = generate_subject(1, site, 0, size=64)
        img = sub.image("flair")
        tumour = sub.whole_tumour
        grown = np.zeros_like(tumour)
        for axis in range(3):
            grown |= np.roll(tumour, 3, axis) | np.roll(tumour, -3, axis)
        around = grown & ~tumour & (img > np.percentile(img, 60))
        sigma = sub.profile.noise * sub.profile.scale
        contrast = (float(np.median(img[tumour])) - float(np.median(img[around]))) / sigma
        assert contrast > 3.0, (site, contrast)


def test_a_small_network_learns_the_target_in_a_hundred_steps() -> None:
    # Learnable across sites despite their differences: a tiny fully convolutional network,
    # trained for 100 steps with -log(Dice) on slices of three sites, segments unseen subjects
    # of the same sites. (At this in-plane size of 32 a lesion is only a few voxels across,
    # which caps the Dice; at the default size of 64 a network like this one reaches about 0.8.)
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def volume(site: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        sub = generate_subject(0, site, index, size=SIZE)
        img = sub.image("flair")
        img = (img - img.mean()) / img.std()
        pad = [((SIZE - n) // 2, SIZE - n - (SIZE - n) // 2) for n in img.shape[:2]] + [(0, 0)]
        return np.pad(img, pad), np.pad(sub.whole_tumour.astype(np.float32), pad)

    train = [volume(site, index) for site in (1, 2, 3) for index in range(3)]
    val = [volume(site, 3) for site in (1, 2, 3)]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=2, dilation=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=4, dilation=4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 1, 1),
    )
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _step in range(100):
        xs, ys = [], []
        for _ in range(16):
            img, lab = train[int(rng.integers(len(train)))]
            with_tumour = np.nonzero(lab.sum(axis=(0, 1)))[0]
            k = rng.choice(with_tumour) if rng.random() < 0.7 else rng.integers(lab.shape[2])
            xs.append(img[:, :, k])
            ys.append(lab[:, :, k])
        x, y = torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys)[:, None])
        p = torch.sigmoid(net(x))
        loss = torch.log(p.sum() + y.sum() + 1) - torch.log(2 * (p * y).sum() + 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dice = []
    with torch.no_grad():
        for img, lab in val:
            pred = (net(torch.from_numpy(np.moveaxis(img, 2, 0)[:, None].copy())) > 0).numpy()[:, 0]
            truth = np.moveaxis(lab, 2, 0) > 0.5
            dice.append(2 * float((pred & truth).sum()) / float(pred.sum() + truth.sum()))
    assert float(np.mean(dice)) > 0.5, dice


def test_labels_are_brats_values_and_never_empty() -> None:
    seen: set[int] = set()
    for site in range(1, 6):
        for index in range(3):
            sub = generate_subject(5, site, index, size=SIZE)
            values = set(np.unique(sub.label).tolist())
            assert values <= {0, *TARGET_LABELS}
            assert sub.whole_tumour.any()
            assert sub.label.dtype == np.uint8 and sub.label.shape == sub.stored["flair"].shape
            seen |= values
    # Necrosis (1), oedema (2) and enhancing tumour (4) all occur: a whole-tumour target needs
    # the mapping {1, 2, 4} -> 1, not just "label > 0" of one value.
    assert seen == {0, 1, 2, 4}


def test_patient_ids_are_unique_and_made_up() -> None:
    ids = [patient_identity(0, site, j).patient_id for site in range(1, 11) for j in range(80)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 9 and i.startswith("PAT-") and i[4:].isdigit() for i in ids)
    ident = patient_identity(0, 4, 2)
    family, given = ident.name.split("^")
    assert family and given and ident.institution == "St. Example Hospital 4"
    assert len(ident.birth_date) == 8 and ident.birth_date[:2] in ("19", "20")


# --- NIfTI and DICOM output ------------------------------------------------------------------


def test_nifti_layout_values_and_geometry(nifti_fed: FederationLayout) -> None:
    site = nifti_fed.sites[0]
    assert [p.name for p in sorted(site.data_dir.iterdir())] == sorted(site.subjects)
    for index, pid in enumerate(site.subjects):
        subject = generate_subject(3, 1, index, modalities=["flair", "t1"], size=SIZE)
        assert subject.patient_id == pid
        folder = site.data_dir / pid
        assert sorted(p.name for p in folder.iterdir()) == ["flair.nii.gz", "seg.nii.gz", "t1.nii.gz"]
        for modality in ("flair", "t1"):
            img = _nii(folder / f"{modality}.nii.gz")
            assert img.get_data_dtype() == np.uint16  # stored values plus scl_slope / scl_inter
            assert np.array_equal(img.get_fdata(dtype=np.float32), subject.image(modality))
            assert np.allclose(img.affine, subject.affine)
            assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
        seg = _nii(folder / "seg.nii.gz")
        assert np.array_equal(np.asarray(seg.dataobj), subject.label)
        assert np.allclose(seg.affine, subject.affine)


def test_dicom_series_equal_the_nifti_voxels_and_geometry(
    nifti_fed: FederationLayout, dicom_fed: FederationLayout
) -> None:
    for site_n, site_d in zip(nifti_fed.sites, dicom_fed.sites, strict=True):
        assert site_n.subjects[: len(site_d.subjects)] == site_d.subjects
        for pid in site_d.subjects:
            seg = _nii(site_d.data_dir / pid / "seg.nii.gz")
            for modality in ("flair", "t1"):
                ref = _nii(site_n.data_dir / pid / f"{modality}.nii.gz")
                array, affine, slices = _read_dicom_series(site_d.data_dir / pid / modality)
                assert np.array_equal(array, ref.get_fdata(dtype=np.float32))
                assert np.allclose(affine, ref.affine, atol=1e-4)
                assert np.allclose(seg.affine, affine, atol=1e-4)
                assert seg.shape == array.shape
                ds = slices[0]
                thickness, between = float(ds.SliceThickness), float(ds.SpacingBetweenSlices)
                assert np.isclose(between, np.linalg.norm(affine[:3, 2]), atol=1e-4)
                assert 0 < thickness <= between


def test_dicom_reader_of_the_agent_reads_the_same_grid(
    nifti_fed: FederationLayout, dicom_fed: FederationLayout
) -> None:
    from agent.data.dicom import read_dicom_series

    pid = dicom_fed.sites[1].subjects[0]
    ref = _nii(nifti_fed.sites[1].data_dir / pid / "flair.nii.gz")
    volume = read_dicom_series(dicom_fed.sites[1].data_dir / pid / "flair")
    assert np.array_equal(volume.array, ref.get_fdata(dtype=np.float32))
    assert np.allclose(volume.affine, ref.affine, atol=1e-4)
    assert volume.patient_id == pid and volume.modality == "MR"


def test_dicom_headers_are_a_realistic_series_with_made_up_identity(dicom_fed: FederationLayout) -> None:
    site = dicom_fed.sites[0]
    pid = site.subjects[0]
    ident = patient_identity(3, 1, 0)
    assert ident.patient_id == pid
    folder = site.data_dir / pid / "flair"
    files = sorted(folder.iterdir())
    datasets = [pydicom.dcmread(p) for p in files]
    assert len(datasets) == site.shape[2]
    sop_uids = {ds.SOPInstanceUID for ds in datasets}
    assert len(sop_uids) == len(datasets)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    for ds in datasets:
        assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.MRImageStorage == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "MR"
        assert str(ds.PatientName) == ident.name and ds.PatientID == pid
        assert ds.PatientBirthDate == ident.birth_date and ds.PatientSex == ident.sex
        assert ds.InstitutionName == "St. Example Hospital 1"
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, 0)
        assert float(ds.RescaleSlope) == site_profile(3, 1, size=SIZE).rescale_slope
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert ds.Rows == site.shape[1] and ds.Columns == site.shape[0]
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
            assert uid.is_valid
    # File names are random and their order says nothing about the slice order.
    instance_order = [int(ds.InstanceNumber) for ds in datasets]
    assert instance_order != sorted(instance_order)
    # The T1 series of the same exam shares the study but not the series.
    t1 = pydicom.dcmread(next((site.data_dir / pid / "t1").iterdir()))
    assert t1.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert t1.SeriesInstanceUID != datasets[0].SeriesInstanceUID


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
    from coordinator.federation import FederationError, load_federation

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

    monkeypatch.setattr("agent.data.demo_data.generate_federation", fake)
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

    def failing(subject: synthetic.SyntheticSubject, folder: Path) -> list[Path]:
        if written:
            raise OSError("disk full")
        written.append(1)
        return real(subject, folder)

    real = synthetic.write_nifti_subject
    monkeypatch.setattr(synthetic, "write_nifti_subject", failing)
    with pytest.raises(OSError, match="disk full"):
        generate_federation(out, sites=2, subjects_per_site=[1, 1], size=SIZE, seed=2, force=True)
    assert _tree_digest(out) == before and first.sites[0].subjects
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fed"]


def test_library_errors_name_the_argument(tmp_path: Path) -> None:
    with pytest.raises(SyntheticDataError, match="subjects_per_site lists 1 count"):
        generate_federation(tmp_path / "a", sites=2, subjects_per_site=[3], size=SIZE)
    with pytest.raises(SyntheticDataError, match="seed must be a non-negative integer"):
        generate_subject(-1, 1, 0)
    with pytest.raises(SyntheticDataError, match="site index must be from 1"):
        site_profile(0, 0)
    with pytest.raises(SyntheticDataError, match="extra_sites must be 0 or more"):
        generate_federation(tmp_path / "b", sites=1, subjects_per_site=[1], size=SIZE, extra_sites=-1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
