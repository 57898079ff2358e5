"""The dataset catalog: what each configured dataset holds, indexed in the agent's database.

`scan_datasets` walks every dataset of the config, finds its subjects through the config's
`images` pattern, reads each volume once to learn its shape, spacing and (for masks) label
values, and stores one item per subject with its local paths, a content checksum and a
pseudonymous subject key. Training and the API read the catalog, never the folders.

Why it is built this way:

- Privacy: a subject is known by HMAC-SHA256(site secret, patient ID), never by the ID; the
  per-file scan state is keyed by a keyed hash of the relative path. DICOM header values are
  read only to make that key and are never stored. Item paths (which name subject folders,
  often by patient ID) are stored encrypted with a key file in the work directory, so the
  database alone holds no patient identity.
- Re-scans are incremental: a file whose size and mtime are unchanged is not read again (its
  stored SHA-256 is reused), and a volume whose content checksum is unchanged is not decoded
  again (its stored shape, spacing and label counts are reused).
- Splits are per subject and a pure function of (dataset, subject key, fraction), so adding or
  removing other subjects never moves a subject between train and validation (the only
  exception: the rule that a dataset of two or more subjects has at least one of each).
- A subject with a missing or broken file is skipped with a reason; the scan goes on. So is
  one whose file is there but does not match the `images` pattern (another case, another
  extension), and one whose volume holds non-finite voxels: nothing leaves silently.
- Files the agent's uid cannot read are counted as unreadable, with the uid and the fix
  (`agent.fsaccess`), and reported per dataset as problems (`DatasetSummary.problems`, in
  /v1/info): a permission problem must never look like an empty dataset.
- A scan that would drop more than half of a dataset's subjects (a mistyped or unmounted data
  path, an emptied share) keeps the old catalog and says why, unless `allow_shrink` is given.
- Volume warnings are kept per subject with their category (`VolumeWarning`). A subject with a
  warning whose category is in the dataset's `exclude_warnings` (default: untrusted geometry)
  stays in the catalog with split "excluded": the admin sees it and why, /v1/info counts it, and
  `dataset_items` (what training and evaluation read) never returns it.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
from cryptography.fernet import Fernet, InvalidToken
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from sqlalchemy import delete, insert, select

from agent.audit.sink import AuditSink
from agent.config import AgentConfig, DatasetConfig, WarningCategory
from agent.data.models import CatalogDataset, CatalogFile, CatalogItem, CatalogVolume
from agent.data.volume import Volume, count_nonfinite, pair_image, read_nifti_volume, warning_category
from agent.db.engine import Database
from agent.errors import CatalogError, FedsiteError, UnknownDataset
from agent.fsaccess import check_tree, fix_command

Split = Literal["train", "val"]
Fmt = Literal["nifti", "dicom"]

# A label file with more distinct values than this is an image, not a label map.
MAX_LABEL_VALUES = 1000
_HASH_CHUNK = 1 << 20
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
PATH_KEY_FILE = "catalog.key"
# Version of the checks a volume passes before its facts are stored (2: non-finite voxels refused;
# 3: warnings recorded with their category). Volume facts stored by a scan with older checks are not
# reused: those volumes are read again once.
VOLUME_CHECKS = 3
EXCLUDED: Literal["excluded"] = "excluded"
# A scan that would remove more than this share of a dataset's subjects keeps the catalog as it was
# unless told otherwise (`allow_shrink`): losing most of a dataset is far more often a path that
# points at the wrong (empty) folder than data that was really withdrawn.
MAX_SHRINK_FRACTION = 0.5


@dataclass(frozen=True)
class ItemRef:
    """What training needs to load one subject; local to the site, never sent anywhere."""

    dataset: str
    subject_key: str
    split: Split
    images: dict[str, Path]
    label: Path | None
    fmt: Fmt
    checksum: str
    target_labels: tuple[int, ...]
    # The volume to take from a 4D image (the dataset's `volume_index`); None: 4D is refused.
    volume_index: int | None = None


@dataclass(frozen=True)
class DatasetSummary:
    """Aggregate statistics of one scanned dataset; `public()` is what may leave the site."""

    name: str
    format: str
    modalities: list[str]
    num_subjects: int
    num_items: int
    num_train: int
    num_val: int
    num_skipped: int
    num_excluded: int
    shape_min: list[int] | None
    shape_max: list[int] | None
    spacing_min: list[float] | None
    spacing_max: list[float] | None
    mean_label_fraction: float | None
    scanned_at: datetime
    # Subjects skipped because the agent's uid (`unreadable_uid`) could not read their files.
    num_unreadable: int = 0
    unreadable_uid: int | None = None

    def problems(self) -> list[str]:
        """Why the dataset gives training less than it holds, in words without any path or subject
        name (they go to /v1/info and the log): unreadable files, nothing found, all excluded."""
        out: list[str] = []
        if self.num_unreadable:
            out.append(f"{self.num_unreadable} subject(s) unreadable by uid {self.unreadable_uid}")
        usable = self.num_train + self.num_val
        if self.num_items == 0 and self.num_skipped == 0:
            out.append("no subjects found")
        elif self.num_items == 0 and self.num_skipped > self.num_unreadable:
            out.append(f"no usable subjects ({self.num_skipped} skipped)")
        elif self.num_items > 0 and usable == 0:
            out.append(f"all {self.num_items} subject(s) excluded by volume warnings")
        return out

    def public(self) -> dict[str, Any]:
        """The fields /v1/info reports: counts and names only (excluded subjects as a number, never
        which ones or why: the warnings stay with the local admin)."""
        return {
            "name": self.name,
            "format": self.format,
            "num_train": self.num_train,
            "num_val": self.num_val,
            "num_excluded": self.num_excluded,
            "modalities": list(self.modalities),
            "problems": self.problems(),
        }


@dataclass(frozen=True)
class SkippedSubject:
    """A subject left out of the catalog. `subject` is the local folder name: for the local
    admin only, never for the API or the audit log."""

    dataset: str
    subject: str
    reason: str


@dataclass(frozen=True)
class WarnedSubject:
    """A catalogued subject whose volumes carry warnings. `subject` is the local folder name: for
    the local admin only, never for the API or the audit log."""

    dataset: str
    subject: str
    excluded: bool
    # [{"source": modality or "label", "category": ..., "message": ...}]
    warnings: list[dict[str, str]]


@dataclass
class DatasetScan:
    """What one dataset's scan found and how much work it took."""

    name: str
    num_items: int = 0
    num_subjects: int = 0
    num_train: int = 0
    num_val: int = 0
    num_skipped: int = 0
    num_excluded: int = 0
    items_added: int = 0
    items_removed: int = 0
    files_hashed: int = 0
    files_unchanged: int = 0
    volumes_read: int = 0
    volumes_reused: int = 0
    num_unreadable: int = 0
    # Why the dataset could not be scanned, for the local admin (may name paths)...
    error: str | None = None
    # ...and the same without paths, for /v1/info and the log.
    problem: str | None = None


