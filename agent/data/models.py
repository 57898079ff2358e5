"""Tables of the dataset catalog: what `fedsite data scan` found in each configured dataset.

Privacy rule: no patient identity and no DICOM header value is stored here. Subjects are
known by a keyed hash (HMAC-SHA256 with the site secret) of the patient ID; the per-file
state that makes re-scans incremental is keyed by a keyed hash of the file's relative path.
Item paths, which training needs, usually contain the subject folder name (often the patient
ID), so they are stored encrypted with a key kept in a file in the agent's work directory
(`path_key_file`): a copy of the database alone reveals no patient identity.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from agent.db.base import Base, UTCDateTime


class CatalogDataset(Base):
    """One configured dataset as of its last scan, with its aggregate statistics."""

    __tablename__ = "catalog_datasets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    format: Mapped[str] = mapped_column(String(16))
    root: Mapped[str] = mapped_column(Text)
    modalities: Mapped[list[str]] = mapped_column(JSON)
    target_labels: Mapped[list[int]] = mapped_column(JSON)
    val_fraction: Mapped[float] = mapped_column(Float)
    # Identifies the site secret the keys were made with (an HMAC of a constant, not the
    # secret): a new secret invalidates every stored key and cached hash.
    key_id: Mapped[str] = mapped_column(String(64))
    # The file holding the key that encrypts the items' paths.
    path_key_file: Mapped[str] = mapped_column(Text)
    # subjects, items, train/val counts, shape/spacing ranges, mean label fraction, skipped.
    stats: Mapped[dict[str, Any]] = mapped_column(JSON)
    scanned_at: Mapped[datetime] = mapped_column(UTCDateTime())


class CatalogItem(Base):
    """One subject folder of a dataset: what training needs to load it."""

    __tablename__ = "catalog_items"
    __table_args__ = (UniqueConstraint("dataset", "item_key", name="uq_catalog_items_dataset_item"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset: Mapped[str] = mapped_column(
        String(64), ForeignKey("catalog_datasets.name", ondelete="CASCADE"), index=True
    )
    # Keyed hash of the subject folder (unique per dataset) and of the patient ID (the same
    # patient in two folders shares it, and therefore shares the train/val split).
    item_key: Mapped[str] = mapped_column(String(64))
    subject_key: Mapped[str] = mapped_column(String(64), index=True)
    # "train", "val", or "excluded": a subject with a warning of a category in the dataset's
    # `exclude_warnings`, listed for the admin and never trained or evaluated on.
    split: Mapped[str] = mapped_column(String(8))
    fmt: Mapped[str] = mapped_column(String(16))
    # [[modality, encrypted absolute path], ...] in the dataset's modality order.
    images: Mapped[list[list[str]]] = mapped_column(JSON)
    # Encrypted absolute path of the label mask.
    label: Mapped[str | None] = mapped_column(Text, nullable=True)
    checksum: Mapped[str] = mapped_column(String(64))
    # In RAS order (the orientation training uses).
    shape: Mapped[list[int]] = mapped_column(JSON)
    spacing: Mapped[list[float]] = mapped_column(JSON)
    label_fraction: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The warnings of the subject's volumes: [{"source": modality or "label", "category", "message"}].
    # Messages never hold file names or header values (the readers' rule), so they may be stored.
    warnings: Mapped[list[dict[str, str]]] = mapped_column(JSON, server_default=text("'[]'"))


class CatalogVolume(Base):
    """What reading one volume (a NIfTI file or a DICOM series folder) told us, by content.

    Keyed by the content checksum, so that a volume is decoded once and its facts are reused
    for as long as its bytes do not change.
    """

    __tablename__ = "catalog_volumes"

    dataset: Mapped[str] = mapped_column(
        String(64), ForeignKey("catalog_datasets.name", ondelete="CASCADE"), primary_key=True
    )
    checksum: Mapped[str] = mapped_column(String(64), primary_key=True)
    shape: Mapped[list[int]] = mapped_column(JSON)
    spacing: Mapped[list[float]] = mapped_column(JSON)
    # Keyed hash of the DICOM PatientID, when the series carries one.
    patient_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # For label masks: {label value: voxel count}, so a new target_labels needs no re-read.
    label_counts: Mapped[dict[str, int] | None] = mapped_column(JSON, nullable=True)
    # The reader's warnings as [[category, message], ...], reused with the rest of the facts.
    warnings: Mapped[list[list[str]]] = mapped_column(JSON, server_default=text("'[]'"))


class CatalogFile(Base):
    """Per-file state for incremental re-scans: a file whose size and mtime are unchanged is
    not read again."""

    __tablename__ = "catalog_files"

    dataset: Mapped[str] = mapped_column(
        String(64), ForeignKey("catalog_datasets.name", ondelete="CASCADE"), primary_key=True
    )
    # Keyed hash of the path relative to the dataset root.
    path_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
