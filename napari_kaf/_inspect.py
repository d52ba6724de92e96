"""The Inspect section: the model's keypoints of a slice as a points layer, and for the keypoint the user
clicks, its attention map at the chosen level and head.

`KeypointInspector` links the section's controls, the keypoints layer and the controller: it asks for
an explanation or an attention map and draws what comes back (through `_layers`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kaf.runtime.errors import InputDataError, KafError
from napari_kaf import _layers, _slices
from napari_kaf._controller import AttentionMap, ImageRef
from napari_kaf._marshal import KEYPOINTS, volume_from_layer
from napari_kaf._panel import NO_KEYPOINT, select_data

if TYPE_CHECKING:
    from napari_kaf._widget import KafWidget


class KeypointInspector:
    def __init__(self, widget: KafWidget) -> None:
        self.widget = widget
        self.viewer = widget.viewer
        self.controller = widget.controller
        self._keypoint_after_explain: int | None = None  # a keypoint clicked on a slice not yet explained
        widget.level_combo.currentIndexChanged.connect(self._on_level_or_head)
        widget.head_spin.valueChanged.connect(self._on_level_or_head)
        widget.keypoint_spin.valueChanged.connect(lambda _value: self._request_attention())
        self.controller.explained.connect(self._on_explained)
        self.controller.attention_ready.connect(self._on_attention)

    def start_explain(self, slice_index: int | None = None) -> bool:
        """Keypoints and attention of `slice_index` (default: the slice in view) on a worker."""
        try:
            image_layer = self.widget.image_layer()
            volume_from_layer(image_layer)
        except KafError as error:
            self.controller.report(error)
            return False
        if slice_index is None:
            axis = self.controller.model_axis(_slices.view_slice_axis(self.viewer, image_layer))
            slice_index = _slices.current_slice(self.viewer, image_layer, axis)
        image = _layers.image_ref(image_layer)
        return self.controller.start_explain(image, slice_index, self.widget.device_name())

    def level_and_head(self) -> tuple[int, int]:
        return self.widget.level_combo.currentData() or 1, self.widget.head_spin.value()

    def _on_explained(self, explanation: Any, image: ImageRef) -> None:
        self._offer_levels(explanation.levels)
        self.widget.head_spin.setMaximum(explanation.heads - 1)
        spin = self.widget.keypoint_spin
        spin.blockSignals(True)
        spin.setRange(NO_KEYPOINT, len(explanation.keypoints) - 1)
        spin.setValue(NO_KEYPOINT)
        spin.blockSignals(False)

        prepared = explanation.prepared
        every_slice = self.widget.all_slices_check.isChecked()
        shown = range(prepared.slice_count) if every_slice else [explanation.slice_index]
        points, features = _layers.keypoint_table(explanation, shown, *self.level_and_head())
        metadata = {"slice": explanation.slice_index, "slice_axis": prepared.slice_axis}
        _layers.show_keypoints(self.viewer, points, features, image, metadata, self._on_selection)
        if self._keypoint_after_explain is not None:
            keypoint, self._keypoint_after_explain = self._keypoint_after_explain, None
            image_layer = self.widget.image_layer()
            _slices.go_to_slice(self.viewer, image_layer, prepared.slice_axis, explanation.slice_index)
            self.select_keypoint(keypoint)

    def _offer_levels(self, levels: list[int]) -> None:
        """The model's levels in the level menu, keeping the chosen one where it still exists."""
        combo = self.widget.level_combo
        level = combo.currentData()
        combo.blockSignals(True)
        combo.clear()
        for value in levels:
            combo.addItem(f"level {value}", value)
        select_data(combo, level)
        combo.blockSignals(False)

    def _on_selection(self, *_args: Any) -> None:
        if KEYPOINTS not in self.viewer.layers:
            return
        layer = self.viewer.layers[KEYPOINTS]
        selected = layer.selected_data
        if not selected:
            return
        row = int(selected.active if selected.active is not None else min(selected))
        keypoint = int(layer.features["index"].iloc[row])
        on_slice = int(layer.features["slice"].iloc[row])
        explanation = self.controller.explanation
        if explanation is not None and on_slice != explanation.slice_index:
            # A keypoint of another slice (all slices shown): explain that slice, then show its attention.
            if self.start_explain(on_slice):
                self._keypoint_after_explain = keypoint
            return
        self.widget.keypoint_spin.setValue(keypoint)

    def select_keypoint(self, keypoint: int, slice_index: int | None = None) -> None:
        """Select keypoint `keypoint` of `slice_index` (default: the explained slice) in the keypoints
        layer, as a click would."""
        layer = self.viewer.layers[KEYPOINTS]
        on_slice = self.controller.explanation.slice_index if slice_index is None else slice_index
        rows = np.flatnonzero((layer.features["slice"] == on_slice) & (layer.features["index"] == keypoint))
        if not len(rows):
            raise InputDataError(f"slice {on_slice} has no keypoint {keypoint} in the keypoints layer")
        layer.selected_data = {int(rows[0])}

    def _on_level_or_head(self, _value: Any = None) -> None:
        _layers.set_keypoint_features(self.viewer, *self.level_and_head())
        self._request_attention()

    def _request_attention(self) -> None:
        self.controller.request_attention(*self.level_and_head(), self.widget.keypoint_spin.value())

    def _on_attention(self, attention: AttentionMap) -> None:
        c = self.controller
        if c.explanation is None or c.explained_image is None:
            return
        metadata = {}
        if c.metadata is not None:
            metadata["model"] = f"{c.metadata.preset} ({c.metadata.method}, {c.metadata.steps} steps)"
        _layers.show_attention(self.viewer, attention, c.explanation, c.explained_image, metadata)
        self.widget.status_label.setText(
            f"Attention of keypoint {attention.keypoint} (slice {c.explanation.slice_index}, level "
            f"{attention.level}, head {attention.head})."
        )
