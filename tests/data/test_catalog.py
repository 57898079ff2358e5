"""The dataset catalog: discovery by pattern, label maps, incremental re-scans, splits, privacy."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from agent.data import catalog
from agent.data.catalog import (
    assign_splits,
    compile_pattern,
    dataset_items,
    dataset_summaries,
    scan_datasets,
    subject_key_for,
)
from agent.data.models import CatalogFile, CatalogItem
from agent.db.base import Base
from agent.db.engine import Database, open_database
from agent.errors import CatalogError, UnknownDataset
from tests.fixtures.catalog import (
    SECRET,
    make_config,
    make_nifti_dataset,
    nifti_dataset_config,
    subject_arrays,
    write_nifti,
)

SUBJECTS = [f"PAT-{n:04d}" for n in (1201, 3402, 5603, 7804, 9005, 2306)]


class Recorder:
    """An AuditSink that keeps what it was given."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def append(self, action: str, *, actor: str, details: dict[str, Any]) -> int:
        self.events.append((action, actor, details))
        return len(self.events)


class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def counters(monkeypatch: pytest.MonkeyPatch) -> dict[str, Counter]:
    reads = Counter(catalog.read_nifti_volume)
    hashes = Counter(catalog._sha256_file)
    monkeypatch.setattr(catalog, "read_nifti_volume", reads)
    monkeypatch.setattr(catalog, "_sha256_file", hashes)
    return {"reads": reads, "hashes": hashes}


def _db(cfg: Any) -> Database:
    return open_database(cfg.db_url)


def _dump(db: Database) -> str:
    """Every column of every row of every table, as text."""
    out = []
    with db.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for row in conn.execute(table.select()):
                out.append(repr(tuple(row)))
    return "\n".join(out)


def test_multi_modality_discovery_and_missing_modality_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS, modalities=("flair", "t1"))
    (root / SUBJECTS[1] / "t1.nii.gz").unlink()
    (root / SUBJECTS[2] / "seg.nii.gz").unlink()
    (root / ".hidden").mkdir()
    write_nifti(root / ".hidden" / "flair.nii.gz", np.ones((4, 4, 4), np.float32))
    (root / "README.txt").write_text("not a subject")
    cfg = make_config(tmp_path, [nifti_dataset_config(root, modalities=["flair", "t1"])])
    db = _db(cfg)
    audit = Recorder()

    report = scan_datasets(cfg, db, audit=audit)

    skipped = {s.subject: s.reason for s in report.skipped}
    assert set(skipped) == {SUBJECTS[1], SUBJECTS[2]}
    assert "missing modality 't1'" in skipped[SUBJECTS[1]]
    assert "label mask missing" in skipped[SUBJECTS[2]]
    items = dataset_items(db, "brain")
    assert len(items) == 4
    secret = SECRET.encode()
    expected_keys = {subject_key_for(secret, s) for s in SUBJECTS if s not in skipped}
    assert {i.subject_key for i in items} == expected_keys
    for item in items:
        assert list(item.images) == ["flair", "t1"]
        assert all(p.is_file() and p.parent == item.label.parent for p in item.images.values())  # type: ignore[union-attr]
        assert item.fmt == "nifti" and item.target_labels == (1, 2, 4)
    (summary,) = dataset_summaries(db)
    assert (summary.num_subjects, summary.num_skipped) == (4, 2)
    assert summary.num_train + summary.num_val == 4
    # The fixture stores LPS-like data: RAS shape and spacing are the same axes, in mm.
    assert summary.shape_min == summary.shape_max == [24, 24, 12]
    assert summary.spacing_min == [1.0, 1.0, 2.0]
    assert summary.public() == {
        "name": "brain",
        "format": "nifti",
        "num_train": summary.num_train,
        "num_val": summary.num_val,
        "num_excluded": 0,
        "modalities": ["flair", "t1"],
        "problems": [],
    }
    # Audit: names and counts only, never a subject folder or a reason naming a file.
    ((action, actor, details),) = audit.events
    assert action == "data.scanned" and actor == "system"
    assert details["datasets"][0]["skipped"] == 2 and details["datasets"][0]["items"] == 4
    assert "PAT-" not in json.dumps(details) and str(root) not in json.dumps(details)


