"""JPEG baseline series: encoded here with Pillow, decoded by the agent through pylibjpeg.

pydicom's shipped JPEG files are colour or 12-bit; a grayscale 8-bit baseline series is
what a secondary-capture export or an old PACS sends, so it is built here slice by slice.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, MRImageStorage, generate_uid

from agent.data.dicom import scan_dicom_folder


def _jpeg_series(folder: Path, n: int = 8, size: int = 32) -> tuple[np.ndarray, list[Path]]:
    folder.mkdir(parents=True)
    ii, jj = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    truth = np.zeros((size, size, n), dtype=np.float32)
    files = []
    names = [f"IM{k:03d}" for k in range(n)]
    random.Random(3).shuffle(names)
    for k in range(n):
        frame = (40 + 3 * ii + 2 * jj + 5 * k).astype(np.uint8)  # (column, row)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame.T), mode="L").save(buf, format="JPEG", quality=95)
        truth[:, :, k] = frame
        ds = Dataset()
        sop = generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.PatientID, ds.PatientName = "MR", "JPEG-TEST-1", "Test^Jpeg"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-10.0, -12.0, 4.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 4.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return truth, files


def test_a_jpeg_baseline_series_decodes_like_pydicom_and_close_to_the_source(tmp_path: Path) -> None:
    truth, files = _jpeg_series(tmp_path / "jpeg")
    scan = scan_dicom_folder(tmp_path, workers=1)
    assert scan.skipped == []
    (vol,) = scan.volumes
    assert vol.shape == truth.shape
    by_z = sorted(files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for k, path in enumerate(by_z):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        np.testing.assert_array_equal(vol.array[:, :, k], ds.pixel_array.T.astype(np.float32))
    # Lossy at quality 95: close to the source, not equal.
    assert float(np.abs(vol.array - truth).max()) <= 4.0
