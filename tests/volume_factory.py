"""Small synthetic volumes, and NIfTI and DICOM writing, for tests.

A plain module with its own name (not conftest) so that processes spawned by the DDP tests can
import the test modules that use it: each test folder has its own conftest.py, and the name
`conftest` resolves to whichever comes first on sys.path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from kaf.data.sample_data import ring_and_disc

AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])  # voxel (x, y, z) -> mm: 1.5 mm in-plane, 4 mm slices


def synthetic_volume(slices: int = 8, height: int = 48, width: int = 64, seed: int = 0):
    """(image, labels): a ring (label 1) around a disc (label 2) whose size changes along z, on noise."""
    return ring_and_disc(slices, height, width, seed, noise=0.1, radius=(8, 6), shift=3)


def save_nifti(array_zyx: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    affine = AFFINE if affine is None else affine
    nib.save(nib.Nifti1Image(array_zyx.transpose(2, 1, 0), affine), path)
    return path


def write_dicom_slice(
    path: Path,
    pixels: np.ndarray,
    origin_mm: Sequence[float],
    series_uid: str,
    directions: tuple[Sequence[float], Sequence[float]] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    rescale: tuple[float, float] = (1.0, 0.0),
) -> None:
    """One CT slice file: int16 `pixels` (rows x columns) at `origin_mm`, along the (row, column)
    `directions`, `pixel_spacing` (between rows, between columns), stored values * slope + intercept."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = "synthetic"
    ds.ImageOrientationPatient = [float(v) for v in (*directions[0], *directions[1])]
    ds.ImagePositionPatient = [float(v) for v in origin_mm]
    ds.PixelSpacing = list(pixel_spacing)
    ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