def test_patterns_with_repeated_subject_and_flat_layout(tmp_path: Path) -> None:
    pat = compile_pattern("{subject}/{subject}_flair.nii.gz")
    assert pat.glob == "*/*_flair.nii.gz"
    assert pat.regex.fullmatch("BraTS_001/BraTS_001_flair.nii.gz") is not None
    assert pat.regex.fullmatch("BraTS_001/BraTS_002_flair.nii.gz") is None

    root = tmp_path / "flat"
    image, label = subject_arrays(7)
    for s in ("case-a", "case-b"):
        write_nifti(root / f"{s}_flair.nii.gz", image)
        write_nifti(root / "labels" / f"{s}.nii.gz", label)
    ds = nifti_dataset_config(root, images="{subject}_{modality}.nii.gz", label="labels/{subject}.nii.gz")
    cfg = make_config(tmp_path, [ds])
    db = _db(cfg)
    report = scan_datasets(cfg, db)
    assert report.skipped == []
    assert sorted(i.label.name for i in dataset_items(db, "brain")) == ["case-a.nii.gz", "case-b.nii.gz"]  # type: ignore[union-attr]


def test_bad_patterns_are_named(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS[:2])
    cfg = make_config(tmp_path, [nifti_dataset_config(root, images="{subject}/{modality}_{visit}.nii.gz")])
    with pytest.raises(CatalogError, match=r"unknown placeholder \{visit\}"):
        scan_datasets(cfg, _db(cfg))
    cfg = make_config(
        tmp_path, [nifti_dataset_config(root, modalities=["flair", "t1"], images="{subject}/x.nii.gz")]
    )
    with pytest.raises(CatalogError, match="has no \\{modality\\}"):
        scan_datasets(cfg, _db(cfg))


def test_label_map_to_target_fraction(tmp_path: Path) -> None:
    root = tmp_path / "data"
    seeds = make_nifti_dataset(root, SUBJECTS[:3])
    for targets in ([1, 2, 4], [1]):
        cfg = make_config(tmp_path, [nifti_dataset_config(root, target_labels=targets)])
        db = _db(cfg)
        scan_datasets(cfg, db)
        with db.session() as s:
            rows = {r.subject_key: r.label_fraction for r in s.scalars(select(CatalogItem))}
        for subject, seed in seeds.items():
            _, label = subject_arrays(seed)
            expected = float(np.isin(label, targets).mean())
            assert rows[subject_key_for(SECRET.encode(), subject)] == pytest.approx(expected)
        assert {i.target_labels for i in dataset_items(db, "brain")} == {tuple(targets)}


def test_incremental_rescan_reads_only_changed_files(tmp_path: Path, counters: dict[str, Counter]) -> None:
    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS[:4], modalities=("flair", "t1"))
    cfg = make_config(tmp_path, [nifti_dataset_config(root, modalities=["flair", "t1"])])
    db = _db(cfg)
    reads, hashes = counters["reads"], counters["hashes"]

    first = scan_datasets(cfg, db).datasets[0]
    assert (reads.calls, hashes.calls) == (12, 12)  # 4 subjects x (2 modalities + label)
    assert (first.files_hashed, first.volumes_read, first.items_added) == (12, 12, 4)
    before = {i.subject_key: (i.checksum, i.split) for i in dataset_items(db, "brain")}

    second = scan_datasets(cfg, db).datasets[0]
    assert (reads.calls, hashes.calls) == (12, 12)  # nothing read again
    assert (second.files_unchanged, second.volumes_reused, second.items_added) == (12, 12, 0)
    assert {i.subject_key: (i.checksum, i.split) for i in dataset_items(db, "brain")} == before

    # Touched but identical: hashed again (mtime changed), not decoded again (same content).
    touched = root / SUBJECTS[0] / "flair.nii.gz"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    scan_datasets(cfg, db)
    assert (reads.calls, hashes.calls) == (12, 13)

    # New content: hashed and decoded, and the item's checksum changes.
    image, _ = subject_arrays(99)
    write_nifti(root / SUBJECTS[1] / "t1.nii.gz", image)
    scan_datasets(cfg, db)
    assert (reads.calls, hashes.calls) == (13, 14)
    after = {i.subject_key: i.checksum for i in dataset_items(db, "brain")}
    changed = subject_key_for(SECRET.encode(), SUBJECTS[1])
    assert after[changed] != before[changed][0]
    assert all(after[k] == before[k][0] for k in after if k != changed)