@dataclass
class ScanReport:
    datasets: list[DatasetScan] = field(default_factory=list)
    skipped: list[SkippedSubject] = field(default_factory=list)
    warned: list[WarnedSubject] = field(default_factory=list)
    removed_datasets: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False when a dataset could not be scanned at all (its catalog was left as it was)."""
        return all(d.error is None for d in self.datasets)

    def audit_details(self) -> dict[str, Any]:
        """Names and counts only: no paths, no subject names, no reasons (they name files)."""
        return {
            "datasets": [
                {
                    "name": d.name,
                    "items": d.num_items,
                    "subjects": d.num_subjects,
                    "train": d.num_train,
                    "val": d.num_val,
                    "skipped": d.num_skipped,
                    "excluded": d.num_excluded,
                    "added": d.items_added,
                    "removed": d.items_removed,
                    "failed": d.error is not None,
                }
                for d in self.datasets
            ],
            "removed_datasets": list(self.removed_datasets),
        }


# ----------------------------------------------------------------------------- keys and hashes


def keyed_hash(secret: bytes, value: str) -> str:
    """HMAC-SHA256 of `value` with the site secret, as 32 hex digits (128 bits)."""
    return hmac.new(secret, value.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def subject_key_for(secret: bytes, patient_id: str) -> str:
    """The pseudonymous key of a patient; the same patient gets the same key in every dataset."""
    return keyed_hash(secret, "subject:" + patient_id.strip())


def _key_id(secret: bytes) -> str:
    return keyed_hash(secret, "fedsite-catalog-key-id")


def _path_key(secret: bytes, rel: str) -> str:
    return keyed_hash(secret, "path:" + rel)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def path_key_file(cfg: AgentConfig) -> Path:
    return cfg.work_dir / PATH_KEY_FILE


def _ensure_path_key(path: Path) -> None:
    """Create the path-encryption key file once (0600); concurrent creators agree on one key."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(Fernet.generate_key())
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)  # atomic, and fails if another process made the key first
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _path_cipher(path: Path) -> Fernet:
    try:
        return Fernet(path.read_bytes().strip())
    except (OSError, ValueError) as exc:
        raise CatalogError(
            f"catalog key file {path} cannot be used ({exc}); run `fedsite data scan` to rebuild the catalog"
        ) from None


def _encrypt(cipher: Fernet, path: Path) -> str:
    return cipher.encrypt(str(path).encode("utf-8")).decode("ascii")


def _decrypt(cipher: Fernet, token: str, key_file: str) -> Path:
    try:
        return Path(cipher.decrypt(token.encode("ascii")).decode("utf-8"))
    except InvalidToken:
        raise CatalogError(
            f"catalog paths do not decrypt with the key in {key_file} (was the file replaced?); "
            "run `fedsite data scan` to rebuild the catalog"
        ) from None


