"""The KAF Segment dock widget: the panel's controls wired to the session controller and the viewer.

The panel (`_panel`) lays the controls out; the controller (`_controller`) owns the model and runs the
jobs; `_layers` draws their results. This module turns clicks, keys and layer events into requests
(layers read into arrays here, on the GUI thread) and the controller's signals into layers and text.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils import cancelable_progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QComboBox, QFileDialog

from kaf.app.workflow import checked_label_names
from kaf.data.volume_io.label_table import label_color
from kaf.jobs.events import ProgressEvent
from kaf.jobs.finetune import FinetuneSettings
from kaf.runtime.devices import cpu_warning, resolve_device
from kaf.runtime.errors import DeviceError, InputDataError, KafError
from napari_kaf import _annotation, _layers, _slices
from napari_kaf._checkpoints import FILE_CHOICE, checkpoint_path
from napari_kaf._controller import ImageRef, KafController, describe_event
from napari_kaf._inspect import KeypointInspector
from napari_kaf._label_names import apply_names, format_names, layer_names, numbered, parse_names
from napari_kaf._marshal import ANNOTATION, PREDICTION, PREFIX, UNCERTAINTY, volume_from_layer
from napari_kaf._panel import NEW_ANNOTATION, KafPanel, select_data
from napari_kaf._shortcuts import bind_shortcuts
from napari_kaf._suggest import next_slice_to_label

if TYPE_CHECKING:
    import napari


class KafWidget(KafPanel):
    """Annotate a few slices, fine-tune a KAF model, segment the volume and look inside the model."""

    def __init__(self, napari_viewer: napari.viewer.Viewer, controller: KafController | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.controller = controller or KafController()
        self._progress: Any = None
        self._chosen_layers: tuple[str, str] | None = None  # (image, annotation) the class names are for
        self._connect_controls()
        self._connect_controller()
        self.inspector = KeypointInspector(self)
        self._watch_layers()
        self._unbind_shortcuts = bind_shortcuts(self.viewer, self.actions())
        self._update_device_warning()
        self._update_checkpoint_row()

    def actions(self) -> dict[str, Any]:
        """The actions that have keyboard shortcuts, by the name `_shortcuts` gives them."""
        return {
            "finetune": self.on_finetune_clicked,
            "accept": self.accept_prediction,
            "next_slice": self.go_to_next_slice,
            "keypoints": self.on_keypoints_clicked,
            "toggle_prediction": lambda: _layers.toggle_visible(self.viewer, PREDICTION),
            "toggle_uncertainty": self.uncertainty_check.toggle,
        }

    def _connect_controls(self) -> None:
        # Qt's clicked(bool) would land in a method's first parameter: every slot here takes none.
        self.new_annotation_button.clicked.connect(lambda: self.new_annotation_layer())
        self.browse_button.clicked.connect(lambda: self.browse_checkpoint())
        self.finetune_button.clicked.connect(lambda: self.on_finetune_clicked())
        self.predict_button.clicked.connect(lambda: self.on_predict_clicked())
        self.next_slice_button.clicked.connect(lambda: self.go_to_next_slice())
        self.accept_button.clicked.connect(lambda: self.accept_prediction())
        self.keypoints_button.clicked.connect(lambda: self.on_keypoints_clicked())
        self.save_segmentation_button.clicked.connect(lambda: self.save_segmentation())
        self.save_checkpoint_button.clicked.connect(lambda: self.save_checkpoint())
        self.uncertainty_check.toggled.connect(self._show_uncertainty)
        self.annotation_combo.currentIndexChanged.connect(self._on_annotation_chosen)
        self.device_combo.currentIndexChanged.connect(self._update_device_warning)
        self.steps_spin.valueChanged.connect(self._update_device_warning)
        self.checkpoint_combo.currentIndexChanged.connect(self._update_checkpoint_row)
        self.image_combo.currentIndexChanged.connect(lambda _index: self._on_layers_chosen())
        self.annotation_combo.currentIndexChanged.connect(lambda _index: self._on_layers_chosen())
        self.classes_edit.editingFinished.connect(lambda: self.on_classes_edited())
        self.paint_class_combo.currentIndexChanged.connect(lambda _index: self.on_paint_class_chosen())

    def _connect_controller(self) -> None:
        c = self.controller
        c.notified.connect(self._notify)
        c.busy_changed.connect(self._set_busy)
        c.progressed.connect(self._on_progress)
        c.predicted.connect(self._on_predicted)

    def _watch_layers(self) -> None:
        events = self.viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved):
            emitter.connect(self._refresh_layer_choices)
        events.inserted.connect(lambda event: self._watch_layer(event.value))
        events.removed.connect(lambda _event: _layers.dim_keypoints(self.viewer))
        for layer in self.viewer.layers:
            self._watch_layer(layer)
        self._refresh_layer_choices()

    def _watch_layer(self, layer: Any) -> None:
        layer.events.name.connect(self._refresh_layer_choices)
        if isinstance(layer, Labels):  # napari's own label control moves the Paint class menu
            layer.events.selected_label.connect(self._on_selected_label)

    def closeEvent(self, event: Any) -> None:
        """A closed panel stops its job (a worker left running would outlive the viewer) and frees keys."""
        self.controller.stop()
        self._unbind_shortcuts()
        super().closeEvent(event)

    # --- messages and progress -------------------------------------------------------------------------

    def _notify(self, severity: str, text: str) -> None:
        if severity != "warning":
            self.status_label.setText(text)
        if severity == "error":
            show_error(text)
        elif severity == "warning":
            show_warning(text)
        elif severity == "info":
            show_info(text)

    def _set_busy(self, busy: bool) -> None:
        job = self.controller.job
        running = job.key if busy and job is not None else None
        for key, button in self.job_buttons().items():
            button.setEnabled(running is None or key == running)
            button.setText("Stop" if key == running else button.property("idle_text"))
        self.progress_bar.setRange(0, 0 if busy else 1)
        self.progress_bar.setValue(0)
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if running is not None:
            self._progress = cancelable_progress(
                total=0, desc=f"KAF Segment: {job.name}", cancel_callback=self.controller.stop
            )
        else:
            self._update_device_warning()  # a fine-tune that just ended has measured its step time

    def _on_progress(self, event: ProgressEvent) -> None:
        text = describe_event(event)
        self.status_label.setText(text)
        if event.total > 0:
            self.progress_bar.setRange(0, event.total)
            self.progress_bar.setValue(min(event.step, event.total))
        progress = self._progress
        if progress is not None:
            if progress.total != event.total:
                progress.total = event.total
                progress.n = 0
            progress.update(max(0, event.step - progress.n))
            progress.set_description(text)

    # --- layer choices ---------------------------------------------------------------------------------

    def _refresh_layer_choices(self, _event: Any = None) -> None:
        layers = self.viewer.layers
        images = [x.name for x in layers if isinstance(x, Image) and not x.name.startswith(PREFIX)]
        labels = [x.name for x in layers if isinstance(x, Labels) and x.name != PREDICTION]
        _fill(self.image_combo, images)
        # Never a layer the user did not choose (a hidden reference labelling, say): a new empty one.
        _fill(self.annotation_combo, [NEW_ANNOTATION, *labels], prefer=ANNOTATION)
        self._on_layers_chosen()

    def image_layer(self) -> Any:
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise InputDataError(
                "No image is open: open a 3D scan (File > Open) or a sample (File > Open Sample)."
            )
        return self.viewer.layers[name]

    def annotation_layer(self, create: bool = False) -> Any:
        """The chosen annotation layer; with `create`, a new empty one when 'New empty layer' is chosen."""
        name = self.annotation_combo.currentText()
        if name != NEW_ANNOTATION and name in self.viewer.layers:
            return self.viewer.layers[name]
        return self.new_annotation_layer() if create else None

    def new_annotation_layer(self) -> Any:
        """An empty labels layer on the image's grid, chosen, selected and in paint mode."""
        try:
            image_layer = self.image_layer()
            volume_from_layer(image_layer)
        except KafError as error:
            self.controller.report(error)
            return None
        layer = _annotation.new_annotation_layer(self.viewer, image_layer)
        names = self._typed_names(report=False)
        if names:
            apply_names(layer, names)
        if self.paint_class_combo.currentData():
            layer.selected_label = self.paint_class_combo.currentData()
        self.annotation_combo.setCurrentText(layer.name)
        self.viewer.layers.selection.active = layer
        layer.mode = "paint"
        return layer

    def _on_annotation_chosen(self, _index: int) -> None:
        layer = self.annotation_layer()
        if layer is None:
            return
        warning = _annotation.full_labelling_warning(layer, self._view_axis(layer))
        if warning:
            self._notify("warning", warning)

    # --- class names -----------------------------------------------------------------------------------

    def _on_layers_chosen(self) -> None:
        """Another image or annotation layer: the Classes field takes its names (see `default_names`)."""
        chosen = (self.image_combo.currentText(), self.annotation_combo.currentText())
        if chosen == self._chosen_layers:
            return
        self._chosen_layers = chosen
        self.classes_edit.setText(format_names(self.default_names()))
        self.on_classes_edited(report=False)

    def default_names(self) -> list[str] | None:
        """The annotation layer's names, else the image layer's, else the session model's; None: numbered."""
        image = self.viewer.layers[self.image_combo.currentText()] if self._has_image() else None
        return layer_names(self.annotation_layer()) or layer_names(image) or self.controller.label_names()

    def _has_image(self) -> bool:
        return bool(self.image_combo.currentText()) and self.image_combo.currentText() in self.viewer.layers

    def _typed_names(self, report: bool = True) -> list[str] | None:
        """The names in the Classes field (None: empty or, unreported, unusable)."""
        try:
            return parse_names(self.classes_edit.text())
        except KafError as error:
            if report:
                self.controller.report(error)
            return None

    def on_classes_edited(self, report: bool = True) -> None:
        """Typed names go to the annotation layer (status bar, colours, what its writer saves) and the
        Paint class menu."""
        names = self._typed_names(report)
        layer = self.annotation_layer()
        if names and layer is not None and names != layer_names(layer):
            apply_names(layer, names)
        self._refresh_paint_classes()

    def _refresh_paint_classes(self) -> None:
        """One entry per class after background, 'k: name', whose data is its label value k."""
        layer = self.annotation_layer()
        selected = int(layer.selected_label) if layer is not None else self.paint_class_combo.currentData()
        names = self._typed_names(report=False) or numbered(max(3, (selected or 0) + 1))
        if selected is not None and selected >= len(names):
            names = [*names, *numbered(selected + 1)[len(names) :]]
        combo = self.paint_class_combo
        combo.blockSignals(True)
        combo.clear()
        for value, name in enumerate(names[1:], start=1):
            combo.addItem(_swatch(label_color(value)), f"{value}: {name}", value)
        select_data(combo, selected or 1)
        combo.blockSignals(False)

    def on_paint_class_chosen(self) -> None:
        """The chosen class becomes the annotation layer's label to paint."""
        value = self.paint_class_combo.currentData()
        layer = self.annotation_layer()
        if value is not None and layer is not None and layer.selected_label != value:
            layer.selected_label = value

    def _on_selected_label(self, event: Any) -> None:
        layer = event.source
        chosen = layer is not None and layer.name == self.annotation_combo.currentText()
        if chosen and self.paint_class_combo.currentData() != layer.selected_label:
            self._refresh_paint_classes()

    # --- devices and checkpoints -----------------------------------------------------------------------

    def device_name(self) -> str:
        return self.device_combo.currentData() or "auto"

    def _update_device_warning(self, _value: int = 0) -> None:
        """The CPU note and, once a fine-tune has run on the chosen device, its measured step time."""
        try:
            warning = cpu_warning(resolve_device(self.device_name()))
        except DeviceError as error:
            warning = str(error)
        measured = self.controller.step_times.get(self.device_name())
        notes = [warning, measured.describe(self.steps_spin.value()) if measured else None]
        text = " ".join(note for note in notes if note)
        self.cpu_warning_label.setText(text)
        self.cpu_warning_label.setVisible(bool(text))

    def _update_checkpoint_row(self, _index: int = 0) -> None:
        self.checkpoint_row.setVisible(self.checkpoint_combo.currentData() == FILE_CHOICE)

    def browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a KAF checkpoint", "", "KAF checkpoint (*.safetensors)"
        )
        if path:
            self.checkpoint_edit.setText(path)
            select_data(self.checkpoint_combo, FILE_CHOICE)

    def chosen_checkpoint(self) -> Path | None:
        return checkpoint_path(self.checkpoint_combo.currentData(), self.checkpoint_edit.text())

    def finetune_settings(self) -> FinetuneSettings:
        return FinetuneSettings(
            preset=self.preset_combo.currentText(),
            steps=self.steps_spin.value(),
            time_budget=float(self.time_budget_spin.value()) if self.time_budget_check.isChecked() else None,
            batch_size=self.batch_spin.value(),
            crop_size=self.crop_spin.value(),
            device=self.device_name(),
        )

    # --- fine-tune and predict -------------------------------------------------------------------------

    def _view_axis(self, layer: Any) -> int:
        return _slices.view_slice_axis(self.viewer, layer)

    def _stop_or_start(self, key: str, start: Any) -> None:
        """A job's button (and shortcut) is its Stop while that job runs."""
        if self.controller.running(key):
            self.controller.stop()
        else:
            start()

    def on_finetune_clicked(self) -> None:
        self._stop_or_start("finetune", self.start_finetune)

    def start_finetune(self) -> bool:
        if self.controller.refuse_if_busy():
            return False
        try:
            image_layer = self.image_layer()
            volume = volume_from_layer(image_layer)
            annotation_layer = self.annotation_layer(create=True)
            if annotation_layer is None:
                return False
            axis = self._view_axis(image_layer)
            annotation = _annotation.annotation_for_training(
                annotation_layer, volume.shape, axis, image_layer.name
            )
            names = checked_label_names(parse_names(self.classes_edit.text()), annotation.classes)
            settings, checkpoint = self.finetune_settings(), self.chosen_checkpoint()
        except KafError as error:
            self.controller.report(error)
            return False
        warning = _annotation.full_labelling_warning(annotation_layer, axis)
        if warning:
            self._notify("warning", warning)
        adapt = float(self.adapt_spin.value()) if self.adapt_check.isChecked() else None
        return self.controller.start_finetune(
            volume,
            annotation,
            settings,
            checkpoint,
            _layers.image_ref(image_layer),
            adapt,
            self.predict_after_check.isChecked(),
            names,
        )

    def on_predict_clicked(self) -> None:
        self._stop_or_start("predict", self.start_predict)

    def start_predict(self) -> bool:
        if self.controller.refuse_if_busy():
            return False
        try:
            image_layer = self.image_layer()
            volume = volume_from_layer(image_layer)
            checkpoint = None if self.controller.model is not None else self.chosen_checkpoint()
        except KafError as error:
            self.controller.report(error)
            return False
        image = _layers.image_ref(image_layer)
        return self.controller.start_predict(volume, image, checkpoint, self.device_name())

    def _on_predicted(self, outcome: Any, image: ImageRef) -> None:
        _layers.show_prediction(self.viewer, outcome, image, self.uncertainty_check.isChecked())
        if not self.classes_edit.text().strip():  # the model's names (a checkpoint's) fill an empty field
            self.classes_edit.setText(format_names(outcome.label_names))
            self.on_classes_edited(report=False)

    def _show_uncertainty(self, visible: bool) -> None:
        if UNCERTAINTY in self.viewer.layers:
            self.viewer.layers[UNCERTAINTY].visible = visible

    # --- next slice and accepting the prediction -------------------------------------------------------

    def _prediction_arrays(self, image_layer: Any) -> tuple[np.ndarray, np.ndarray]:
        if PREDICTION not in self.viewer.layers:
            raise InputDataError("There is no prediction yet: fine-tune and predict first.")
        prediction = np.asarray(self.viewer.layers[PREDICTION].data)
        if prediction.shape != tuple(image_layer.data.shape):
            raise InputDataError(
                f"The prediction has shape {prediction.shape} but the image '{image_layer.name}' has shape "
                f"{tuple(image_layer.data.shape)}: predict this image first."
            )
        layers = self.viewer.layers
        if UNCERTAINTY in layers and layers[UNCERTAINTY].data.shape == prediction.shape:
            return prediction, np.asarray(layers[UNCERTAINTY].data)
        uncertainty = self.controller.uncertainty
        if uncertainty is not None and uncertainty.shape == prediction.shape:
            return prediction, uncertainty
        raise InputDataError("There is no uncertainty for this prediction: predict again.")

    def go_to_next_slice(self) -> int | None:
        """Move the view to the unannotated slice the model is least sure about; returns its index."""
        try:
            image_layer = self.image_layer()
            prediction, uncertainty = self._prediction_arrays(image_layer)
        except KafError as error:
            self.controller.report(error)
            return None
        axis = self.controller.model_axis(self._view_axis(image_layer))
        annotation_layer = self.annotation_layer()
        annotated: set[int] = set()
        if annotation_layer is not None and annotation_layer.data.shape == prediction.shape:
            annotated = _annotation.annotated_slices(annotation_layer, axis)
        index = next_slice_to_label(uncertainty, prediction, annotated, axis)
        if index is None:
            self._notify("info", "Every slice is annotated already.")
            return None
        _slices.go_to_slice(self.viewer, image_layer, axis, index)
        self._notify("status", f"Slice {index} is the most uncertain unannotated slice: annotate it next.")
        if annotation_layer is not None:
            self.viewer.layers.selection.active = annotation_layer
        return index

    def accept_prediction(self) -> int | None:
        """Copy the prediction of the current slice into the annotation (undoable with Ctrl+Z)."""
        try:
            image_layer = self.image_layer()
            prediction, _ = self._prediction_arrays(image_layer)
            annotation_layer = self.annotation_layer(create=True)
            if annotation_layer is None:
                return None
            axis = self.controller.model_axis(self._view_axis(image_layer))
            index = _slices.current_slice(self.viewer, image_layer, axis)
            _annotation.accept_slice(annotation_layer, prediction, axis, index)
        except KafError as error:
            self.controller.report(error)
            return None
        self._notify("status", f"Slice {index}: the prediction is now part of the annotation.")
        return index

    # --- inspect -------------------------------------------------------------------------------------

    def on_keypoints_clicked(self) -> None:
        self._stop_or_start("explain", self.inspector.start_explain)

    # --- saving ----------------------------------------------------------------------------------------

    def save_segmentation(self, path: str | None = None) -> list[str]:
        """Write the prediction through the plugin's writer (NIfTI or NRRD, with the image's affine)."""
        if PREDICTION not in self.viewer.layers:
            self.controller.report("There is no segmentation to save yet: fine-tune and predict first.")
            return []
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Save the segmentation", "segmentation.nii.gz", "NIfTI (*.nii.gz *.nii);;NRRD (*.nrrd)"
            )
            if not path:
                return []
        try:
            written = self.viewer.layers[PREDICTION].save(str(path), plugin="napari-kaf")
        except Exception as error:  # the writer's own errors, whatever they are, become one message
            self.controller.report(f"Could not save the segmentation to {path}: {error}")
            return []
        if not written:
            self.controller.report(
                f"Could not save the segmentation to {path}: use a .nii.gz, .nii or .nrrd name."
            )
            return []
        self._notify("status", f"Saved the segmentation to {written[0]}.")
        return list(written)

    def save_checkpoint(self, path: str | None = None) -> bool:
        """Write the fine-tuned model (safetensors with its metadata) on a worker thread."""
        if self.controller.model is None:
            self.controller.report("There is no fine-tuned model to save yet: fine-tune first.")
            return False
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Save the fine-tuned model", "model.safetensors", "KAF checkpoint (*.safetensors)"
            )
            if not path:
                return False
        return self.controller.start_save_checkpoint(Path(path))


def _swatch(rgb: tuple[int, int, int]) -> QIcon:
    """A small square of a class's colour (the palette's, as drawn in the layers)."""
    pixmap = QPixmap(12, 12)
    pixmap.fill(QColor(*rgb))
    return QIcon(pixmap)


def _fill(combo: QComboBox, names: list[str], prefer: str | None = None) -> None:
    """Replace the entries of `combo`, keeping its choice when it is still there, else `prefer`."""
    current = combo.currentText()
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(names)
    if current in names:
        combo.setCurrentText(current)
    elif prefer in names:
        combo.setCurrentText(prefer)
    combo.blockSignals(False)
