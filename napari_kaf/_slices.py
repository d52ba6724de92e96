"""Where the viewer looks: the layer axis its 2D view cuts through, the slice shown, and moving there."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_kaf._marshal import layer_axis


def view_slice_axis(viewer: Any, layer: Any) -> int:
    """The layer axis the 2D view cuts through (0 = z in the default view; 0 in 3D display)."""
    dims = viewer.dims
    if dims.ndisplay != 2 or not dims.not_displayed:
        return 0
    axis = layer_axis(dims.not_displayed[-1], dims.ndim, layer.ndim)
    return axis if 0 <= axis < 3 else 0


def current_slice(viewer: Any, layer: Any, axis: int) -> int:
    position = layer.world_to_data(viewer.dims.point)
    return int(np.clip(round(float(position[axis])), 0, layer.data.shape[axis] - 1))


def go_to_slice(viewer: Any, layer: Any, axis: int, index: int) -> None:
    position = np.asarray(layer.world_to_data(viewer.dims.point), dtype=float)
    position[axis] = index
    world = layer.data_to_world(position)
    viewer.dims.set_point(axis + (viewer.dims.ndim - layer.ndim), float(world[axis]))