def _unit_interval(dataset: str, subject_key: str) -> float:
    digest = hashlib.sha256(f"split\0{dataset}\0{subject_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(dataset: str, subject_keys: Iterable[str], val_fraction: float) -> dict[str, Split]:
    """Train/validation split per subject key.

    A subject is in validation when a hash of (dataset, key) falls below `val_fraction`, so its
    split does not depend on the other subjects. Small datasets are where chance hurts, so three
    corrections apply, each moving the fewest subjects in hash order: with two or more subjects
    and a fraction above zero, at least one subject is in validation; validation never holds more
    than half the subjects (or the requested fraction, rounded up, if that is more), so training
    always keeps at least as many; and a dataset of one subject trains on it. On large datasets
    the corrections practically never apply, and adding or removing subjects moves no one else.
    """
    keys = sorted(set(subject_keys))
    n = len(keys)
    u = {k: _unit_interval(dataset, k) for k in keys}
    by_hash = sorted(keys, key=lambda k: u[k])
    splits: dict[str, Split] = {k: ("val" if u[k] < val_fraction else "train") for k in keys}
    if n == 1:
        # One subject cannot be both trained on and validated on; training needs it more.
        splits[keys[0]] = "train"
    elif n >= 2 and val_fraction > 0:
        val = [k for k in by_hash if splits[k] == "val"]
        cap = max(1, math.ceil(n * val_fraction - 1e-9), n // 2)
        cap = min(cap, n - 1)
        for k in val[cap:]:
            splits[k] = "train"
        if not val:
            splits[by_hash[0]] = "val"
    return splits


# ----------------------------------------------------------------------------- pattern discovery


@dataclass(frozen=True)
class _Pattern:
    glob: str
    regex: re.Pattern[str]


def _check_placeholders(dataset: str, key: str, pattern: str, allowed: set[str]) -> None:
    for name in _PLACEHOLDER.findall(pattern):
        if name not in allowed:
            raise CatalogError(
                f"dataset {dataset!r}: {key} pattern {pattern!r} has an unknown placeholder {{{name}}}; "
                f"allowed: {', '.join('{' + a + '}' for a in sorted(allowed))}"
            )


def compile_pattern(pattern: str) -> _Pattern:
    """A glob (for listing) and a regex (to read `{subject}` back) for a pattern with `{subject}`.

    `{subject}` matches one path component (or part of one); a second `{subject}` must repeat
    the first, as in "{subject}/{subject}_flair.nii.gz".
    """
    parts = pattern.split("{subject}")
    glob_parts: list[str] = []
    regex = ""
    for i, part in enumerate(parts):
        glob_parts.append(re.sub(r"([*?\[])", r"[\1]", part))
        regex += re.escape(part)
        if i < len(parts) - 1:
            regex += "(?P<subject>[^/]+)" if i == 0 else "(?P=subject)"
    return _Pattern(glob="*".join(glob_parts), regex=re.compile(regex))


def discover_subjects(ds: DatasetConfig) -> dict[str, dict[str, Path]]:
    """Subject name -> {modality: path} for every path that matches the `images` pattern.

    A subject appears when at least one modality matches; a missing modality shows up as an
    absent key, so the caller can skip the subject with a reason. Names starting with "." are
    ignored (hidden files, partial downloads, macOS resource forks).
    """
    _check_placeholders(ds.name, "images", ds.images, {"subject", "modality"})
    if ds.label is not None:
        _check_placeholders(ds.name, "label", ds.label, {"subject"})
    if len(ds.modalities) > 1 and "{modality}" not in ds.images:
        raise CatalogError(
            f"dataset {ds.name!r}: images pattern {ds.images!r} has no {{modality}} but the dataset "
            f"lists {len(ds.modalities)} modalities"
        )
    if len(set(ds.modalities)) != len(ds.modalities):
        raise CatalogError(f"dataset {ds.name!r}: a modality is listed twice in {ds.modalities}")
    found: dict[str, dict[str, Path]] = {}
    for modality in ds.modalities:
        pat = compile_pattern(ds.images.replace("{modality}", modality))
        for path in ds.root.glob(pat.glob):
            rel = path.relative_to(ds.root).as_posix()
            m = pat.regex.fullmatch(rel)
            if m is None:
                continue
            subject = m.group("subject")
            if subject.startswith(".") or any(p.startswith(".") for p in Path(rel).parts):
                continue
            found.setdefault(subject, {})[modality] = path
    return dict(sorted(found.items()))


# File names that hold an image (a NIfTI file, an Analyze pair, a DICOM file, other volume formats):
# a file with one of these endings next to a dataset's images is a subject, even when misnamed.
_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".dcm", ".ima", ".mgz", ".nrrd", ".mha", ".mhd")


def _loose_component(component: str, *, greedy: bool) -> re.Pattern[str]:
    """One path component of a pattern with `{subject}` captured and `{modality}` as a wildcard,
    ignoring case, to be matched against names without their image suffix: it finds the subject
    of a name that is close to the pattern but not equal (another case, another extension)."""
    component = _strip_image_suffix(component)
    regex = ""
    for i, part in enumerate(component.split("{subject}")):
        if i == 1:
            regex += "(?P<subject>.+)" if greedy else "(?P<subject>.+?)"
        elif i > 1:
            regex += ".+?"
        regex += ".+?".join(re.escape(p) for p in part.split("{modality}"))
    return re.compile(regex, re.IGNORECASE)


def _strip_image_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(_IMAGE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def unmatched_subjects(
    ds: DatasetConfig, found: dict[str, dict[str, Path]], unreadable: set[str] | None = None
) -> dict[str, str]:
    """Subject name -> reason, for what sits where the `images` pattern looks but matches no pattern.

    `discover_subjects` knows only what matches; a subject whose file is misnamed (another case,
    another extension, a `{subject}` part that differs from the folder name) would drop out of the
    catalog without a word. This looks at the level of the pattern's first `{subject}` component:
    with a folder per subject, every folder there that is not a found subject; with files side by
    side, every image file there that matches neither the images nor the label pattern and whose
    name does not belong to a found subject. Hidden names are ignored, as in discovery. A subject
    folder this uid cannot list is reported as unreadable (with the fix), and its name is added to
    UNREADABLE when given: discovery's glob passes over such folders without a word.
    """
    strict = [compile_pattern(ds.images.replace("{modality}", m)).regex for m in ds.modalities]
    if ds.label is not None:
        strict.append(compile_pattern(ds.label).regex)
    component_parts = ds.images.split("/")
    level = next((n for n, part in enumerate(component_parts) if "{subject}" in part), None)
    if level is None:
        return {}
    loose = [_loose_component(component_parts[level], greedy=g) for g in (True, False)]
    per_subject_folder = level < len(component_parts) - 1
    out: dict[str, str] = {}
    parents = {
        ds.root.joinpath(*ds.images.replace("{modality}", m).split("/")[:level]) for m in ds.modalities
    }
    for parent in sorted(parents):
        # A folder this uid cannot list hides its subjects from discovery too; its subjects are
        # unknown, so nothing can be reported per subject (the doctor names the folder).
        if not parent.is_dir() or not os.access(parent, os.R_OK | os.X_OK):
            continue
        for entry in sorted(parent.iterdir()):
            name = entry.name
            if name.startswith("."):
                continue
            rel = entry.relative_to(ds.root).as_posix()
            stem = _strip_image_suffix(name)
            candidates = [m.group("subject") for m in (r.fullmatch(stem) for r in loose) if m is not None]
            if per_subject_folder:
                if not entry.is_dir() or not candidates or any(c in found for c in candidates):
                    continue
                if not os.access(entry, os.R_OK | os.X_OK):
                    out.setdefault(candidates[0], _unreadable_reason(entry, ds.root))
                    if unreadable is not None:
                        unreadable.add(candidates[0])
                    continue
                out.setdefault(
                    candidates[0], f"{rel}/: no file in it matches the images pattern {ds.images!r}"
                )
                continue
            if any(r.fullmatch(rel) for r in strict) or any(c in found for c in candidates):
                continue
            # Files side by side: another image of a found subject ("case1_t2.nii.gz" next to the
            # dataset's "case1_flair.nii.gz") is not a subject of its own.
            cuts = [n for n, ch in enumerate(stem) if not ch.isalnum()]
            if any(stem[:n] in found for n in cuts):
                continue
            if candidates:
                subject = candidates[0]
            elif entry.is_file() and name.lower().endswith(_IMAGE_SUFFIXES):
                subject = stem
            else:
                continue  # not an image: a README, a table of participants, ...
            if subject not in found:
                out.setdefault(subject, f"{rel} does not match the images pattern {ds.images!r}")
    return dict(sorted(out.items()))


def _unreadable_reason(path: Path | str, root: Path) -> str:
    """A skip reason for the local admin: the path, the uid refused and the fix."""
    uid = os.geteuid()
    return f"{path}: unreadable by uid {uid} (permission denied); fix: {fix_command(root, uid)}"


# ----------------------------------------------------------------------------- volume facts


def ras_geometry(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[list[int], list[float]]:
    """Shape and spacing along R, A, S: what the volume looks like once reoriented to RAS.

    A singular or non-finite affine has no RAS axes; it is refused with a clear reason here rather
    than turned into NaN axis indices that fail later with an unrelated message.
    """
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.all(np.isfinite(matrix)) or abs(float(np.linalg.det(matrix))) < 1e-9:
        raise CatalogError("the volume's voxel-to-world transform is degenerate (a zero or unknown spacing?)")
    axes = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    norms = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    ras_shape = [0, 0, 0]
    ras_spacing = [0.0, 0.0, 0.0]
    for i in range(3):
        ras_shape[axes[i]] = int(shape[i])
        ras_spacing[axes[i]] = round(float(norms[i]), 6)
    return ras_shape, ras_spacing


@dataclass
class _VolumeFacts:
    shape: list[int]
    spacing: list[float]
    patient_key: str | None = None
    label_counts: dict[str, int] | None = None
    # [[category, message], ...] as the reader gave them.
    warnings: list[list[str]] = field(default_factory=list)


def _read_volume(fmt: Fmt, path: Path, modality: str, volume_index: int | None) -> Volume:
    if fmt == "dicom":
        # Imported on use: a NIfTI-only site never loads the DICOM stack.
        from agent.data.dicom import read_dicom_series

        return read_dicom_series(path, volume_index=volume_index)
    return read_nifti_volume(path, modality, volume_index=volume_index)


def _label_counts(path: Path, array: np.ndarray) -> dict[str, int]:
    if not np.all(np.isfinite(array)):
        raise CatalogError(f"{path}: label mask has non-finite values")
    values, counts = np.unique(np.rint(array).astype(np.int64), return_counts=True)
    if len(values) > MAX_LABEL_VALUES:
        raise CatalogError(f"{path}: {len(values)} distinct values; this is not a label mask")
    return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}


def label_fraction(counts: dict[str, int], target_labels: Iterable[int]) -> float:
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return sum(counts.get(str(v), 0) for v in target_labels) / total


# ----------------------------------------------------------------------------- one dataset's scan


class _SubjectSkipped(FedsiteError):
    """A subject the scan leaves out; the message is the reason recorded in the scan report, as is."""


@dataclass
class _Scanner:
    """State of one dataset's scan: what the database knew, and what this scan learnt."""

    ds: DatasetConfig
    secret: bytes
    old_files: dict[str, CatalogFile]
    old_volumes: dict[str, CatalogVolume]
    stats: DatasetScan
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    volumes: dict[str, _VolumeFacts] = field(default_factory=dict)

    def file_sha(self, path: Path) -> str:
        rel = path.relative_to(self.ds.root).as_posix()
        key = _path_key(self.secret, rel)
        if key in self.files:
            return str(self.files[key]["sha256"])
        st = path.stat()
        old = self.old_files.get(key)
        if old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
            sha = old.sha256
            self.stats.files_unchanged += 1
        else:
            sha = _sha256_file(path)
            self.stats.files_hashed += 1
        self.files[key] = {"path_key": key, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
        return sha

    def source_checksum(self, path: Path) -> str:
        """SHA-256 of a NIfTI file, of a pair's header and voxel file, or of the sorted (name, SHA-256)
        list of a series folder."""
        if path.is_file():
            image_half = pair_image(path)
            if image_half is not None and image_half.is_file():
                # The voxels of an Analyze/NIfTI pair are in the .img: a change there is a new volume.
                pair = f"pair\0{self.file_sha(path)}\0{self.file_sha(image_half)}"
                return hashlib.sha256(pair.encode()).hexdigest()
            return self.file_sha(path)
        if not path.is_dir():
            raise _SubjectSkipped(f"{path}: neither a file nor a folder")
        if not os.access(path, os.R_OK | os.X_OK):
            # rglob passes over a folder it cannot list: that is a permission problem, not an empty series.
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise _SubjectSkipped(f"{path}: empty folder")
        h = hashlib.sha256(b"series\0")
        for p in files:
            h.update(f"{p.relative_to(path).as_posix()}\0{self.file_sha(p)}\n".encode())
        return h.hexdigest()

    def checksum(self, path: Path) -> str:
        """What identifies a subject's volume: its source checksum and, with a `volume_index`, which
        volume of a 4D image is read (changing the index is a new volume for the catalog and the
        training cache alike)."""
        source = self.source_checksum(path)
        if self.ds.volume_index is None:
            return source
        return hashlib.sha256(f"volume\0{self.ds.volume_index}\0{source}".encode()).hexdigest()

    def facts(self, fmt: Fmt, path: Path, modality: str, *, is_label: bool) -> tuple[str, _VolumeFacts]:
        checksum = self.checksum(path)
        cached = self.volumes.get(checksum)
        if cached is None:
            old = self.old_volumes.get(checksum)
            if old is not None and (not is_label or old.label_counts is not None):
                cached = _VolumeFacts(
                    list(old.shape),
                    list(old.spacing),
                    old.patient_key,
                    old.label_counts,
                    list(old.warnings or []),
                )
                self.stats.volumes_reused += 1
        if cached is None:
            vol = _read_volume(fmt, path, modality, self.ds.volume_index)
            self.stats.volumes_read += 1
            if vol.array.ndim != 3:
                raise _SubjectSkipped(f"{path}: not a 3D volume (shape {vol.array.shape})")
            nonfinite = count_nonfinite(vol.array)
            if nonfinite:
                # Caught here, with the subject named in the scan report, rather than as a NaN loss in
                # the middle of a training round at every site that trains on this dataset.
                raise _SubjectSkipped(
                    f"{path}: {nonfinite} of {vol.array.size} voxel(s) are not finite (NaN or infinity)"
                )
            shape, spacing = ras_geometry(vol.affine, vol.array.shape)
            pkey = subject_key_for(self.secret, vol.patient_id) if vol.patient_id else None
            counts = _label_counts(path, vol.array) if is_label else None
            warns = [[warning_category(w).value, str(w)] for w in vol.warnings]
            cached = _VolumeFacts(shape, spacing, pkey, counts, warns)
        self.volumes[checksum] = cached
        return checksum, cached

    def item(self, subject: str, sources: dict[str, Path]) -> dict[str, Any]:
        ds = self.ds
        missing = [m for m in ds.modalities if m not in sources]
        if missing:
            raise _SubjectSkipped(f"missing modality {', '.join(repr(m) for m in missing)}")
        label_path: Path | None = None
        if ds.label is not None:
            label_path = ds.root / ds.label.replace("{subject}", subject)
            if not label_path.is_file():
                raise _SubjectSkipped(f"label mask missing: {label_path}")
        checksums: list[list[str]] = []
        ref: _VolumeFacts | None = None
        ref_name = ""
        patient_keys: set[str] = set()
        warnings: list[dict[str, str]] = []
        for modality in ds.modalities:
            checksum, facts = self.facts(ds.format, sources[modality], modality, is_label=False)
            checksums.append([modality, checksum])
            warnings += [{"source": modality, "category": c, "message": m} for c, m in facts.warnings]
            if facts.patient_key:
                patient_keys.add(facts.patient_key)
            if ref is None:
                ref, ref_name = facts, modality
            else:
                _check_same_grid(ref_name, ref, modality, facts)
        assert ref is not None
        if len(patient_keys) > 1:
            raise _SubjectSkipped("the modalities' DICOM series belong to different patients")
        fraction: float | None = None
        label_checksum = ""
        if label_path is not None:
            label_checksum, lfacts = self.facts("nifti", label_path, "label", is_label=True)
            _check_same_grid(ref_name, ref, "label", lfacts)
            warnings += [{"source": "label", "category": c, "message": m} for c, m in lfacts.warnings]
            assert lfacts.label_counts is not None
            fraction = label_fraction(lfacts.label_counts, ds.target_labels)
        item_checksum = hashlib.sha256(
            json.dumps({"fmt": ds.format, "images": checksums, "label": label_checksum}).encode()
        ).hexdigest()
        folder_key = subject_key_for(self.secret, subject)
        return {
            "item_key": folder_key,
            "subject_key": next(iter(patient_keys)) if patient_keys else folder_key,
            "fmt": ds.format,
            "images": [[m, sources[m]] for m in ds.modalities],
            "label": label_path,
            "checksum": item_checksum,
            "shape": ref.shape,
            "spacing": ref.spacing,
            "label_fraction": fraction,
            "warnings": warnings,
        }


def excludes(ds: DatasetConfig, warnings: list[dict[str, str]]) -> bool:
    """Whether a subject with these warnings is kept out of training and evaluation.

    A category the dataset's `exclude_warnings` names excludes it; a stored category this version
    does not know (a newer agent wrote it) counts as "other".
    """
    known = {c.value for c in WarningCategory}
    excluded = {c.value for c in ds.exclude_warnings}
    return any((w["category"] if w["category"] in known else "other") in excluded for w in warnings)


def _check_same_grid(ref_name: str, ref: _VolumeFacts, name: str, other: _VolumeFacts) -> None:
    if other.shape != ref.shape:
        raise _SubjectSkipped(
            f"shape mismatch: {ref_name} is {tuple(ref.shape)} but {name} is {tuple(other.shape)} (in RAS)"
        )
    if not np.allclose(other.spacing, ref.spacing, rtol=1e-3, atol=1e-4):
        raise _SubjectSkipped(
            f"spacing mismatch: {ref_name} is {tuple(ref.spacing)} mm but {name} is {tuple(other.spacing)} mm"
        )


def _aggregate(items: list[dict[str, Any]], num_skipped: int, ds: DatasetConfig) -> dict[str, Any]:
    """Statistics of what training may use: excluded subjects count only in num_excluded (and num_items)."""
    used = [i for i in items if i["split"] != EXCLUDED]
    fractions = [i["label_fraction"] for i in used if i["label_fraction"] is not None]
    shapes = np.array([i["shape"] for i in used]) if used else None
    spacings = np.array([i["spacing"] for i in used]) if used else None
    return {
        "num_items": len(items),
        "num_subjects": len({i["subject_key"] for i in items}),
        "num_train": sum(1 for i in items if i["split"] == "train"),
        "num_val": sum(1 for i in items if i["split"] == "val"),
        "num_skipped": num_skipped,
        "num_excluded": len(items) - len(used),
        "exclude_warnings": [c.value for c in ds.exclude_warnings],
        "volume_index": ds.volume_index,
        "shape_min": shapes.min(axis=0).tolist() if shapes is not None else None,
        "shape_max": shapes.max(axis=0).tolist() if shapes is not None else None,
        "spacing_min": spacings.min(axis=0).tolist() if spacings is not None else None,
        "spacing_max": spacings.max(axis=0).tolist() if spacings is not None else None,
        "mean_label_fraction": float(np.mean(fractions)) if fractions else None,
        "volume_checks": VOLUME_CHECKS,
    }


def _scan_one(
    ds: DatasetConfig,
    db: Database,
    secret: bytes,
    key_file: Path,
    report: ScanReport,
    advance: Callable[[int], None],
    set_total: Callable[[int], None],
    allow_shrink: bool = False,
) -> DatasetScan:
    stats = DatasetScan(name=ds.name)
    # An unmounted share or a folder this uid cannot read must not wipe the catalog: leave it as it
    # was and say why (which uid, the fix), without a traceback.
    access = check_tree(ds.root, sample=0, max_folders=1)
    if not access.exists or not access.is_dir or access.blocked_at is not None or not access.root_listable:
        stats.error = access.message() or f"dataset root is not a readable folder: {ds.root}"
        stats.problem = access.reason()
        return stats
    subjects = discover_subjects(ds)
    unreadable: set[str] = set()
    for subject, reason in unmatched_subjects(ds, subjects, unreadable).items():
        report.skipped.append(SkippedSubject(ds.name, subject, reason))
    stats.num_unreadable = len(unreadable)
    set_total(len(subjects))
    key_id = _key_id(secret)
    with db.session() as s:
        row = s.get(CatalogDataset, ds.name)
        same_key = row is not None and row.key_id == key_id
        same_checks = same_key and row is not None and (row.stats or {}).get("volume_checks") == VOLUME_CHECKS
        old_files = (
            {f.path_key: f for f in s.scalars(select(CatalogFile).where(CatalogFile.dataset == ds.name))}
            if same_key
            else {}
        )
        old_volumes = (
            {v.checksum: v for v in s.scalars(select(CatalogVolume).where(CatalogVolume.dataset == ds.name))}
            if same_checks
            else {}
        )
        old_item_keys = set(s.scalars(select(CatalogItem.item_key).where(CatalogItem.dataset == ds.name)))
        s.expunge_all()
    scanner = _Scanner(ds, secret, old_files, old_volumes, stats)
    items: list[dict[str, Any]] = []
    included_names: list[str] = []
    for subject, sources in subjects.items():
        try:
            items.append(scanner.item(subject, sources))
            included_names.append(subject)
        except _SubjectSkipped as exc:
            report.skipped.append(SkippedSubject(ds.name, subject, str(exc)))
        except PermissionError as exc:
            stats.num_unreadable += 1
            report.skipped.append(
                SkippedSubject(ds.name, subject, _unreadable_reason(exc.filename or subject, ds.root))
            )
        except Exception as exc:  # a reader's error names the file; the scan goes on
            report.skipped.append(SkippedSubject(ds.name, subject, f"{type(exc).__name__}: {exc}"))
        advance(1)
    stats.num_skipped = sum(1 for sk in report.skipped if sk.dataset == ds.name)
    excluded = {i["item_key"] for i in items if excludes(ds, i["warnings"])}
    # Splits among the subjects training may use, so that excluded ones leave a usable split behind.
    splits = assign_splits(
        ds.name, (i["subject_key"] for i in items if i["item_key"] not in excluded), ds.val_fraction
    )
    for subject, i in zip(included_names, items, strict=True):
        i["split"] = EXCLUDED if i["item_key"] in excluded else splits[i["subject_key"]]
        if i["warnings"]:
            report.warned.append(WarnedSubject(ds.name, subject, i["item_key"] in excluded, i["warnings"]))
    stats.num_excluded = len(excluded)
    lost = len(old_item_keys) - len(items)
    if not allow_shrink and old_item_keys and lost > len(old_item_keys) * MAX_SHRINK_FRACTION:
        stats.error = (
            f"this scan found {len(items)} of the {len(old_item_keys)} subjects in the catalog "
            f"(root {ds.root}); the catalog was kept. If the data really shrank, scan with "
            "`fedsite data scan --allow-shrink`"
        )
        stats.problem = (
            f"a scan found {len(items)} of {len(old_item_keys)} catalogued subjects; the old catalog is kept"
        )
        return stats
    agg = _aggregate(items, stats.num_skipped, ds)
    agg["num_unreadable"] = stats.num_unreadable
    agg["unreadable_uid"] = os.geteuid()
    new_keys = {i["item_key"] for i in items}
    stats.items_added = len(new_keys - old_item_keys)
    stats.items_removed = len(old_item_keys - new_keys)
    stats.num_items = agg["num_items"]
    stats.num_subjects = agg["num_subjects"]
    stats.num_train = agg["num_train"]
    stats.num_val = agg["num_val"]
    with db.session() as s:
        row = s.get(CatalogDataset, ds.name)
        if row is None:
            row = CatalogDataset(name=ds.name)
            s.add(row)
        row.format = ds.format
        row.root = str(ds.root)
        row.modalities = list(ds.modalities)
        row.target_labels = list(ds.target_labels)
        row.val_fraction = ds.val_fraction
        row.key_id = key_id
        row.path_key_file = str(key_file)
        row.stats = agg
        row.scanned_at = datetime.now(UTC)
        s.flush()
        for table in (CatalogItem, CatalogFile, CatalogVolume):
            s.execute(delete(table).where(table.dataset == ds.name))
        if items:
            cipher = _path_cipher(key_file)
            rows = []
            for i in items:
                label = i["label"]
                rows.append(
                    {
                        **i,
                        "dataset": ds.name,
                        "images": [[m, _encrypt(cipher, p)] for m, p in i["images"]],
                        "label": _encrypt(cipher, label) if label is not None else None,
                    }
                )
            s.execute(insert(CatalogItem), rows)
        if scanner.files:
            s.execute(insert(CatalogFile), [{"dataset": ds.name, **f} for f in scanner.files.values()])
        if scanner.volumes:
            s.execute(
                insert(CatalogVolume),
                [
                    {
                        "dataset": ds.name,
                        "checksum": c,
                        "shape": v.shape,
                        "spacing": v.spacing,
                        "patient_key": v.patient_key,
                        "label_counts": v.label_counts,
                        "warnings": v.warnings,
                    }
                    for c, v in scanner.volumes.items()
                ],
            )
    return stats


def scan_datasets(
    cfg: AgentConfig,
    db: Database,
    *,
    progress: bool = False,
    audit: AuditSink | None = None,
    actor: str = "system",
    console: Console | None = None,
    allow_shrink: bool = False,
) -> ScanReport:
    """Index every configured dataset into the catalog and drop datasets no longer configured.

    A dataset whose scan would drop more than MAX_SHRINK_FRACTION of its catalogued subjects keeps
    its old catalog (the report says why) unless ALLOW_SHRINK.

    `audit` (anything with `.append(action, actor=..., details=...)`) receives one
    "data.scanned" event with dataset names and counts only.
    """
    secret = cfg.site_secret()
    key_file = path_key_file(cfg)
    _ensure_path_key(key_file)
    report = ScanReport()
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=False,
    )
    with bar:
        for ds in cfg.datasets:
            task = bar.add_task(f"scanning {ds.name}", total=None)

            def advance(n: int, t: TaskID = task) -> None:
                bar.advance(t, n)

            def set_total(n: int, t: TaskID = task) -> None:
                bar.update(t, total=n)

            stats = _scan_one(
                ds,
                db,
                secret,
                key_file,
                report,
                advance=advance,
                set_total=set_total,
                allow_shrink=allow_shrink,
            )
            report.datasets.append(stats)
    configured = {ds.name for ds in cfg.datasets}
    with db.session() as s:
        stale = [n for n in s.scalars(select(CatalogDataset.name)) if n not in configured]
        for name in stale:
            for table in (CatalogItem, CatalogFile, CatalogVolume):
                s.execute(delete(table).where(table.dataset == name))
            s.execute(delete(CatalogDataset).where(CatalogDataset.name == name))
    report.removed_datasets = sorted(stale)
    if audit is not None:
        audit.append("data.scanned", actor=actor, details=report.audit_details())
    return report


# ----------------------------------------------------------------------------- reading the catalog


def dataset_items(db: Database, dataset: str, split: Split | None = None) -> list[ItemRef]:
    """The dataset's items (optionally one split), in a stable order (by item key)."""
    if split is not None and split not in ("train", "val"):
        raise CatalogError(f"split must be 'train' or 'val', not {split!r}")
    with db.session() as s:
        row = s.get(CatalogDataset, dataset)
        if row is None:
            raise UnknownDataset(f"dataset {dataset!r} is not in the catalog; run `fedsite data scan` first")
        q = select(CatalogItem).where(CatalogItem.dataset == dataset)
        # Excluded subjects are never handed to training or evaluation.
        q = (
            q.where(CatalogItem.split == split)
            if split is not None
            else q.where(CatalogItem.split != EXCLUDED)
        )
        rows = list(s.scalars(q.order_by(CatalogItem.item_key)))
        targets = tuple(int(v) for v in row.target_labels)
        volume_index = (row.stats or {}).get("volume_index")
        key_file = row.path_key_file
    cipher = _path_cipher(Path(key_file))
    return [
        ItemRef(
            dataset=r.dataset,
            subject_key=r.subject_key,
            split="val" if r.split == "val" else "train",
            images={m: _decrypt(cipher, p, key_file) for m, p in r.images},
            label=_decrypt(cipher, r.label, key_file) if r.label is not None else None,
            fmt="dicom" if r.fmt == "dicom" else "nifti",
            checksum=r.checksum,
            target_labels=targets,
            volume_index=volume_index if isinstance(volume_index, int) else None,
        )
        for r in rows
    ]


def item_details(db: Database, dataset: str) -> list[dict[str, Any]]:
    """Per-item rows for the local admin's listing: key, split (or "excluded"), shape, spacing, label
    fraction, paths and the volumes' warnings."""
    with db.session() as s:
        row = s.get(CatalogDataset, dataset)
        if row is None:
            raise UnknownDataset(f"dataset {dataset!r} is not in the catalog; run `fedsite data scan` first")
        key_file = row.path_key_file
        rows = list(
            s.scalars(
                select(CatalogItem).where(CatalogItem.dataset == dataset).order_by(CatalogItem.item_key)
            )
        )
    cipher = _path_cipher(Path(key_file))
    return [
        {
            "subject_key": r.subject_key,
            "split": r.split,
            "shape": list(r.shape),
            "spacing": list(r.spacing),
            "label_fraction": r.label_fraction,
            "checksum": r.checksum,
            "images": {m: str(_decrypt(cipher, p, key_file)) for m, p in r.images},
            "label": str(_decrypt(cipher, r.label, key_file)) if r.label is not None else None,
            "warnings": list(r.warnings or []),
        }
        for r in rows
    ]


def dataset_summaries(db: Database) -> list[DatasetSummary]:
    """Every scanned dataset's statistics, by name."""
    with db.session() as s:
        rows = list(s.scalars(select(CatalogDataset).order_by(CatalogDataset.name)))
    out = []
    for r in rows:
        st = r.stats or {}
        scanned = r.scanned_at if r.scanned_at.tzinfo else r.scanned_at.replace(tzinfo=UTC)
        out.append(
            DatasetSummary(
                name=r.name,
                format=r.format,
                modalities=list(r.modalities),
                num_subjects=int(st.get("num_subjects", 0)),
                num_items=int(st.get("num_items", 0)),
                num_train=int(st.get("num_train", 0)),
                num_val=int(st.get("num_val", 0)),
                num_skipped=int(st.get("num_skipped", 0)),
                num_excluded=int(st.get("num_excluded", 0)),
                shape_min=st.get("shape_min"),
                shape_max=st.get("shape_max"),
                spacing_min=st.get("spacing_min"),
                spacing_max=st.get("spacing_max"),
                mean_label_fraction=st.get("mean_label_fraction"),
                scanned_at=scanned,
                num_unreadable=int(st.get("num_unreadable", 0)),
                unreadable_uid=st.get("unreadable_uid"),
            )
        )
    return out
