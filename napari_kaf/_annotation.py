"""The annotation layer: a new empty one on the image's grid, which slices it annotates, whether it looks
like a full labelling rather than a few painted slices, and accepting a predicted slice into it."""

from __future__ import annotations

from typing import Any

import numpy as np
from napari.layers import Labels

from kaf.data.annotation import SparseAnnotation, painted_slices, sparse_annotation
from kaf.runtime.errors import InputDataError
from napari_kaf._marshal import ANNOTATION, grid_kwargs, grid_metadata, slice_indices

# Annotation-layer metadata: [(axis, index)] of slices accepted as they are, background included.
EXPLICIT_SLICES_KEY = "kaf_annotated_slices"


def new_annotation_layer(viewer: Any, image_layer: Any) -> Labels:
    """An empty labels layer on the image's grid: the empty `kaf:annotation` of this image if there is
    one, else a new one (napari numbers the name when `kaf:annotation` is taken). Nothing is removed."""
    shape = tuple(image_layer.data.shape)
    if ANNOTATION in viewer.layers:
        existing = viewer.layers[ANNOTATION]
        if isinstance(existing, Labels) and existing.data.shape == shape and not np.any(existing.data):
            return existing
    return viewer.add_labels(
        np.zeros(shape, dtype=np.uint8),
        name=ANNOTATION,
        metadata=grid_metadata(image_layer),
        **grid_kwargs(image_layer),
    )


def explicit_slices(layer: Any, axis: int) -> list[int]:
    return [index for a, index in layer.metadata.get(EXPLICIT_SLICES_KEY, []) if a == axis]


def annotated_slices(layer: Any, axis: int) -> set[int]:
    """Slices with a painted voxel, plus those accepted explicitly."""
    return set(painted_slices(np.asarray(layer.data), axis)) | set(explicit_slices(layer, axis))


def is_full_labelling(labels: np.ndarray, axis: int) -> bool:
    """Every slice along `axis` is painted: a reference segmentation, not a few annotated slices."""
    count = labels.shape[axis]
    return count > 2 and len(painted_slices(labels, axis)) == count


def full_labelling_warning(layer: Any, axis: int) -> str | None:
    """The warning for a chosen layer that looks like a full labelling; None for a sparse one."""
    labels = np.asarray(layer.data)
    if labels.ndim != 3 or not is_full_labelling(labels, axis):
        return None
    return (
        f"The annotation layer '{layer.name}' has all {labels.shape[axis]} slices painted: it looks like a "
        "full labelling, and fine-tuning would learn from every slice of it. Choose 'New empty layer' (or "
        "press New) to annotate a few slices yourself."
    )


def annotation_for_training(
    layer: Any, shape: tuple[int, ...], axis: int, image_name: str
) -> SparseAnnotation:
    """The painted (and accepted) slices of `layer` as the core's sparse annotation; a copy of the data,
    so painting may go on while the model trains."""
    labels = np.array(layer.data)
    if labels.shape != shape:
        raise InputDataError(
            f"The annotation layer '{layer.name}' has shape {labels.shape} but the image '{image_name}' has "
            f"shape {shape}; paint on a labels layer of the image's shape."
        )
    return sparse_annotation(
        labels, axis, explicit_slices(layer, axis), source=f"The annotation layer '{layer.name}'"
    )


def accept_slice(layer: Any, prediction: np.ndarray, axis: int, index: int) -> None:
    """Copy slice `index` of the prediction into the annotation (undoable: `data_setitem` records it) and
    count it as annotated even where it is all background."""
    if layer.data.shape != prediction.shape:
        raise InputDataError(f"The annotation layer '{layer.name}' has another shape than the prediction.")
    indices = slice_indices(prediction.shape, axis, index)
    layer.data_setitem(indices, prediction[indices].astype(layer.data.dtype))
    explicit = [tuple(pair) for pair in layer.metadata.get(EXPLICIT_SLICES_KEY, [])]
    if (axis, index) not in explicit:
        layer.metadata[EXPLICIT_SLICES_KEY] = [*explicit, (axis, index)]
