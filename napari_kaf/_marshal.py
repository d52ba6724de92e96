"""Layers <-> arrays: the only translation the plugin does between napari and the core.

napari holds a volume as an array indexed [z, y, x] (the core's order too) drawn with a per-axis `scale`
(the voxel spacing in mm) and `translate`. The voxel-to-RAS affine, which napari cannot express without
shearing the view, travels in the layer's `metadata["affine"]` so that writing the layer back to disk
restores the file's geometry exactly. Nothing here imports Qt or torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kaf.data.volume_io import Volume
from kaf.runtime.errors import InputDataError

AFFINE_KEY = "affine"
SOURCE_KEY = "source"
PREFIX = "kaf:"
PREDICTION = "kaf:prediction"
UNCERTAINTY = "kaf:uncertainty"
KEYPOINTS = "kaf:keypoints"
ATTENTION = "kaf:attention"
ANNOTATION = "kaf:annotation"
LABEL_NAME_HINTS = ("label", "seg", "mask", "annot")


def layer_kwargs(volume: Volume, name: str) -> dict[str, Any]:
    """Keyword arguments of `viewer.add_image` / `add_labels` for a volume read by the core."""
    metadata: dict[str, Any] = {AFFINE_KEY: np.asarray(volume.affine, dtype=np.float64)}
    if volume.source is not None:
        metadata[SOURCE_KEY] = str(volume.source)
    return {"name": name, "scale": tuple(volume.spacing), "metadata": metadata}


def affine_of(
    metadata: Mapping[str, Any] | None, scale: Sequence[float], translate: Sequence[float]
) -> np.ndarray:
    """The voxel (x, y, z) -> RAS affine of a layer: the one it was read with, else one made from its
    scale and translate (given in napari's (z, y, x) order)."""
    if metadata and metadata.get(AFFINE_KEY) is not None:
        affine = np.asarray(metadata[AFFINE_KEY], dtype=np.float64)
        if affine.shape == (4, 4):
            return affine
    scale_zyx = np.asarray(scale, dtype=np.float64)[-3:]
    translate_zyx = np.asarray(translate, dtype=np.float64)[-3:]
    affine = np.eye(4)
    affine[:3, :3] = np.diag(scale_zyx[::-1])
    affine[:3, 3] = translate_zyx[::-1]
    return affine


def volume_from_layer(layer: Any, what: str = "image") -> Volume:
    """A 3D core `Volume` from an image or labels layer; InputDataError for anything else."""
    if layer is None:
        raise InputDataError(f"No {what} layer is chosen: open a 3D scan (File > Open) or a sample first.")
    if getattr(layer, "multiscale", False):
        raise InputDataError(
            f"The {what} layer '{layer.name}' is multiscale; KAF Segment needs a single 3D array."
        )
    if getattr(layer, "rgb", False):
        raise InputDataError(
            f"The {what} layer '{layer.name}' is an RGB picture; KAF Segment needs a 3D scan."
        )
    array = np.asarray(layer.data)
    if array.ndim != 3:
        raise InputDataError(
            f"The {what} layer '{layer.name}' has {array.ndim} dimensions (shape {array.shape}); "
            "KAF Segment needs a 3D volume (z, y, x)."
        )
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise InputDataError(f"The {what} layer '{layer.name}' holds {array.dtype} values, not numbers.")
    return Volume(array, affine_of(layer.metadata, layer.scale, layer.translate))


def grid_kwargs(layer: Any) -> dict[str, Any]:
    """`scale` and `translate` that put a new layer on `layer`'s grid."""
    return {"scale": tuple(layer.scale), "translate": tuple(layer.translate)}


def grid_metadata(layer: Any, **extra: Any) -> dict[str, Any]:
    """Metadata for a layer on `layer`'s grid: its affine (so the writer keeps the geometry) plus `extra`."""
    return {AFFINE_KEY: affine_of(layer.metadata, layer.scale, layer.translate), **extra}


def looks_like_labels(name: str, array: np.ndarray, named: bool = False) -> bool:
    """A file is opened as a Labels layer when it holds whole numbers and its name says it is a label map,
    or (`named`) a colour table beside it names its classes."""
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        return False
    if named:
        return True
    lowered = name.lower()
    return any(hint in lowered for hint in LABEL_NAME_HINTS)


def layer_axis(world_axis: int, viewer_ndim: int, layer_ndim: int) -> int:
    """The layer's own axis for a viewer (world) axis; napari aligns layers on their last axes."""
    return world_axis - (viewer_ndim - layer_ndim)


def keypoints_to_points(keypoints_rc: np.ndarray, slice_index: int, slice_axis: int) -> np.ndarray:
    """(N, 2) (row, col) positions on slice `slice_index` -> (N, 3) napari points in (z, y, x)."""
    rows = np.asarray(keypoints_rc, dtype=np.float64).reshape(-1, 2)
    points = np.insert(rows, slice_axis, float(slice_index), axis=1)
    return points


def slice_selector(slice_axis: int, index: int) -> tuple:
    """The index expression that picks slice `index` along `slice_axis` of a (z, y, x) array."""
    selector: list[Any] = [slice(None)] * 3
    selector[slice_axis] = index
    return tuple(selector)


def slice_indices(shape: Sequence[int], slice_axis: int, index: int) -> tuple[np.ndarray, ...]:
    """Fancy indices of every voxel of one slice (for `Labels.data_setitem`, which records undo)."""
    ranges = [np.arange(side) for side in shape]
    ranges[slice_axis] = np.array([index])
    grids = np.meshgrid(*ranges, indexing="ij")
    return tuple(grid.ravel() for grid in grids)
