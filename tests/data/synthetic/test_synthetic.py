"""Generated brain-MRI-like data: site profiles, subjects, identities, NIfTI and DICOM writers.

Everything is generated small (in-plane size 32) so that the whole file runs in seconds. Laying
sites out as a federation, and `fedsite demo-data`, are tested in test_demo_federation.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from agent.data.synthetic.anatomy import TARGET_LABELS
from agent.data.synthetic.identities import patient_identity
from agent.data.synthetic.rendering import MODALITIES
from agent.data.synthetic.sites import site_profile
from agent.data.synthetic.subjects import generate_subject
from agent.data.synthetic.writers import Format, write_dicom_subject, write_nifti_subject
from agent.errors import SyntheticDataError

SIZE = 32
SEED = 3
WRITTEN_MODALITIES = ("flair", "t1")


@dataclass(frozen=True)
class WrittenSite:
    """One site's subjects as the writers left them, one folder per patient ID."""

    data_dir: Path
    subjects: tuple[str, ...]
    shape: tuple[int, int, int]


def _write_sites(root: Path, fmt: Format, counts: list[int]) -> list[WrittenSite]:
    sites = []
    for index, count in enumerate(counts, start=1):
        profile = site_profile(SEED, index, size=SIZE)
        data_dir = root / profile.site_id / "data"
        ids = []
        for j in range(count):
            subject = generate_subject(
                SEED, index, j, modalities=WRITTEN_MODALITIES, size=SIZE, profile=profile
            )
            writer = write_dicom_subject if fmt == "dicom" else write_nifti_subject
            writer(subject, data_dir / subject.patient_id)
            ids.append(subject.patient_id)
        sites.append(WrittenSite(data_dir=data_dir, subjects=tuple(ids), shape=profile.shape))
    return sites


@pytest.fixture(scope="module")
def nifti_sites(tmp_path_factory: pytest.TempPathFactory) -> list[WrittenSite]:
    return _write_sites(tmp_path_factory.mktemp("nifti"), "nifti", [2, 1])


@pytest.fixture(scope="module")
def dicom_sites(tmp_path_factory: pytest.TempPathFactory) -> list[WrittenSite]:
    return _write_sites(tmp_path_factory.mktemp("dicom"), "dicom", [1, 1])


def _nii(path: Path) -> nib.Nifti1Image:
    img = nib.load(path)
    assert isinstance(img, nib.Nifti1Image), path
    return img


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


def test_nifti_layout_values_and_geometry(nifti_sites: list[WrittenSite]) -> None:
    site = nifti_sites[0]
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
    nifti_sites: list[WrittenSite], dicom_sites: list[WrittenSite]
) -> None:
    for site_n, site_d in zip(nifti_sites, dicom_sites, strict=True):
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
    nifti_sites: list[WrittenSite], dicom_sites: list[WrittenSite]
) -> None:
    from agent.data.dicom import read_dicom_series

    pid = dicom_sites[1].subjects[0]
    ref = _nii(nifti_sites[1].data_dir / pid / "flair.nii.gz")
    volume = read_dicom_series(dicom_sites[1].data_dir / pid / "flair")
    assert np.array_equal(volume.array, ref.get_fdata(dtype=np.float32))
    assert np.allclose(volume.affine, ref.affine, atol=1e-4)
    assert volume.patient_id == pid and volume.modality == "MR"


def test_dicom_headers_are_a_realistic_series_with_made_up_identity(dicom_sites: list[WrittenSite]) -> None:
    site = dicom_sites[0]
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


def test_library_errors_name_the_argument() -> None:
    with pytest.raises(SyntheticDataError, match="seed must be a non-negative integer"):
        generate_subject(-1, 1, 0)
    with pytest.raises(SyntheticDataError, match="site index must be from 1"):
        site_profile(0, 0)
