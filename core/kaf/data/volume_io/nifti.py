"""NIfTI files (.nii, .nii.gz): read one 3D volume, write 3D volumes and 4D per-class maps."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError

from kaf.data.volume_io.checks import (
    DAMAGED_FILE_ERRORS,
    check_shape,
    checked_volume,
    drop_trailing_singletons,
    too_little_data,
)
from kaf.data.volume_io.volume import Volume
from kaf.runtime.errors import InputFileError

_NIFTI_ERRORS = (ImageFileError, HeaderDataError, *DAMAGED_FILE_ERRORS)


def read_nifti(path: Path) -> Volume:
    try:
        _check_stored_voxel_sizes(path)
        # mmap=False: a memory-mapped file stays open, which blocks overwriting it later on Windows.
        image = nib.load(path, mmap=False)
    except _NIFTI_ERRORS as exc:
        raise InputFileError(
            path, "is not a readable NIfTI file: it is damaged, truncated, or not NIfTI at all"
        ) from exc
    shape_xyz = drop_trailing_singletons(image.shape)
    check_shape(path, shape_xyz)
    try:
        data = np.asanyarray(image.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputFileError(
            path, "is truncated or corrupt: its compressed data ends early or is damaged"
        ) from exc
    except (OSError, ValueError) as exc:
        raise InputFileError(path, too_little_data(shape_xyz)) from exc
    return checked_volume(path, data.reshape(shape_xyz), image.affine)


def _check_stored_voxel_sizes(path: Path) -> None:
    """Refuse voxel sizes of 0 or below where they place the voxels (no sform), before nibabel loads the
    file: it would print a warning and quietly use 1 or the absolute value, and other programs repair
    such a header differently, so the image would sit elsewhere in each of them."""
    with ImageOpener(path) as file:
        block = file.read(nib.Nifti2Header.template_dtype.itemsize)
    kind = next((k for k in (nib.Nifti1Header, nib.Nifti2Header) if k.may_contain_header(block)), None)
    if kind is None:
        return  # not NIfTI-1 or -2: nib.load says what it is
    header = kind(block[: kind.template_dtype.itemsize], check=False)
    axes = min(int(header["dim"][0]), 3)
    sizes_xyz = header["pixdim"][1 : 1 + axes]
    if header["sform_code"] > 0 or np.all(sizes_xyz > 0):
        return
    shown = ", ".join(f"{axis} {size:g}" for axis, size in zip("xyz", sizes_xyz, strict=False))
    raise InputFileError(
        path,
        f"stores a voxel size that is not a positive number ({shown} mm) and no sform to place the voxels "
        "otherwise; fix its header, as programs repair such a header in different ways",
    )


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a [z, y, x] volume, or [C, z, y, x] per-class maps as one 4D image (x, y, z, class):
    NIfTI stores the axes in the reverse order."""
    # An explicit dtype keeps nibabel from refusing int64 data.
    image = nib.Nifti1Image(array.T, affine, dtype=array.dtype)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, path)
