"""NRRD files (.nrrd, .seg.nrrd and detached .nhdr headers) in RAS or LPS space."""

from __future__ import annotations

from pathlib import Path

import nrrd
import numpy as np

from kaf.data.volume_io.checks import (
    DAMAGED_FILE_ERRORS,
    check_shape,
    checked_volume,
    drop_trailing_singletons,
    not_3d,
    too_little_data,
)
from kaf.data.volume_io.volume import LPS_TO_RAS, Volume
from kaf.runtime.errors import InputFileError

NRRD_LPS_NAMES = {"left-posterior-superior", "lps"}
NRRD_RAS_NAMES = {"right-anterior-superior", "ras"}

_NRRD_ERRORS = (nrrd.NRRDError, StopIteration, *DAMAGED_FILE_ERRORS)


def read_nrrd(path: Path) -> Volume:
    with open(path, "rb") as file:
        try:
            header = nrrd.read_header(file)
        except _NRRD_ERRORS as exc:
            raise InputFileError(
                path, "is not a readable NRRD file: it is damaged, truncated, or not NRRD"
            ) from exc
        sizes = tuple(int(size) for size in header.get("sizes", ()))
        spatial_axes = _nrrd_spatial_axes(path, header, sizes)
        shape_xyz = tuple(sizes[axis] for axis in spatial_axes)
        check_shape(path, shape_xyz)
        try:
            # index_order="F" (pynrrd's default, named on purpose) keeps the header's axis order: (x, y, z).
            data = nrrd.read_data(header, file, str(path), index_order="F")
        except FileNotFoundError as exc:  # a detached header (.nhdr) names a data file that is missing
            raise InputFileError(path, f"names a data file that does not exist: {exc.filename}") from exc
        except _NRRD_ERRORS as exc:
            raise InputFileError(path, too_little_data(shape_xyz)) from exc
    other_axes = tuple(axis for axis in range(len(sizes)) if axis not in spatial_axes)
    data = np.squeeze(data, axis=other_axes)
    return checked_volume(path, data, _nrrd_affine(path, header, spatial_axes))


def _nrrd_spatial_axes(path: Path, header: dict, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The three axes that run through space; any other axis must have length 1 and is dropped."""
    directions = header.get("space directions")
    if len(sizes) != header.get("dimension") or (directions is not None and len(directions) != len(sizes)):
        raise InputFileError(
            path, "has a damaged NRRD header: its dimension, sizes and space directions disagree"
        )
    if directions is None:
        return tuple(range(len(drop_trailing_singletons(sizes))))
    # pynrrd marks a non-spatial axis (a list of segment layers, a time axis) with a row of NaN.
    spatial = tuple(axis for axis, row in enumerate(directions) if np.all(np.isfinite(row)))
    layers = [sizes[axis] for axis in range(len(sizes)) if axis not in spatial and sizes[axis] > 1]
    if layers and path.name.lower().endswith(".seg.nrrd"):
        raise InputFileError(
            path,
            f"holds {layers[0]} overlapping segment layers; overlapping segments are not supported yet, "
            "so export the segmentation as a single labelmap",
        )
    if layers or len(spatial) != 3:
        raise InputFileError(path, not_3d(sizes))
    return spatial


def _nrrd_affine(path: Path, header: dict, spatial_axes: tuple[int, ...]) -> np.ndarray:
    try:
        affine = _nrrd_header_affine(header, spatial_axes)
    except (ValueError, IndexError) as exc:
        raise InputFileError(
            path, "has a damaged NRRD header: its space directions, origin or spacings are malformed"
        ) from exc
    if "space directions" not in header:
        # Without a space the orientation is unknown: the axes are assumed to be aligned with RAS.
        return affine
    space = str(header.get("space", "")).lower()
    if space in NRRD_LPS_NAMES:
        return LPS_TO_RAS @ affine
    if space in NRRD_RAS_NAMES:
        return affine
    raise InputFileError(
        path, f"uses the coordinate space '{header.get('space')}'; only RAS and LPS spaces are supported"
    )


def _nrrd_header_affine(header: dict, spatial_axes: tuple[int, ...]) -> np.ndarray:
    """The affine in the header's own space; falls back to 'spacings' when there are no space directions."""
    affine = np.eye(4)
    directions = header.get("space directions")
    if directions is None:
        spacings = header.get("spacings")
        affine[:3, :3] = np.diag(
            [1.0 if spacings is None else float(spacings[axis]) for axis in spatial_axes]
        )
    else:
        affine[:3, :3] = np.asarray(directions, dtype=float)[list(spatial_axes)].T
        affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    return affine


def write_nrrd(array_zyx: np.ndarray, affine: np.ndarray, path: Path) -> None:
    header = {
        "space": "right-anterior-superior",
        "space directions": affine[:3, :3].T,  # one row per axis, in header order (x, y, z)
        "space origin": affine[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    nrrd.write(str(path), np.ascontiguousarray(array_zyx), header, index_order="C")