def test_removed_files_and_subjects_leave_the_catalog(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS, modalities=("flair", "t1"))
    cfg = make_config(tmp_path, [nifti_dataset_config(root, modalities=["flair", "t1"])])
    db = _db(cfg)
    scan_datasets(cfg, db)
    shutil.rmtree(root / SUBJECTS[0])
    (root / SUBJECTS[1] / "t1.nii.gz").unlink()

    report = scan_datasets(cfg, db)

    assert report.datasets[0].items_removed == 2
    keys = {i.subject_key for i in dataset_items(db, "brain")}
    secret = SECRET.encode()
    assert keys == {subject_key_for(secret, s) for s in SUBJECTS[2:]}
    with db.session() as s:
        # Per-file state of removed files is gone too; the incomplete subject is skipped before
        # any of its files is read, so only the four complete subjects' files remain.
        assert s.scalar(select(func.count()).select_from(CatalogFile)) == 4 * 3
    (summary,) = dataset_summaries(db)
    assert summary.num_subjects == 4 and summary.num_skipped == 1

    # A dataset dropped from the config leaves the catalog entirely.
    other = tmp_path / "other"
    make_nifti_dataset(other, SUBJECTS[:2])
    cfg2 = make_config(tmp_path, [nifti_dataset_config(other, name="other")])
    report = scan_datasets(cfg2, db)
    assert report.removed_datasets == ["brain"]
    assert [s.name for s in dataset_summaries(db)] == ["other"]
    with pytest.raises(UnknownDataset, match="'brain' is not in the catalog"):
        dataset_items(db, "brain")


def test_missing_root_keeps_the_catalog(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS[:3])
    cfg = make_config(tmp_path, [nifti_dataset_config(root)])
    db = _db(cfg)
    scan_datasets(cfg, db)
    root.rename(tmp_path / "unmounted")
    report = scan_datasets(cfg, db)
    assert not report.ok and "folder does not exist" in (report.datasets[0].error or "")
    assert len(dataset_items(db, "brain")) == 3


def test_broken_file_skips_subject_and_scan_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS[:4])
    broken = root / SUBJECTS[2] / "flair.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated gzip
    cfg = make_config(tmp_path, [nifti_dataset_config(root)])
    db = _db(cfg)
    audit = Recorder()
    report = scan_datasets(cfg, db, audit=audit, actor="cli:test")
    (sk,) = report.skipped
    assert sk.subject == SUBJECTS[2] and "flair.nii.gz" in sk.reason
    assert len(dataset_items(db, "brain")) == 3
    details = audit.events[0][2]
    assert details["datasets"][0]["skipped"] == 1
    assert "flair" not in json.dumps(details)


def test_splits_are_stable_disjoint_and_never_empty(tmp_path: Path) -> None:
    keys = [f"{n:032x}" for n in range(40)]
    base = assign_splits("brain", keys[:30], 0.3)
    grown = assign_splits("brain", keys, 0.3)
    shrunk = assign_splits("brain", keys[10:30], 0.3)
    assert all(grown[k] == base[k] for k in base)
    assert all(shrunk[k] == base[k] for k in shrunk)
    assert 3 <= sum(v == "val" for v in base.values()) <= 18
    # Another dataset splits the same subjects differently (the dataset name is in the hash).
    assert assign_splits("other", keys, 0.3) != grown
    # Tiny datasets still get one validation and one training subject.
    assert sorted(assign_splits("brain", keys[:2], 0.01).values()) == ["train", "val"]
    assert sorted(assign_splits("brain", keys[:2], 0.99).values()) == ["train", "val"]
    assert list(assign_splits("brain", keys[:1], 0.5).values()) == ["train"]
    # Validation never takes more than half of a small dataset (the hash alone often would).
    for n in (3, 4, 5, 6):
        counts = {
            sum(v == "val" for v in assign_splits(f"ds{d}", keys[:n], 0.25).values()) for d in range(200)
        }
        assert min(counts) == 1 and max(counts) == n // 2
    assert set(assign_splits("brain", keys, 0.0).values()) == {"train"}

    # End to end: adding and removing subjects on disk keeps everyone else's split.
    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS[:5])
    cfg = make_config(tmp_path, [nifti_dataset_config(root, val_fraction=0.4)])
    db = _db(cfg)
    scan_datasets(cfg, db)
    first = {i.subject_key: i.split for i in dataset_items(db, "brain")}
    train = {i.subject_key for i in dataset_items(db, "brain", "train")}
    val = {i.subject_key for i in dataset_items(db, "brain", "val")}
    assert train and val and not train & val and train | val == set(first)
    shutil.rmtree(root / SUBJECTS[0])
    make_nifti_dataset(tmp_path / "more", ["PAT-8888", "PAT-9999"])
    for s in ("PAT-8888", "PAT-9999"):
        shutil.copytree(tmp_path / "more" / s, root / s)
    scan_datasets(cfg, db)
    second = {i.subject_key: i.split for i in dataset_items(db, "brain")}
    assert len(second) == 6
    assert all(second[k] == first[k] for k in second if k in first)


