"""The layers the plugin draws: prediction, uncertainty, keypoints and attention, on the image's grid.

Each function takes the viewer and a result from the controller and adds or updates (in place, same
layer object, as micro-sam does) one `kaf:` layer. Style choices keep the overlays readable together:
the uncertainty starts hidden and sits under the prediction; the attention map has a colour bar; the
keypoint markers scale with the image and fade while an attention map is shown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd
from napari.layers import Image, Labels, Points

from napari_kaf._controller import AttentionMap, ImageRef
from napari_kaf._label_names import apply_names
from napari_kaf._marshal import (
    ATTENTION,
    KEYPOINTS,
    PREDICTION,
    UNCERTAINTY,
    grid_kwargs,
    grid_metadata,
    keypoints_to_points,
    slice_selector,
)

KEYPOINT_OPACITY = 1.0
KEYPOINT_DIMMED_OPACITY = 0.35  # the attention map under them stays readable
KEYPOINT_SIDE_FRACTION = 1 / 80  # marker diameter as a fraction of the slice's shorter side


def image_ref(layer: Any) -> ImageRef:
    """What the controller keeps of an image layer: the identity of its data, its shape and grid.
    Plugins see layers through napari's PublicOnlyProxy, a new wrapper at every access, so the layer's
    unique_id and the id of its data stand in for identity."""
    return ImageRef(
        source=(layer.unique_id, id(layer.data)),
        shape=tuple(layer.data.shape),
        grid=grid_kwargs(layer),
        grid_metadata=grid_metadata(layer),
    )


def put_layer(viewer: Any, name: str, kind: str, data: np.ndarray, image: ImageRef, **style: Any) -> Any:
    """Update layer `name` in place; add it when missing or of another type or shape."""
    layers = viewer.layers
    metadata = style.pop("metadata", {})
    if name in layers:
        layer = layers[name]
        if isinstance(layer, Labels if kind == "labels" else Image) and layer.data.shape == data.shape:
            layer.data = data
            layer.scale = image.grid["scale"]
            layer.translate = image.grid["translate"]
            layer.metadata.update(metadata)
            if "contrast_limits" in style:
                layer.contrast_limits = style["contrast_limits"]
            return layer
        layers.remove(name)
    add = viewer.add_labels if kind == "labels" else viewer.add_image
    return add(data, name=name, metadata=metadata, **image.grid, **style)


def show_prediction(viewer: Any, outcome: Any, image: ImageRef, show_uncertainty: bool) -> None:
    """The predicted labels, with the uncertainty below them (hidden unless asked for)."""
    active = viewer.layers.selection.active
    uncertainty = put_layer(
        viewer,
        UNCERTAINTY,
        "image",
        outcome.uncertainty,
        image,
        metadata=dict(image.grid_metadata),
        colormap="magma",
        blending="additive",
        contrast_limits=(0.0, 1.0),
        opacity=0.6,
        visible=show_uncertainty,
    )
    prediction = put_layer(
        viewer,
        PREDICTION,
        "labels",
        outcome.labels,
        image,
        metadata=dict(image.grid_metadata),
        opacity=0.5,
    )
    apply_names(prediction, outcome.label_names)  # hover shows "2; class: RV"; the palette's colours
    _keep_below(viewer, uncertainty, prediction)
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active


def _keep_below(viewer: Any, lower: Any, upper: Any) -> None:
    layers = viewer.layers
    lower_index, upper_index = layers.index(lower), layers.index(upper)
    if lower_index > upper_index:
        layers.move(lower_index, upper_index)


def toggle_visible(viewer: Any, name: str) -> bool | None:
    """Show or hide layer `name`; its new visibility, None when there is no such layer."""
    if name not in viewer.layers:
        return None
    layer = viewer.layers[name]
    layer.visible = not layer.visible
    return layer.visible


def keypoint_table(
    explanation: Any, slices: Iterable[int], level: int, head: int
) -> tuple[np.ndarray, pd.DataFrame]:
    """(z, y, x) points and their features (slice, index, score, level, head) for `slices`: the explained
    slice's keypoints from the explanation, the others' from the prepared volume (detected when it was
    predicted)."""
    prepared = explanation.prepared
    blocks, columns = [], {"slice": [], "index": [], "score": []}
    for index in slices:
        if index == explanation.slice_index:
            positions, scores = explanation.keypoints, explanation.scores
        else:
            keypoints = prepared.keypoints(index)
            positions = prepared.layout.points_from_model(keypoints.coords)
            scores = keypoints.scores
        blocks.append(keypoints_to_points(positions, index, prepared.slice_axis))
        columns["slice"].append(np.full(len(positions), index))
        columns["index"].append(np.arange(len(positions)))
        columns["score"].append(np.asarray(scores, dtype=np.float32))
    features = pd.DataFrame({name: np.concatenate(parts) for name, parts in columns.items()})
    features["level"] = level
    features["head"] = head
    return np.concatenate(blocks), features


def keypoint_size(image: ImageRef, slice_axis: int) -> float:
    """Marker diameter in data pixels (napari sizes points in the layer's data units): a fixed share of
    the slice's shorter side, at least one pixel, so a hundred markers cover a small image as little as
    a large one."""
    side = min(image.shape[axis] for axis in range(3) if axis != slice_axis)
    return max(1.0, side * KEYPOINT_SIDE_FRACTION)


def out_of_slice_kwargs() -> dict[str, Any]:
    """Keep keypoints near the current slice visible. napari 0.9 deprecated `out_of_slice_display=True`
    for its exact equivalent, `projection_mode="rescale_linear"`; older napari has only the former."""
    try:
        from napari.layers.points._points_constants import PointsProjectionMode

        if hasattr(PointsProjectionMode, "RESCALE_LINEAR"):
            return {"projection_mode": "rescale_linear"}
    except ImportError:
        pass
    return {"out_of_slice_display": True}


def show_keypoints(
    viewer: Any,
    points: np.ndarray,
    features: pd.DataFrame,
    image: ImageRef,
    metadata: dict[str, Any],
    on_selection: Callable[..., None],
) -> Points:
    """The keypoints layer, coloured by score, active and in select mode so a click picks a keypoint."""
    size = keypoint_size(image, metadata["slice_axis"])
    layers = viewer.layers
    if KEYPOINTS in layers and isinstance(layers[KEYPOINTS], Points):
        layer = layers[KEYPOINTS]
        layer.selected_data = set()
        layer.data = points
        layer.features = features
        layer.face_color = "score"
        layer.size = size
        layer.scale = image.grid["scale"]
        layer.translate = image.grid["translate"]
        layer.metadata.update(metadata)
    else:
        if KEYPOINTS in layers:
            layers.remove(KEYPOINTS)
        layer = viewer.add_points(
            points,
            ndim=3,
            name=KEYPOINTS,
            features=features,
            face_color="score",
            face_colormap="viridis",
            border_color="white",
            border_width=0.1,
            border_width_is_relative=True,
            size=size,
            **out_of_slice_kwargs(),
            metadata=metadata,
            **image.grid,
        )
        selection_events = layer.selected_data.events
        # psygnal's Selection (napari >= 0.6) says items_changed; napari's own said changed.
        if hasattr(selection_events, "items_changed"):
            selection_events.items_changed.connect(on_selection)
        else:
            selection_events.changed.connect(on_selection)
    layers.selection.active = layer
    layer.mode = "select"
    dim_keypoints(viewer)
    return layer


def set_keypoint_features(viewer: Any, level: int, head: int) -> None:
    """Keep the keypoints' level and head columns (shown in the status bar) on the chosen ones."""
    if KEYPOINTS not in viewer.layers:
        return
    layer = viewer.layers[KEYPOINTS]
    features = layer.features.copy()
    features["level"] = level
    features["head"] = head
    layer.features = features


def dim_keypoints(viewer: Any, _event: Any = None) -> None:
    """Fade the keypoint markers while an attention map is shown, so the map under them reads."""
    if KEYPOINTS not in viewer.layers:
        return
    attention_shown = ATTENTION in viewer.layers and viewer.layers[ATTENTION].visible
    viewer.layers[KEYPOINTS].opacity = KEYPOINT_DIMMED_OPACITY if attention_shown else KEYPOINT_OPACITY


def show_attention(
    viewer: Any, attention: AttentionMap, explanation: Any, image: ImageRef, metadata: dict[str, Any]
) -> Image:
    """One keypoint's attention on its slice of a volume-sized map (zero elsewhere), with a colour bar."""
    axis, index = explanation.prepared.slice_axis, explanation.slice_index
    layers = viewer.layers
    metadata = {
        **metadata,
        "level": attention.level,
        "head": attention.head,
        "keypoint": attention.keypoint,
        "slice": index,
        "slice_axis": axis,
    }
    if ATTENTION in layers and layers[ATTENTION].data.shape == image.shape:
        layer = layers[ATTENTION]
        data = layer.data
        previous = layer.metadata.get("slice"), layer.metadata.get("slice_axis")
        if None not in previous:
            data[slice_selector(previous[1], previous[0])] = 0.0
        data[slice_selector(axis, index)] = attention.weights
        layer.scale = image.grid["scale"]
        layer.translate = image.grid["translate"]
        layer.metadata.update(metadata)
        layer.data = data
        layer.refresh()
    else:
        if ATTENTION in layers:
            layers.remove(ATTENTION)
        data = np.zeros(image.shape, dtype=np.float32)
        data[slice_selector(axis, index)] = attention.weights
        layer = viewer.add_image(
            data,
            name=ATTENTION,
            colormap="inferno",
            blending="additive",
            contrast_limits=(0.0, 1.0),
            opacity=0.8,
            metadata=metadata,
            **image.grid,
        )
        layer.colorbar.visible = True
        layer.events.visible.connect(lambda _event: dim_keypoints(viewer))
    if KEYPOINTS in layers:  # markers drawn over the map, and clicks still going to them
        _keep_below(viewer, layer, layers[KEYPOINTS])
        layers.selection.active = layers[KEYPOINTS]
    dim_keypoints(viewer)
    return layer
