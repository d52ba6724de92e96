"""Reading and writing 3D volumes: NIfTI, NRRD and DICOM series, one module per format.

Every reader returns a `Volume` (volume.py) in the same (z, y, x) layout and RAS+ affine, after the checks
that all formats share (checks.py); a damaged or unusable file raises `InputFileError` naming it.
This module picks the format from the path and writes files atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kaf.data.volume_io.checks import SUPPORTED_FORMATS, check_same_grid, label_dtype, label_values
from kaf.data.volume_io.dicom import read_dicom_folder
from kaf.data.volume_io.nifti import read_nifti, write_nifti
from kaf.data.volume_io.nrrd import read_nrrd, write_nrrd
from kaf.data.volume_io.volume import Volume, describe
from kaf.runtime.atomic import replace_atomically
from kaf.runtime.errors import InputDataError, InputFileError

__all__ = [
    "Volume",
    "check_same_grid",
    "read_labels",
    "read_volume",
    "write_class_maps",
    "write_labels",
    "write_volume",
]

WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI or NRRD file, or a folder holding one DICOM series."""
    path = Path(path)
    try:
        return _read_any(path)
    except MemoryError as exc:
        # Where the system does not say how much memory is free (Windows), the size check before loading
        # cannot refuse a huge volume, so the allocation's own failure is reported instead.
        raise InputFileError(
            path, "is too large to load into this machine's memory; crop or downsample it first"
        ) from exc


def _read_any(path: Path) -> Volume:
    if not path.exists():
        raise InputFileError(path, "does not exist")
    if path.is_dir():
        return read_dicom_folder(path)
    if path.stat().st_size == 0:
        raise InputFileError(path, "is empty (0 bytes): the copy or export that made it did not finish")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return read_nifti(path)
    if name.endswith((".nrrd", ".nhdr")):
        return read_nrrd(path)
    raise InputFileError(path, f"is not in a supported format; use {SUPPORTED_FORMATS}")


def read_labels(path: str | Path, image: Volume) -> np.ndarray:
    """Read a label map that must lie on `image`'s grid; returns whole-number labels as int64 [z, y, x]."""
    labels = read_volume(path)
    check_same_grid(image, labels)
    return label_values(Path(path), labels.array)


def write_volume(array_zyx: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a [z, y, x] array with its affine, in the format the suffix names (.nii, .nii.gz, .nrrd).

    The data goes to a hidden temporary file in the same folder first and is renamed onto `path` only when
    complete, so an interrupted write never leaves a half-written file behind.
    """
    path = Path(path)
    suffix = _writable_suffix(path)
    if array_zyx.ndim != 3 or affine.shape != (4, 4):
        raise ValueError(f"expected a 3D array and a 4x4 affine, got {array_zyx.shape} and {affine.shape}")
    if not path.parent.is_dir():
        raise InputFileError(path, "cannot be written because its folder does not exist")
    if array_zyx.dtype == bool:
        array_zyx = array_zyx.astype(np.uint8)
    with replace_atomically(path) as temporary:
        if suffix == ".nrrd":
            write_nrrd(array_zyx, affine, temporary)
        else:
            write_nifti(array_zyx, affine, temporary)
    return path


def write_class_maps(maps_czyx: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write per-class maps [C, z, y, x] as one 4D NIfTI (x, y, z, class), e.g. probabilities."""
    path = Path(path)
    if _writable_suffix(path) not in (".nii", ".nii.gz"):
        raise InputFileError(path, "per-class maps are written as 4D NIfTI: use a .nii.gz name")
    with replace_atomically(path) as temporary:
        write_nifti(maps_czyx, affine, temporary)
    return path


def write_labels(labels_zyx: np.ndarray, reference: Volume, path: str | Path) -> Path:
    """Write a label map on `reference`'s grid, in the smallest integer type that holds its values."""
    if labels_zyx.shape != reference.shape:
        raise InputDataError(
            f"The labels to write to {path} have shape {labels_zyx.shape} (z, y, x) but the image "
            f"{describe(reference)} has shape {reference.shape}; they must match."
        )
    dtype = label_dtype(labels_zyx, Path(path))
    return write_volume(labels_zyx.astype(dtype, copy=False), reference.affine, path)


def _writable_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in WRITABLE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise InputFileError(path, "cannot be written: name it with .nii, .nii.gz or .nrrd at the end")