def test_new_secret_rekeys_everything(tmp_path: Path, counters: dict[str, Counter]) -> None:
    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS[:3])
    cfg = make_config(tmp_path, [nifti_dataset_config(root)])
    db = _db(cfg)
    scan_datasets(cfg, db)
    old = {i.subject_key for i in dataset_items(db, "brain")}
    cfg2 = make_config(tmp_path, [nifti_dataset_config(root)], secret="another-secret")
    scan_datasets(cfg2, db)
    new = {i.subject_key for i in dataset_items(db, "brain")}
    assert not old & new
    assert counters["hashes"].calls == 12  # the file state of the old key was not trusted


def test_no_patient_identity_in_the_database_nifti(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS)
    cfg = make_config(tmp_path, [nifti_dataset_config(root)])
    db = _db(cfg)
    scan_datasets(cfg, db)
    dump = _dump(db)
    assert len(dump) > 1000  # rows were dumped
    for subject in SUBJECTS:
        assert subject not in dump
    # Paths are still available to training, from the encrypted catalog.
    assert {p.parent.name for i in dataset_items(db, "brain") for p in i.images.values()} == set(SUBJECTS)
    # Without the key file the paths cannot be recovered, and the error says what to do.
    (cfg.work_dir / "catalog.key").write_bytes(b"not a key")
    with pytest.raises(CatalogError, match="catalog key file"):
        dataset_items(db, "brain")


def test_no_patient_identity_in_the_database_dicom(tmp_path: Path) -> None:
    from agent.audit.chain import AuditLog
    from agent.config import load_config
    from agent.data.synthetic.identities import patient_identity
    from coordinator.demo_federation import generate_federation

    layout = generate_federation(
        tmp_path / "fed", sites=1, subjects_per_site=[3], fmt="dicom", size=32, seed=5
    )
    cfg = load_config(layout.sites[0].config_path)
    db = _db(cfg)
    report = scan_datasets(cfg, db, audit=AuditLog(db))
    assert report.skipped == [] and report.datasets[0].num_items == 3
    identities = [patient_identity(5, 1, n) for n in range(3)]
    # The subject key is the keyed hash of the DICOM PatientID.
    secret = cfg.site_secret()
    assert {i.subject_key for i in dataset_items(db, "brain")} == {
        subject_key_for(secret, ident.patient_id) for ident in identities
    }
    dump = _dump(db)
    assert "data.scanned" in dump
    for ident in identities:
        family, given = ident.name.split("^")
        for value in (ident.patient_id, family, given, ident.birth_date, ident.accession, ident.institution):
            assert value not in dump, value
    with db.session() as s:
        for row in s.scalars(select(CatalogItem)):
            assert row.fmt == "dicom" and row.label_fraction is not None and row.label_fraction > 0


