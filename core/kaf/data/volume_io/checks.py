"""Checks every reader applies, whatever the format: shape, memory, voxel type, affine, label values.

A file that fails one raises `InputFileError` naming it; the checks on a header run before any voxel data
is loaded, so a huge or malformed file is refused before it fills the memory.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from kaf.data.volume_io.volume import Volume, describe
from kaf.runtime.errors import InputDataError, InputFileError
from kaf.runtime.host_memory import available_ram_bytes

SUPPORTED_FORMATS = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .seg.nrrd, .nhdr) or a folder holding one DICOM series"
)

# Processing keeps about this many float32 copies of a volume alive at once (normalised image,
# probabilities, intermediate results), so a volume needs this many times its float32 size in memory.
WORKING_COPIES = 6
FLOAT32_BYTES = 4

AFFINE_TOLERANCE_MM = 1e-3

# What the parsers raise for damaged, truncated or foreign files (found by feeding them such files).
DAMAGED_FILE_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, zlib.error)


def check_same_grid(image: Volume, labels: Volume) -> None:
    """Raise InputDataError unless both volumes have the same shape and (nearly) the same affine."""
    if image.shape != labels.shape:
        raise InputDataError(
            f"The labels {describe(labels)} have shape {labels.shape} (z, y, x) but the image "
            f"{describe(image)} has shape {image.shape}; the labels must be drawn on the image's own "
            "voxel grid."
        )
    difference = float(np.max(np.abs(image.affine - labels.affine)))
    if difference > AFFINE_TOLERANCE_MM:
        raise InputDataError(
            f"The labels {describe(labels)} are not aligned with the image {describe(image)}: their "
            f"positions in space differ by up to {difference:.4g} mm; resample the labels onto the image "
            "grid."
        )


def checked_volume(path: Path, data_xyz: np.ndarray, affine: np.ndarray) -> Volume:
    """Build a Volume from an (x, y, z) array, as NIfTI and NRRD store it."""
    return checked_volume_zyx(path, data_xyz.transpose(2, 1, 0), affine)


def checked_volume_zyx(path: Path, array_zyx: np.ndarray, affine: np.ndarray) -> Volume:
    affine = np.asarray(affine, dtype=np.float64)
    check_affine(path, affine)
    check_voxel_type(path, array_zyx.dtype)
    # A contiguous [z, y, x] copy makes each z slice one block of memory, which slice-wise models read.
    dtype = np.float32 if array_zyx.dtype.kind == "f" else array_zyx.dtype
    return Volume(np.ascontiguousarray(array_zyx, dtype=dtype), affine, path)


def check_shape(path: Path, shape_xyz: tuple[int, ...]) -> None:
    """Check the shape a header announces, before any voxel data is loaded."""
    if len(shape_xyz) != 3:
        raise InputFileError(path, not_3d(shape_xyz))
    if 0 in shape_xyz:
        raise InputFileError(
            path, f"has shape {format_shape(shape_xyz)} with a dimension of 0, so it holds no voxels"
        )
    check_memory(path, shape_xyz)


def check_memory(path: Path, shape_xyz: tuple[int, ...]) -> None:
    needed = int(np.prod(shape_xyz, dtype=np.int64)) * FLOAT32_BYTES * WORKING_COPIES
    available = available_ram_bytes()
    if available is not None and needed > available:
        raise InputFileError(
            path,
            f"is too large: its {format_shape(shape_xyz)} voxels need about {needed / 2**30:,.1f} GiB of "
            f"memory to process but only {available / 2**30:,.1f} GiB is available; crop or downsample it "
            "first",
        )


def check_voxel_type(path: Path, dtype: np.dtype) -> None:
    if dtype.kind not in "biuf":
        stored = f"colour values ({', '.join(dtype.names)})" if dtype.names else f"'{dtype}' values"
        raise InputFileError(path, f"stores its voxels as {stored}; one grey level per voxel is needed")


def check_affine(path: Path, affine: np.ndarray) -> None:
    if not np.all(np.isfinite(affine)):
        raise InputFileError(path, "has a voxel size or position that is not a finite number")
    spacing_zyx = np.linalg.norm(affine[:3, :3], axis=0)[::-1]
    if np.any(spacing_zyx <= 0):
        shown = ", ".join(f"{axis} {size:g}" for axis, size in zip("zyx", spacing_zyx, strict=True))
        raise InputFileError(
            path, f"has a voxel size of 0 mm ({shown} mm); every voxel size must be a positive number"
        )
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputFileError(path, "has voxel axes that are not independent, so it cannot be placed in space")


def label_values(path: Path, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f":
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InputFileError(
                path, f"holds {bad} NaN or infinite voxels; a label file must hold whole numbers only"
            )
        fractional = int(np.count_nonzero(array != np.round(array)))
        if fractional:
            raise InputFileError(
                path,
                f"holds {fractional} voxels with fractional values; labels must be whole numbers "
                "(0 for background, 1, 2, ... for structures)",
            )
    if array.size and array.min() < 0:
        raise InputFileError(
            path,
            f"holds negative labels (lowest {array.min():g}); labels must be 0 for background or "
            "positive whole numbers",
        )
    return array.astype(np.int64)


def label_dtype(labels: np.ndarray, path: Path) -> np.dtype:
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise InputDataError(f"The labels to write to {path} hold values that are not whole numbers.")
    low, high = (labels.min(), labels.max()) if labels.size else (0, 0)
    for dtype in (np.uint8, np.uint16, np.int16):
        limits = np.iinfo(dtype)
        if limits.min <= low and high <= limits.max:
            return np.dtype(dtype)
    raise InputDataError(
        f"The labels to write to {path} range from {low:g} to {high:g}, which does not fit in 16 bits."
    )


def drop_trailing_singletons(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop length-1 axes after the third, e.g. (x, y, z, 1) -> (x, y, z)."""
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def not_3d(shape: tuple[int, ...]) -> str:
    advice = " (save one volume of the series on its own)" if len(shape) > 3 else ""
    return f"holds a {len(shape)}D image of shape {format_shape(shape)}; a single 3D volume is needed{advice}"


def too_little_data(shape_xyz: tuple[int, ...]) -> str:
    return (
        f"holds less voxel data than its header describes ({format_shape(shape_xyz)} voxels): "
        "the file is truncated or corrupt, or its header dimensions are wrong"
    )


def format_shape(shape: tuple[int, ...]) -> str:
    return " × ".join(str(size) for size in shape)
