"""write_nifti stores voxels as int16 exactly when every value is an int16, whatever the layout.

The check runs block by block (`agent.data.volume._compact`); a value that breaks it can sit in
any block, the first, the last or one block boundary away, and must always send the volume to
float32 unchanged.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from agent.data import volume as volume_module
from agent.data.volume import Volume, write_nifti

SHAPE = (40, 30, 70)  # 84000 voxels: more than one block of 65536


def _volume(array: np.ndarray) -> Volume:
    return Volume(array=array, affine=np.diag([0.8, 0.9, 2.5, 1.0]), modality="MR", source="dicom", files=[])


def _integral(layout: str) -> np.ndarray:
    values = np.random.default_rng(1).integers(-32768, 32768, size=SHAPE).astype(np.float32)
    if layout == "transposed":  # how DICOM volumes come: a view of the slice stack
        return np.ascontiguousarray(values.transpose(2, 1, 0)).transpose(2, 1, 0)
    return values


@pytest.mark.parametrize("layout", ["c", "transposed"])
def test_integral_volumes_are_stored_as_int16_with_every_value(tmp_path: Path, layout: str) -> None:
    array = _integral(layout)
    path = write_nifti(_volume(array), tmp_path / "v.nii")
    img = nib.load(path)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(img.dataobj), array)


@pytest.mark.parametrize("layout", ["c", "transposed"])
@pytest.mark.parametrize("flat_index", [0, 65535, 65536, 84000 - 1])
@pytest.mark.parametrize("value", [0.5, 32768.0, -32769.0, float("nan"), float("inf")])
def test_one_value_that_is_not_an_int16_keeps_float32(
    tmp_path: Path, layout: str, flat_index: int, value: float
) -> None:
    array = _integral(layout)
    order = "F" if layout == "transposed" else "C"
    index = np.unravel_index(flat_index, SHAPE, order=order)
    array[index] = value
    assert volume_module._compact(array) is array
    if np.isfinite(value):
        img = nib.load(write_nifti(_volume(array), tmp_path / "v.nii"))
        assert img.get_data_dtype() == np.float32
        np.testing.assert_array_equal(np.asarray(img.dataobj), array)