def test_cli_scan_and_list(tmp_path: Path) -> None:
    from agent.cli import app

    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS[:3])
    (tmp_path / "config.yaml").write_text(
        "site: {id: site-cli, secret: s3cret}\n"
        "work_dir: work\n"
        "datasets:\n"
        "  - {name: brain, format: nifti, root: data, modalities: [flair], target_labels: [1, 2, 4]}\n"
    )
    runner = CliRunner()
    res = runner.invoke(app, ["data", "scan", "--config", str(tmp_path / "config.yaml"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "brain" in res.output and "3 added" in res.output
    res = runner.invoke(app, ["data", "list", "--config", str(tmp_path / "config.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    (ds,) = data["datasets"]
    assert ds["num_subjects"] == 3 and len(ds["items"]) == 3
    item = ds["items"][0]
    assert set(item) >= {"subject_key", "split", "shape", "spacing", "label_fraction"}
    assert item["shape"] == [24, 24, 12] and 0 < item["label_fraction"] < 1
    res = runner.invoke(app, ["data", "list", "--config", str(tmp_path / "config.yaml")])
    assert res.exit_code == 0 and "train" in res.output
    res = runner.invoke(app, ["data", "list", "--config", str(tmp_path / "config.yaml"), "--dataset", "nope"])
    assert res.exit_code == 1
    res = runner.invoke(app, ["data", "scan", "--config", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2


def test_dicom_subject_with_zero_pixel_spacing_is_scanned_not_crashed(tmp_path: Path) -> None:
    from tests.fixtures.dicom import write_projection, write_series

    root = tmp_path / "data"
    write_projection(root / "A", n_images=1, pixel_spacing=(0.0, 0.0))
    write_series(root / "B", n_slices=4, seed=41)
    ds = nifti_dataset_config(root, format="dicom", images="{subject}", label=None, modalities=["xr"])
    cfg = make_config(tmp_path, [ds])
    db = _db(cfg)
    report = scan_datasets(cfg, db)
    assert report.ok and report.skipped == []
    rows = {row["images"]["xr"]: row for row in catalog.item_details(db, "brain")}
    assert set(rows) == {str(root / "A"), str(root / "B")}
    assert rows[str(root / "A")]["spacing"][:2] == [1.0, 1.0]
    # Catalogued with its warning, but an assumed spacing is untrusted geometry: not trained on by default.
    assert rows[str(root / "A")]["split"] == "excluded"
    assert {w["category"] for w in rows[str(root / "A")]["warnings"]} == {"geometry"}
    assert [Path(i.images["xr"]).name for i in dataset_items(db, "brain")] == ["B"]


def test_non_finite_voxels_skip_the_subject_at_scan_with_its_name(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS[:4])
    for subject, bad in ((SUBJECTS[1], np.nan), (SUBJECTS[3], -np.inf)):
        image, _ = subject_arrays(7)
        image[3, 4, 5] = bad
        write_nifti(root / subject / "flair.nii.gz", image)
    cfg = make_config(tmp_path, [nifti_dataset_config(root)])
    db = _db(cfg)
    report = scan_datasets(cfg, db)
    skipped = {s.subject: s.reason for s in report.skipped}
    assert set(skipped) == {SUBJECTS[1], SUBJECTS[3]}
    for reason in skipped.values():
        assert "flair.nii.gz" in reason and "1 of" in reason and "not finite" in reason
    assert len(dataset_items(db, "brain")) == 2


def test_non_finite_dicom_float_pixels_skip_the_subject(tmp_path: Path) -> None:
    from tests.fixtures.dicom import write_float_series

    root = tmp_path / "data"
    values = np.random.default_rng(36).random((6, 5, 3)).astype(np.float32)
    write_float_series(root / "good", values)
    values[2, 2, 2] = np.nan
    write_float_series(root / "bad", values)
    ds = nifti_dataset_config(root, format="dicom", images="{subject}", label=None, modalities=["map"])
    cfg = make_config(tmp_path, [ds])
    db = _db(cfg)
    report = scan_datasets(cfg, db)
    ((sk),) = report.skipped
    assert sk.subject == "bad" and "not finite" in sk.reason
    assert len(dataset_items(db, "brain")) == 1


def test_volumes_stored_before_the_non_finite_check_are_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS[:3])
    image, _ = subject_arrays(8)
    image[1, 1, 1] = np.nan
    write_nifti(root / SUBJECTS[0] / "flair.nii.gz", image)
    cfg = make_config(tmp_path, [nifti_dataset_config(root)])
    db = _db(cfg)
    # A catalog written by an agent whose scan did not check: the NaN volume's facts are stored.
    monkeypatch.setattr(catalog, "count_nonfinite", lambda array: 0)
    monkeypatch.setattr(catalog, "VOLUME_CHECKS", 1)
    assert scan_datasets(cfg, db).skipped == []
    monkeypatch.undo()
    report = scan_datasets(cfg, db)
    assert [s.subject for s in report.skipped] == [SUBJECTS[0]]
    assert report.datasets[0].volumes_reused == 0
    # Once scanned with the current checks, unchanged volumes are reused again.
    again = scan_datasets(cfg, db)
    assert again.datasets[0].volumes_read == 1 and again.datasets[0].volumes_reused >= 4


def test_a_subject_whose_file_does_not_match_the_pattern_is_listed_as_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS[:3])
    image, label = subject_arrays(9)
    write_nifti(root / "PAT-0042" / "FLAIR.nii.gz", image)  # another case
    write_nifti(root / "PAT-0042" / "seg.nii.gz", label)
    write_nifti(root / "PAT-0043" / "flair.nii", image)  # another extension
    (root / "PAT-0044").mkdir()  # nothing in it yet
    (root / "README.txt").write_text("a file, not a subject folder")
    write_nifti(root / ".trash" / "flair.nii.gz", image)  # hidden: ignored as in discovery
    cfg = make_config(tmp_path, [nifti_dataset_config(root)])
    db = _db(cfg)
    report = scan_datasets(cfg, db)
    skipped = {s.subject: s.reason for s in report.skipped}
    assert set(skipped) == {"PAT-0042", "PAT-0043", "PAT-0044"}
    for subject, reason in skipped.items():
        assert (
            reason
            == f"{subject}/: no file in it matches the images pattern '{{subject}}/{{modality}}.nii.gz'"
        )
    assert len(dataset_items(db, "brain")) == 3
    assert report.datasets[0].num_skipped == 3
    (summary,) = dataset_summaries(db)
    assert summary.num_skipped == 3


def test_repeated_subject_that_differs_is_listed_as_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    image, label = subject_arrays(10)
    write_nifti(root / "sub-01" / "sub-01_flair.nii.gz", image)
    write_nifti(root / "sub-01" / "sub-01_seg.nii.gz", label)
    write_nifti(root / "sub-02" / "sub-2_flair.nii.gz", image)  # the {subject} parts differ
    write_nifti(root / "sub-02" / "sub-2_seg.nii.gz", label)
    ds = nifti_dataset_config(
        root, images="{subject}/{subject}_{modality}.nii.gz", label="{subject}/{subject}_seg.nii.gz"
    )
    cfg = make_config(tmp_path, [ds])
    db = _db(cfg)
    report = scan_datasets(cfg, db)
    (sk,) = report.skipped
    assert sk.subject == "sub-02" and "matches the images pattern" in sk.reason
    assert len(dataset_items(db, "brain")) == 1


def test_flat_layout_lists_misnamed_images_but_not_other_files(tmp_path: Path) -> None:
    root = tmp_path / "data"
    image, label = subject_arrays(11)
    for subject in ("case1", "case_2"):
        write_nifti(root / "images" / f"{subject}_flair.nii.gz", image)
        write_nifti(root / "images" / f"{subject}_seg.nii.gz", label)
        write_nifti(root / "images" / f"{subject}_t1.nii.gz", image)  # a modality the dataset does not use
    write_nifti(root / "images" / "case3_FLAIR.nii.gz", image)  # another case
    write_nifti(root / "images" / "case4_flair.nii", image)  # another extension
    write_nifti(root / "images" / "case5.nii.gz", image)  # another name altogether
    (root / "images" / "participants.tsv").write_text("id\n")
    ds = nifti_dataset_config(
        root, images="images/{subject}_flair.nii.gz", label="images/{subject}_seg.nii.gz"
    )
    cfg = make_config(tmp_path, [ds])
    db = _db(cfg)
    report = scan_datasets(cfg, db)
    skipped = {s.subject: s.reason for s in report.skipped}
    tail = " does not match the images pattern 'images/{subject}_flair.nii.gz'"
    assert skipped == {
        "case3": "images/case3_FLAIR.nii.gz" + tail,
        "case4": "images/case4_flair.nii" + tail,
        "case5": "images/case5.nii.gz" + tail,
    }
    assert len(dataset_items(db, "brain")) == 2


def test_cli_scan_prints_the_unmatched_subject(tmp_path: Path) -> None:
    from agent.cli import app

    root = tmp_path / "data"
    make_nifti_dataset(root, SUBJECTS[:2])
    write_nifti(root / "PAT-0099" / "Flair.nii.gz", subject_arrays(12)[0])
    (tmp_path / "config.yaml").write_text(
        "site: {id: site-cli, secret: s3cret}\n"
        "work_dir: work\n"
        "datasets:\n"
        "  - {name: brain, format: nifti, root: data, modalities: [flair], target_labels: [1, 2, 4]}\n"
    )
    res = CliRunner().invoke(
        app, ["data", "scan", "--config", str(tmp_path / "config.yaml"), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    printed = " ".join(res.output.split())  # the console may wrap long lines
    assert "skipped brain/PAT-0099: PAT-0099/: no file in it matches the images pattern" in printed
