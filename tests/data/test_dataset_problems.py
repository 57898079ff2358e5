"""`DatasetSummary.problems`: why a scanned dataset gives training less than it holds, without paths."""

from __future__ import annotations

from datetime import UTC, datetime

from agent.data.catalog import DatasetSummary


def _summary(**counts: int) -> DatasetSummary:
    base = {
        "num_subjects": 0,
        "num_items": 0,
        "num_train": 0,
        "num_val": 0,
        "num_skipped": 0,
        "num_excluded": 0,
    }
    base.update(counts)
    return DatasetSummary(
        name="brain",
        format="nifti",
        modalities=["flair"],
        shape_min=None,
        shape_max=None,
        spacing_min=None,
        spacing_max=None,
        mean_label_fraction=None,
        scanned_at=datetime.now(UTC),
        unreadable_uid=10001,
        **base,
    )


def test_each_reason_for_nothing_to_train_on() -> None:
    assert _summary().problems() == ["no subjects found"]
    assert _summary(num_skipped=2).problems() == ["no usable subjects (2 skipped)"]
    assert _summary(num_skipped=2, num_unreadable=2).problems() == ["2 subject(s) unreadable by uid 10001"]
    assert _summary(num_subjects=4, num_items=4, num_excluded=4).problems() == [
        "all 4 subject(s) excluded by volume warnings"
    ]
    healthy = _summary(num_subjects=4, num_items=4, num_train=3, num_val=1)
    assert healthy.problems() == [] and healthy.public()["problems"] == []
    partly = _summary(num_subjects=4, num_items=4, num_train=3, num_val=1, num_skipped=1, num_unreadable=1)
    assert partly.problems() == ["1 subject(s) unreadable by uid 10001"]
