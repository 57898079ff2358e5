"""Local data: DICOM and NIfTI reading, the dataset catalog, loading for training, generated data."""
