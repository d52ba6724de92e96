"""The KAF Segment dock widget: annotate, fine-tune, predict, suggest the next slice, inspect, save.

The widget only marshals layers <-> arrays and starts the core's jobs on napari worker threads
(`napari_kaf._jobs`); results come back through the worker's signals and become layers here, on the
GUI thread. Child controls are attributes, so tests set values and call the handlers directly.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from napari.layers import Image, Labels, Points
from napari.qt.threading import create_worker
from napari.utils import cancelable_progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from kaf.app.workflow import TrainedModel
from kaf.data.annotation import painted_slices, sparse_annotation
from kaf.jobs.events import CancelToken, ProgressEvent
from kaf.jobs.finetune import FinetuneSettings
from kaf.models.config import PRESETS
from kaf.runtime.devices import available_devices, cpu_warning, is_out_of_memory, resolve_device
from kaf.runtime.errors import DeviceError, InputDataError, JobCancelled, KafError
from napari_kaf import _jobs
from napari_kaf._checkpoints import FILE_CHOICE, checkpoint_path, menu_entries
from napari_kaf._marshal import (
    ANNOTATION,
    ATTENTION,
    KEYPOINTS,
    PREDICTION,
    PREFIX,
    UNCERTAINTY,
    grid_kwargs,
    grid_metadata,
    keypoints_to_points,
    layer_axis,
    slice_indices,
    slice_selector,
    volume_from_layer,
)
from napari_kaf._settings import PluginSettings
from napari_kaf._suggest import next_slice_to_label

if TYPE_CHECKING:
    import napari

LOG = logging.getLogger(__name__)
EXPLICIT_SLICES_KEY = (
    "kaf_annotated_slices"  # annotation-layer metadata: [(axis, index)] accepted as background
)
NO_KEYPOINT = -1


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "estimating time left"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s left"
    return f"{seconds // 60} min {seconds % 60:02d} s left"


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


def _side_by_side(switch: QCheckBox, amount: QSpinBox) -> QHBoxLayout:
    """A check box that enables an option and the spin box that sets its amount, on one form row."""
    row = QHBoxLayout()
    row.addWidget(switch)
    row.addWidget(amount, 1)
    return row


def describe_event(event: ProgressEvent) -> str:
    """One line for the progress bar and the status label."""
    if event.stage == "finetune":
        loss = f", loss {event.loss:.3f}" if event.loss is not None else ""
        text = f"Fine-tuning: step {event.step}/{event.total}{loss}, {_format_seconds(event.remaining)}"
        return f"{text} ({event.message})" if event.message else text
    if event.stage == "predict":
        return f"Predicting: slice {event.step}/{event.total}, {_format_seconds(event.remaining)}"
    if event.message:
        return event.message[0].upper() + event.message[1:]
    return f"{event.stage} {event.step}/{event.total}"


class KafWidget(QWidget):
    """Annotate a few slices, fine-tune a KAF model, segment the volume and look inside the model."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.settings = PluginSettings()
        # The running job (one at a time) and what it needs when it ends.
        self._worker: Any = None
        self._job_name = ""
        self._job_button: QPushButton | None = None
        self._job_grid: dict[str, Any] = {}
        self._job_grid_metadata: dict[str, Any] = {}
        self._job_source: tuple[Any, int] | None = None  # (unique_id, id(data)) of the job's image layer
        self._cancel: CancelToken | None = None
        self._progress: Any = None
        self._follow_up: Any = None
        self.last_event: ProgressEvent | None = None
        # The session's model and the prepared image it last saw.
        self._model: Any = None
        self._metadata: Any = None
        self._prepared: Any = None
        # (unique_id, id of its data) of the image layer it came from. Plugins see layers through napari's
        # PublicOnlyProxy, a new wrapper at every access, so identity and weak references cannot be used.
        self._prepared_source: tuple[Any, int] | None = None
        self._uncertainty: np.ndarray | None = None
        # Inspection state.
        self._explanation: Any = None
        self._explained_shape: tuple[int, ...] | None = None
        self._explained_grid: dict[str, Any] = {}
        self._attention_worker: Any = None
        self._attention_pending = False
        self._keypoint_after_explain: int | None = None  # a keypoint clicked on a slice not yet explained

        self._build_ui()
        self._restore_settings()
        self._connect_settings()
        self._refresh_layer_choices()
        for emitter in (
            self.viewer.layers.events.inserted,
            self.viewer.layers.events.removed,
            self.viewer.layers.events.moved,
        ):
            emitter.connect(self._refresh_layer_choices)
        self.viewer.layers.events.inserted.connect(self._watch_name)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._refresh_layer_choices)
        self._update_device_warning()
        self._update_checkpoint_row()

    # --- building the panel ------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)

        data = QGroupBox("Data")
        form = QFormLayout(data)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The 3D scan to segment")
        form.addRow("Image", self.image_combo)
        self.annotation_combo = QComboBox()
        self.annotation_combo.setToolTip("The labels layer you paint a few slices in")
        self.new_annotation_button = QPushButton("New")
        self.new_annotation_button.setToolTip(f"Add an empty '{ANNOTATION}' labels layer and start painting")
        row = QHBoxLayout()
        row.addWidget(self.annotation_combo, 1)
        row.addWidget(self.new_annotation_button)
        form.addRow("Annotation", row)
        layout.addWidget(data)

        model = QGroupBox("Model")
        form = QFormLayout(model)
        self.checkpoint_combo = QComboBox()
        for key, label in menu_entries():
            self.checkpoint_combo.addItem(label, key)
        form.addRow("Checkpoint", self.checkpoint_combo)
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("path/to/model.safetensors")
        self.browse_button = QPushButton("Browse...")
        self.checkpoint_row = QWidget()
        row = QHBoxLayout(self.checkpoint_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.checkpoint_edit, 1)
        row.addWidget(self.browse_button)
        form.addRow("", self.checkpoint_row)
        self.preset_combo = QComboBox()
        self.preset_combo.addItems(list(PRESETS))
        form.addRow("Preset", self.preset_combo)
        self.device_combo = QComboBox()
        for name, label in available_devices():
            self.device_combo.addItem(label, name)
        form.addRow("Device", self.device_combo)
        self.cpu_warning_label = QLabel()
        self.cpu_warning_label.setWordWrap(True)
        self.cpu_warning_label.setStyleSheet("color: #e0a030;")
        form.addRow(self.cpu_warning_label)
        layout.addWidget(model)

        train = QGroupBox("Fine-tune")
        form = QFormLayout(train)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100_000)
        form.addRow("Steps", self.steps_spin)
        self.time_budget_check = QCheckBox("Stop after")
        self.time_budget_spin = QSpinBox()
        self.time_budget_spin.setRange(1, 36_000)
        self.time_budget_spin.setSuffix(" s")
        form.addRow("Time budget", _side_by_side(self.time_budget_check, self.time_budget_spin))
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 64)
        form.addRow("Batch size", self.batch_spin)
        self.crop_spin = QSpinBox()
        self.crop_spin.setRange(16, 1024)
        self.crop_spin.setSingleStep(16)
        self.crop_spin.setToolTip("Training crop side in pixels (a multiple of 16)")
        form.addRow("Crop size", self.crop_spin)
        self.adapt_check = QCheckBox("Adapt to this image first for")
        self.adapt_check.setToolTip(
            "A short self-supervised KAF pretraining on the open image (no labels) before fine-tuning"
        )
        self.adapt_spin = QSpinBox()
        self.adapt_spin.setRange(5, 36_000)
        self.adapt_spin.setSuffix(" s")
        form.addRow("Adapt", _side_by_side(self.adapt_check, self.adapt_spin))
        self.predict_after_check = QCheckBox("Predict the volume when done")
        form.addRow(self.predict_after_check)
        self.finetune_button = QPushButton("Fine-tune")
        form.addRow(self.finetune_button)
        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(False)
        self.progress_bar.setValue(0)
        form.addRow(self.progress_bar)
        self.status_label = QLabel("Paint a few slices, then fine-tune.")
        self.status_label.setWordWrap(True)
        form.addRow(self.status_label)
        layout.addWidget(train)

        predict = QGroupBox("Predict")
        form = QFormLayout(predict)
        self.predict_button = QPushButton("Predict volume")
        form.addRow(self.predict_button)
        self.uncertainty_check = QCheckBox(f"Show uncertainty ({UNCERTAINTY})")
        form.addRow(self.uncertainty_check)
        self.next_slice_button = QPushButton("Next slice to label")
        self.next_slice_button.setToolTip(
            "Go to the unannotated slice whose predicted structure the model is least sure about"
        )
        self.accept_button = QPushButton("Accept prediction on this slice")
        self.accept_button.setToolTip(
            "Copy the prediction of the current slice into the annotation (Ctrl+Z undoes)"
        )
        form.addRow(self.next_slice_button)
        form.addRow(self.accept_button)
        layout.addWidget(predict)

        inspect = QGroupBox("Inspect")
        form = QFormLayout(inspect)
        self.keypoints_button = QPushButton("Show keypoints of this slice")
        form.addRow(self.keypoints_button)
        self.all_slices_check = QCheckBox("Keypoints of all slices")
        self.all_slices_check.setToolTip(
            "Show every slice's keypoints; clicking one on another slice explains that slice first"
        )
        form.addRow(self.all_slices_check)
        self.level_combo = QComboBox()
        for level in (1, 2, 3, 4):
            self.level_combo.addItem(f"level {level}", level)
        form.addRow("Attention level", self.level_combo)
        self.head_spin = QSpinBox()
        self.head_spin.setRange(0, 3)
        form.addRow("Head", self.head_spin)
        self.keypoint_spin = QSpinBox()
        self.keypoint_spin.setRange(NO_KEYPOINT, NO_KEYPOINT)
        self.keypoint_spin.setSpecialValueText("click a keypoint")
        form.addRow("Keypoint", self.keypoint_spin)
        layout.addWidget(inspect)

        save = QGroupBox("Save")
        row = QHBoxLayout(save)
        self.save_segmentation_button = QPushButton("Segmentation...")
        self.save_checkpoint_button = QPushButton("Checkpoint...")
        row.addWidget(self.save_segmentation_button)
        row.addWidget(self.save_checkpoint_button)
        layout.addWidget(save)
        layout.addStretch(1)
        for button in self._job_buttons():
            button.setProperty("idle_text", button.text())

        self.new_annotation_button.clicked.connect(self.new_annotation_layer)
        self.browse_button.clicked.connect(self.browse_checkpoint)
        self.finetune_button.clicked.connect(self.on_finetune_clicked)
        self.predict_button.clicked.connect(self.on_predict_clicked)
        self.next_slice_button.clicked.connect(self.go_to_next_slice)
        self.accept_button.clicked.connect(self.accept_prediction)
        self.keypoints_button.clicked.connect(self.on_keypoints_clicked)
        self.save_segmentation_button.clicked.connect(lambda: self.save_segmentation())
        self.save_checkpoint_button.clicked.connect(lambda: self.save_checkpoint())
        self.uncertainty_check.toggled.connect(self._show_uncertainty)
        self.level_combo.currentIndexChanged.connect(self._on_level_or_head)
        self.head_spin.valueChanged.connect(self._on_level_or_head)
        self.keypoint_spin.valueChanged.connect(lambda _value: self.request_attention())
        self.device_combo.currentIndexChanged.connect(self._update_device_warning)
        self.checkpoint_combo.currentIndexChanged.connect(self._update_checkpoint_row)

    # --- remembered settings -----------------------------------------------------------------------------

    def _restore_settings(self) -> None:
        s = self.settings
        self._select_data(self.checkpoint_combo, s.get("checkpoint"))
        self.checkpoint_edit.setText(s.get("checkpoint_file"))
        self.preset_combo.setCurrentText(s.get("preset") if s.get("preset") in PRESETS else "interactive")
        self._select_data(self.device_combo, s.get("device"))
        self.steps_spin.setValue(s.get("steps"))
        self.time_budget_check.setChecked(s.get("use_time_budget"))
        self.time_budget_spin.setValue(s.get("time_budget"))
        self.batch_spin.setValue(s.get("batch_size"))
        self.crop_spin.setValue(s.get("crop_size"))
        self.adapt_check.setChecked(s.get("adapt"))
        self.adapt_spin.setValue(s.get("adapt_seconds"))
        self.predict_after_check.setChecked(s.get("predict_after"))
        self.all_slices_check.setChecked(s.get("all_slices"))
        self.uncertainty_check.setChecked(s.get("show_uncertainty"))
        self._select_data(self.level_combo, s.get("level"))
        self.head_spin.setValue(s.get("head"))

    @staticmethod
    def _select_data(combo: QComboBox, value: Any) -> None:
        index = combo.findData(value)
        if index >= 0:
            combo.setCurrentIndex(index)

    def _connect_settings(self) -> None:
        s = self.settings
        self.checkpoint_combo.currentIndexChanged.connect(
            lambda _i: s.set("checkpoint", self.checkpoint_combo.currentData())
        )
        self.checkpoint_edit.textChanged.connect(lambda text: s.set("checkpoint_file", text))
        self.preset_combo.currentTextChanged.connect(lambda text: s.set("preset", text))
        self.device_combo.currentIndexChanged.connect(
            lambda _i: s.set("device", self.device_combo.currentData())
        )
        self.steps_spin.valueChanged.connect(lambda value: s.set("steps", value))
        self.time_budget_check.toggled.connect(lambda value: s.set("use_time_budget", value))
        self.time_budget_spin.valueChanged.connect(lambda value: s.set("time_budget", value))
        self.batch_spin.valueChanged.connect(lambda value: s.set("batch_size", value))
        self.crop_spin.valueChanged.connect(lambda value: s.set("crop_size", value))
        self.adapt_check.toggled.connect(lambda value: s.set("adapt", value))
        self.adapt_spin.valueChanged.connect(lambda value: s.set("adapt_seconds", value))
        self.predict_after_check.toggled.connect(lambda value: s.set("predict_after", value))
        self.all_slices_check.toggled.connect(lambda value: s.set("all_slices", value))
        self.uncertainty_check.toggled.connect(lambda value: s.set("show_uncertainty", value))
        self.level_combo.currentIndexChanged.connect(
            lambda _i: s.set("level", self.level_combo.currentData())
        )
        self.head_spin.valueChanged.connect(lambda value: s.set("head", value))

    # --- layer choices -----------------------------------------------------------------------------------

    def _refresh_layer_choices(self, event: Any = None) -> None:
        images = [
            layer.name
            for layer in self.viewer.layers
            if isinstance(layer, Image) and not layer.name.startswith(PREFIX)
        ]
        labels = [
            layer.name
            for layer in self.viewer.layers
            if isinstance(layer, Labels) and layer.name != PREDICTION
        ]
        self._fill(self.image_combo, images)
        self._fill(self.annotation_combo, labels, prefer=ANNOTATION)

    def _watch_name(self, event: Any) -> None:
        event.value.events.name.connect(self._refresh_layer_choices)

    @staticmethod
    def _fill(combo: QComboBox, names: list[str], prefer: str | None = None) -> None:
        current = combo.currentText()
        combo.blockSignals(True)
        combo.clear()
        combo.addItems(names)
        if current in names:
            combo.setCurrentText(current)
        elif prefer in names:
            combo.setCurrentText(prefer)
        combo.blockSignals(False)

    def image_layer(self) -> Any:
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise InputDataError(
                "No image is open: open a 3D scan (File > Open) or a sample (File > Open Sample)."
            )
        return self.viewer.layers[name]

    def annotation_layer(self, image_layer: Any = None, create: bool = False) -> Any:
        name = self.annotation_combo.currentText()
        if name and name in self.viewer.layers:
            return self.viewer.layers[name]
        if not create:
            return None
        return self.new_annotation_layer(image_layer)

    def new_annotation_layer(self, image_layer: Any = None) -> Any:
        """An empty labels layer on the image's grid, selected and in paint mode."""
        try:
            image_layer = image_layer if image_layer is not None else self.image_layer()
            volume = volume_from_layer(image_layer)
        except KafError as error:
            self._report_error(error)
            return None
        name = ANNOTATION
        if name in self.viewer.layers and self.viewer.layers[name].data.shape == volume.shape:
            layer = self.viewer.layers[name]
        else:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            layer = self.viewer.add_labels(
                np.zeros(volume.shape, dtype=np.uint8),
                name=name,
                metadata=grid_metadata(image_layer),
                **grid_kwargs(image_layer),
            )
        self.annotation_combo.setCurrentText(name)
        self.viewer.layers.selection.active = layer
        layer.mode = "paint"
        return layer

    # --- devices and checkpoints -------------------------------------------------------------------------

    def device_name(self) -> str:
        return self.device_combo.currentData() or "auto"

    def _update_device_warning(self, _index: int = 0) -> None:
        try:
            warning = cpu_warning(resolve_device(self.device_name()))
        except DeviceError as error:
            warning = str(error)
        self.cpu_warning_label.setText(warning or "")
        self.cpu_warning_label.setVisible(bool(warning))

    def _update_checkpoint_row(self, _index: int = 0) -> None:
        self.checkpoint_row.setVisible(self.checkpoint_combo.currentData() == FILE_CHOICE)

    def browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a KAF checkpoint", "", "KAF checkpoint (*.safetensors)"
        )
        if path:
            self.checkpoint_edit.setText(path)
            self._select_data(self.checkpoint_combo, FILE_CHOICE)

    def chosen_checkpoint(self) -> Any:
        return checkpoint_path(self.checkpoint_combo.currentData(), self.checkpoint_edit.text())

    def adapt_seconds(self) -> float | None:
        return float(self.adapt_spin.value()) if self.adapt_check.isChecked() else None

    def finetune_settings(self) -> FinetuneSettings:
        return FinetuneSettings(
            preset=self.preset_combo.currentText(),
            steps=self.steps_spin.value(),
            time_budget=float(self.time_budget_spin.value()) if self.time_budget_check.isChecked() else None,
            batch_size=self.batch_spin.value(),
            crop_size=self.crop_spin.value(),
            device=self.device_name(),
        )

    # --- slices in the viewer ----------------------------------------------------------------------------

    def view_slice_axis(self, layer: Any) -> int:
        """The layer axis the 2D view cuts through (0 = z in the default view; 0 in 3D display)."""
        dims = self.viewer.dims
        if dims.ndisplay != 2 or not dims.not_displayed:
            return 0
        axis = layer_axis(dims.not_displayed[-1], dims.ndim, layer.ndim)
        return axis if 0 <= axis < 3 else 0

    def current_slice(self, layer: Any, axis: int) -> int:
        position = layer.world_to_data(self.viewer.dims.point)
        return int(np.clip(round(float(position[axis])), 0, layer.data.shape[axis] - 1))

    def go_to_slice(self, layer: Any, axis: int, index: int) -> None:
        position = np.asarray(layer.world_to_data(self.viewer.dims.point), dtype=float)
        position[axis] = index
        world = layer.data_to_world(position)
        self.viewer.dims.set_point(axis + (self.viewer.dims.ndim - layer.ndim), float(world[axis]))

    def _model_axis(self, image_layer: Any) -> int:
        if self._prepared is not None:
            return self._prepared.slice_axis
        if self._metadata is not None:
            return self._metadata.slice_axis
        return self.view_slice_axis(image_layer)

    def _prepared_for(self, image_layer: Any) -> Any:
        """The prepared image of the session, if it was made from this layer's current data."""
        if self._prepared is None or self._prepared_source is None:
            return None
        return self._prepared if self._prepared_source == self._source_of(image_layer) else None

    @staticmethod
    def _source_of(layer: Any) -> tuple[Any, int]:
        return (layer.unique_id, id(layer.data))

    # --- running jobs ------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def _job_buttons(self) -> list[QPushButton]:
        return [self.finetune_button, self.predict_button, self.keypoints_button, self.save_checkpoint_button]

    def _refuse_if_busy(self) -> bool:
        """One job at a time: a second request is refused with a warning (the running one is untouched)."""
        if self.busy:
            show_warning(f"KAF Segment is already {self._job_name}: wait for it to end, or press Stop.")
        return self.busy

    def _stop_or_start(self, button: QPushButton, start: Any) -> None:
        """A job's button is its Stop while that job runs."""
        if self.busy and self._job_button is button:
            self.stop()
        else:
            start()

    def _start_job(
        self,
        name: str,
        task: Any,
        args: tuple,
        on_returned: Any,
        button: QPushButton,
        image_layer: Any = None,
        cancel: CancelToken | None = None,
    ) -> bool:
        if self._refuse_if_busy():
            return False
        self._cancel = cancel
        self._job_name = name
        self._job_button = button
        self._job_source = self._source_of(image_layer) if image_layer is not None else None
        self._job_grid = grid_kwargs(image_layer) if image_layer is not None else {}
        self._job_grid_metadata = grid_metadata(image_layer) if image_layer is not None else {}
        worker = create_worker(_jobs.guarded, task, *args, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(on_returned)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._progress = cancelable_progress(total=0, desc=f"KAF Segment: {name}", cancel_callback=self.stop)
        self._set_busy(True)
        self.status_label.setText(f"{name[0].upper()}{name[1:]}...")
        worker.start()
        return True

    def _set_busy(self, busy: bool) -> None:
        for button in self._job_buttons():
            button.setEnabled(not busy or button is self._job_button)
        if self._job_button is not None:
            self._job_button.setText("Stop" if busy else self._job_button.property("idle_text") or "")
        if busy:
            self.progress_bar.setRange(0, 0)
        else:
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(0)

    def closeEvent(self, event: Any) -> None:
        """A closed panel stops its job: a worker left running would outlive the viewer."""
        self.stop()
        super().closeEvent(event)

    def stop(self) -> None:
        """Stop the running job at its next step; nothing it was making is kept."""
        if self._cancel is not None:
            self._cancel.cancel()
        if self._worker is not None:
            self._worker.quit()
            self.status_label.setText(f"Stopping {self._job_name}...")

    def _on_progress(self, event: ProgressEvent) -> None:
        self.last_event = event
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

    def _on_error(self, error: BaseException) -> None:
        if isinstance(error, _jobs.TaskRuntimeError):
            error = error.original
        if isinstance(error, JobCancelled):
            self._on_aborted()
            return
        if isinstance(error, KafError):
            self._report_error(error)
        elif is_out_of_memory(error):
            self._report_error(
                DeviceError(
                    f"Ran out of memory while {self._job_name}. Try the 'interactive' preset, a smaller "
                    "batch size or crop, or another device."
                )
            )
        else:
            LOG.error("KAF Segment: %s failed", self._job_name, exc_info=error)
            self._report_error(
                f"{self._job_name[0].upper()}{self._job_name[1:]} failed: {type(error).__name__}: {error}"
            )

    def _on_aborted(self) -> None:
        self._follow_up = None
        self.status_label.setText(f"Stopped {self._job_name}; nothing was changed.")
        show_info(f"KAF Segment: {self._job_name} stopped; nothing was changed.")

    def _on_finished(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self._set_busy(False)
        self._worker = None
        self._cancel = None
        self._job_button = None
        follow_up, self._follow_up = self._follow_up, None
        if follow_up is not None:
            follow_up()

    def _report_error(self, error: BaseException | str) -> None:
        message = str(error)
        self.status_label.setText(message)
        show_error(message)

    # --- fine-tune ---------------------------------------------------------------------------------------

    def on_finetune_clicked(self) -> None:
        self._stop_or_start(self.finetune_button, self.start_finetune)

    def start_finetune(self) -> bool:
        if self._refuse_if_busy():
            return False
        try:
            image_layer = self.image_layer()
            volume = volume_from_layer(image_layer)
            annotation_layer = self.annotation_layer(image_layer, create=True)
            if annotation_layer is None:
                return False
            labels = np.array(annotation_layer.data)  # a copy: painting may go on while the model trains
            if labels.shape != volume.shape:
                raise InputDataError(
                    f"The annotation layer '{annotation_layer.name}' has shape {labels.shape} but the image "
                    f"'{image_layer.name}' has shape {volume.shape}; paint on a labels layer of the image's "
                    "shape."
                )
            axis = self.view_slice_axis(image_layer)
            explicit = [i for a, i in annotation_layer.metadata.get(EXPLICIT_SLICES_KEY, []) if a == axis]
            annotation = sparse_annotation(
                labels, axis, explicit, source=f"The annotation layer '{annotation_layer.name}'"
            )
            settings = self.finetune_settings()
            checkpoint = self.chosen_checkpoint()
        except KafError as error:
            self._report_error(error)
            return False
        cancel = CancelToken()
        return self._start_job(
            "fine-tuning",
            _jobs.finetune_task,
            (volume, annotation, settings, checkpoint, cancel, torch.get_num_threads(), self.adapt_seconds()),
            self._on_trained,
            self.finetune_button,
            image_layer,
            cancel,
        )

    def _on_trained(self, trained: TrainedModel) -> None:
        result = trained.result
        self._model = result.model
        self._metadata = result.metadata
        self._prepared = trained.prepared
        self._prepared_source = self._job_source
        self._explanation = None
        self.status_label.setText(
            f"Fine-tuned {len(result.losses)} steps in {result.seconds:.0f} s; "
            f"final loss {result.losses[-1]:.3f}."
        )
        if self.predict_after_check.isChecked():
            self._follow_up = lambda: self.start_predict(button=self.finetune_button)

    # --- predict -----------------------------------------------------------------------------------------

    def on_predict_clicked(self) -> None:
        self._stop_or_start(self.predict_button, self.start_predict)

    def start_predict(self, button: QPushButton | None = None) -> bool:
        if self._refuse_if_busy():
            return False
        try:
            image_layer = self.image_layer()
            volume = volume_from_layer(image_layer)
            checkpoint = None if self._model is not None else self.chosen_checkpoint()
        except KafError as error:
            self._report_error(error)
            return False
        # A prediction that follows a fine-tune is started with the fine-tune button, whose Stop stops both.
        button = button or self.predict_button
        cancel = CancelToken()
        return self._start_job(
            "predicting",
            _jobs.predict_task,
            (
                volume,
                self._model,
                self._metadata,
                self._prepared_for(image_layer),
                checkpoint,
                self.device_name(),
                cancel,
                torch.get_num_threads(),
            ),
            self._on_predicted,
            button,
            image_layer,
            cancel,
        )

    def _on_predicted(self, outcome: _jobs.PredictionOutcome) -> None:
        if outcome.model is not None:
            self._model, self._metadata = outcome.model, outcome.metadata
        self._prepared = outcome.prepared
        self._prepared_source = self._job_source
        self._uncertainty = outcome.uncertainty
        active = self.viewer.layers.selection.active
        metadata = {**self._job_grid_metadata, "label_names": outcome.label_names}
        self._put_layer(PREDICTION, "labels", outcome.labels, metadata, opacity=0.5)
        self._put_layer(
            UNCERTAINTY,
            "image",
            outcome.uncertainty,
            dict(self._job_grid_metadata),
            colormap="magma",
            blending="additive",
            contrast_limits=(0.0, 1.0),
            opacity=0.6,
            visible=self.uncertainty_check.isChecked(),
        )
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active
        counts = np.bincount(outcome.labels.ravel(), minlength=len(outcome.label_names))
        summary = ", ".join(
            f"{name}: {count}" for name, count in zip(outcome.label_names[1:], counts[1:], strict=False)
        )
        self.status_label.setText(f"Predicted every slice ({summary} voxels).")

    def _put_layer(self, name: str, kind: str, data: np.ndarray, metadata: dict, **style: Any) -> Any:
        """Update layer `name` in place (the same layer object); add it when missing or of another shape."""
        layers = self.viewer.layers
        if name in layers:
            layer = layers[name]
            if isinstance(layer, Labels if kind == "labels" else Image) and layer.data.shape == data.shape:
                layer.data = data
                layer.scale = self._job_grid["scale"]
                layer.translate = self._job_grid["translate"]
                layer.metadata.update(metadata)
                if kind == "image" and "contrast_limits" in style:
                    layer.contrast_limits = style["contrast_limits"]
                return layer
            layers.remove(name)
        add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
        return add(data, name=name, metadata=metadata, **self._job_grid, **style)

    def _show_uncertainty(self, visible: bool) -> None:
        if UNCERTAINTY in self.viewer.layers:
            self.viewer.layers[UNCERTAINTY].visible = visible

    # --- next slice and accepting the prediction ---------------------------------------------------------

    def _prediction_arrays(self, image_layer: Any) -> tuple[np.ndarray, np.ndarray]:
        if PREDICTION not in self.viewer.layers:
            raise InputDataError("There is no prediction yet: fine-tune and predict first.")
        prediction = np.asarray(self.viewer.layers[PREDICTION].data)
        if prediction.shape != tuple(image_layer.data.shape):
            raise InputDataError(
                f"The prediction has shape {prediction.shape} but the image '{image_layer.name}' has shape "
                f"{tuple(image_layer.data.shape)}: predict this image first."
            )
        if (
            UNCERTAINTY in self.viewer.layers
            and self.viewer.layers[UNCERTAINTY].data.shape == prediction.shape
        ):
            uncertainty = np.asarray(self.viewer.layers[UNCERTAINTY].data)
        elif self._uncertainty is not None and self._uncertainty.shape == prediction.shape:
            uncertainty = self._uncertainty
        else:
            raise InputDataError("There is no uncertainty for this prediction: predict again.")
        return prediction, uncertainty

    def go_to_next_slice(self) -> int | None:
        """Move the view to the unannotated slice the model is least sure about; returns its index."""
        try:
            image_layer = self.image_layer()
            prediction, uncertainty = self._prediction_arrays(image_layer)
            axis = self._model_axis(image_layer)
            annotation_layer = self.annotation_layer(image_layer)
            annotated: set[int] = set()
            if annotation_layer is not None and annotation_layer.data.shape == prediction.shape:
                annotated = set(painted_slices(np.asarray(annotation_layer.data), axis))
                annotated |= {
                    i for a, i in annotation_layer.metadata.get(EXPLICIT_SLICES_KEY, []) if a == axis
                }
        except KafError as error:
            self._report_error(error)
            return None
        index = next_slice_to_label(uncertainty, prediction, annotated, axis)
        if index is None:
            show_info("Every slice is annotated already.")
            return None
        self.go_to_slice(image_layer, axis, index)
        self.status_label.setText(f"Slice {index} is the most uncertain unannotated slice: annotate it next.")
        if annotation_layer is not None:
            self.viewer.layers.selection.active = annotation_layer
        return index

    def accept_prediction(self) -> int | None:
        """Copy the prediction of the current slice into the annotation (undoable with Ctrl+Z)."""
        try:
            image_layer = self.image_layer()
            prediction, _ = self._prediction_arrays(image_layer)
            annotation_layer = self.annotation_layer(image_layer, create=True)
            if annotation_layer is None:
                return None
            if annotation_layer.data.shape != prediction.shape:
                raise InputDataError(
                    f"The annotation layer '{annotation_layer.name}' has another shape than the prediction."
                )
        except KafError as error:
            self._report_error(error)
            return None
        axis = self._model_axis(image_layer)
        index = self.current_slice(image_layer, axis)
        indices = slice_indices(prediction.shape, axis, index)
        values = prediction[indices].astype(annotation_layer.data.dtype)
        annotation_layer.data_setitem(indices, values)
        explicit = [tuple(pair) for pair in annotation_layer.metadata.get(EXPLICIT_SLICES_KEY, [])]
        if (axis, index) not in explicit:
            annotation_layer.metadata[EXPLICIT_SLICES_KEY] = [*explicit, (axis, index)]
        self.status_label.setText(f"Slice {index}: the prediction is now part of the annotation.")
        return index

    # --- inspect: keypoints and attention ----------------------------------------------------------------

    def on_keypoints_clicked(self) -> None:
        self._stop_or_start(self.keypoints_button, self.start_explain)

    def start_explain(self, slice_index: int | None = None) -> bool:
        """Keypoints and attention of `slice_index` (default: the slice in view) on a worker."""
        if self._refuse_if_busy():
            return False
        try:
            image_layer = self.image_layer()
            volume = volume_from_layer(image_layer)
            if self._model is None:
                raise InputDataError(
                    "There is no model to inspect yet: fine-tune (or predict with a checkpoint) first."
                )
            prepared = self._prepared_for(image_layer)
            if prepared is None:
                raise InputDataError(
                    f"The model has not seen the image '{image_layer.name}' yet: predict it first, then "
                    "inspect."
                )
        except KafError as error:
            self._report_error(error)
            return False
        axis = prepared.slice_axis
        index = self.current_slice(image_layer, axis) if slice_index is None else slice_index
        self._explained_shape = volume.shape
        return self._start_job(
            "explaining",
            _jobs.explain_task,
            (self._model, prepared, index, self.device_name(), torch.get_num_threads()),
            self._on_explained,
            self.keypoints_button,
            image_layer,
        )

    def _on_explained(self, explanation: Any) -> None:
        self._explanation = explanation
        self._explained_grid = dict(self._job_grid)
        level = self.level_combo.currentData()
        self.level_combo.blockSignals(True)
        self.level_combo.clear()
        for value in explanation.levels:
            self.level_combo.addItem(f"level {value}", value)
        self._select_data(self.level_combo, level)
        self.level_combo.blockSignals(False)
        self.head_spin.setMaximum(explanation.heads - 1)
        count = len(explanation.keypoints)
        self.keypoint_spin.blockSignals(True)
        self.keypoint_spin.setRange(NO_KEYPOINT, count - 1)
        self.keypoint_spin.setValue(NO_KEYPOINT)
        self.keypoint_spin.blockSignals(False)

        every_slice = range(explanation.prepared.slice_count)
        shown = every_slice if self.all_slices_check.isChecked() else [explanation.slice_index]
        points, features = self._keypoint_points(explanation, shown)
        metadata = {"slice": explanation.slice_index, "slice_axis": explanation.prepared.slice_axis}
        size = 1.5 * float(min(self._explained_grid["scale"][-2:]))  # 1.5 pixels across
        if KEYPOINTS in self.viewer.layers and isinstance(self.viewer.layers[KEYPOINTS], Points):
            layer = self.viewer.layers[KEYPOINTS]
            layer.selected_data = set()
            layer.data = points
            layer.features = features
            layer.face_color = "score"
            layer.size = size
            layer.scale = self._explained_grid["scale"]
            layer.translate = self._explained_grid["translate"]
            layer.metadata.update(metadata)
        else:
            if KEYPOINTS in self.viewer.layers:
                self.viewer.layers.remove(KEYPOINTS)
            layer = self.viewer.add_points(
                points,
                ndim=3,
                name=KEYPOINTS,
                features=features,
                face_color="score",
                face_colormap="viridis",
                border_color="white",
                border_width=0.15,
                border_width_is_relative=True,
                size=size,
                **out_of_slice_kwargs(),
                metadata=metadata,
                **self._explained_grid,
            )
            selection_events = layer.selected_data.events
            # psygnal's Selection (napari >= 0.6) says items_changed; napari's own said changed.
            if hasattr(selection_events, "items_changed"):
                selection_events.items_changed.connect(self._on_keypoint_selection)
            else:
                selection_events.changed.connect(self._on_keypoint_selection)
        self.viewer.layers.selection.active = layer
        layer.mode = "select"
        self.status_label.setText(
            f"{count} keypoints on slice {explanation.slice_index}: click one to see where its attention "
            "goes."
        )
        if self._keypoint_after_explain is not None:
            keypoint, self._keypoint_after_explain = self._keypoint_after_explain, None
            self.go_to_slice(self.image_layer(), explanation.prepared.slice_axis, explanation.slice_index)
            self.select_keypoint(keypoint)

    def _keypoint_points(self, explanation: Any, slices: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(z, y, x) points and features of the keypoints of `slices`: the explained slice's from the
        explanation, the others' from the prepared volume (detected when it was predicted)."""
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
        features = {name: np.concatenate(parts) for name, parts in columns.items()}
        count = len(features["index"])
        features["level"] = np.full(count, self.level_combo.currentData() or 1)
        features["head"] = np.full(count, self.head_spin.value())
        return np.concatenate(blocks), features

    def _on_keypoint_selection(self, *_args: Any) -> None:
        if KEYPOINTS not in self.viewer.layers:
            return
        layer = self.viewer.layers[KEYPOINTS]
        selected = layer.selected_data
        if not selected:
            return
        chosen = selected.active if selected.active is not None else min(selected)
        keypoint = int(layer.features["index"].iloc[int(chosen)])
        on_slice = int(layer.features["slice"].iloc[int(chosen)])
        if self._explanation is not None and on_slice != self._explanation.slice_index:
            # A keypoint of another slice (all slices shown): explain that slice, then show its attention.
            if self.start_explain(on_slice):
                self._keypoint_after_explain = keypoint
            return
        self.keypoint_spin.setValue(keypoint)

    def select_keypoint(self, keypoint: int, slice_index: int | None = None) -> None:
        """Select keypoint `keypoint` of `slice_index` (default: the explained slice) in the keypoints
        layer, as a click would."""
        layer = self.viewer.layers[KEYPOINTS]
        on_slice = self._explanation.slice_index if slice_index is None else slice_index
        rows = np.flatnonzero((layer.features["slice"] == on_slice) & (layer.features["index"] == keypoint))
        if not len(rows):
            raise InputDataError(f"slice {on_slice} has no keypoint {keypoint} in the keypoints layer")
        layer.selected_data = {int(rows[0])}

    def _on_level_or_head(self, _value: Any = None) -> None:
        if self._explanation is not None and KEYPOINTS in self.viewer.layers:
            layer = self.viewer.layers[KEYPOINTS]
            if "level" in layer.features:
                layer.features["level"] = self.level_combo.currentData() or 1
                layer.features["head"] = self.head_spin.value()
        self.request_attention()

    def request_attention(self) -> None:
        """Compute the chosen keypoint's attention map on a worker; a newer request replaces a pending one."""
        if self._explanation is None or self.keypoint_spin.value() == NO_KEYPOINT:
            return
        if self._attention_worker is not None:
            self._attention_pending = True
            return
        self._attention_pending = False
        worker = create_worker(
            _jobs.guarded,
            _jobs.attention_task,
            self._explanation,
            self.level_combo.currentData(),
            self.head_spin.value(),
            self.keypoint_spin.value(),
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.returned.connect(self._on_attention)
        worker.errored.connect(lambda error: self._report_error(getattr(error, "original", error)))
        worker.finished.connect(self._on_attention_finished)
        self._attention_worker = worker
        worker.start()

    def _on_attention_finished(self) -> None:
        self._attention_worker = None
        if self._attention_pending:
            self.request_attention()

    def _on_attention(self, result: tuple[int, int, int, np.ndarray]) -> None:
        level, head, keypoint, attention = result
        explanation = self._explanation
        if explanation is None or self._explained_shape is None:
            return
        axis, index = explanation.prepared.slice_axis, explanation.slice_index
        layers = self.viewer.layers
        metadata = {"level": level, "head": head, "keypoint": keypoint, "slice": index, "slice_axis": axis}
        if self._metadata is not None:
            metadata["model"] = (
                f"{self._metadata.preset} ({self._metadata.method}, {self._metadata.steps} steps)"
            )
        if ATTENTION in layers and layers[ATTENTION].data.shape == self._explained_shape:
            layer = layers[ATTENTION]
            data = layer.data
            previous = layer.metadata.get("slice"), layer.metadata.get("slice_axis")
            if None not in previous:
                data[slice_selector(previous[1], previous[0])] = 0.0
            data[slice_selector(axis, index)] = attention
            layer.scale = self._explained_grid["scale"]
            layer.translate = self._explained_grid["translate"]
            layer.metadata.update(metadata)
            layer.data = data
            layer.refresh()
        else:
            if ATTENTION in layers:
                layers.remove(ATTENTION)
            data = np.zeros(self._explained_shape, dtype=np.float32)
            data[slice_selector(axis, index)] = attention
            layer = self.viewer.add_image(
                data,
                name=ATTENTION,
                colormap="inferno",
                blending="additive",
                contrast_limits=(0.0, 1.0),
                opacity=0.7,
                metadata=metadata,
                **self._explained_grid,
            )
            if KEYPOINTS in layers:  # keep clicks going to the keypoints
                layers.selection.active = layers[KEYPOINTS]
        self.status_label.setText(
            f"Attention of keypoint {keypoint} (slice {index}, level {level}, head {head})."
        )

    # --- saving ------------------------------------------------------------------------------------------

    def save_segmentation(self, path: str | None = None) -> list[str]:
        """Write the prediction through the plugin's writer (NIfTI or NRRD, with the image's affine)."""
        if PREDICTION not in self.viewer.layers:
            self._report_error("There is no segmentation to save yet: fine-tune and predict first.")
            return []
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Save the segmentation", "segmentation.nii.gz", "NIfTI (*.nii.gz *.nii);;NRRD (*.nrrd)"
            )
            if not path:
                return []
        try:
            written = self.viewer.layers[PREDICTION].save(str(path), plugin="napari-kaf")
        except Exception as error:
            self._report_error(f"Could not save the segmentation to {path}: {error}")
            return []
        if written:
            self.status_label.setText(f"Saved the segmentation to {written[0]}.")
        else:
            self._report_error(
                f"Could not save the segmentation to {path}: use a .nii.gz, .nii or .nrrd name."
            )
        return list(written or [])

    def save_checkpoint(self, path: str | None = None) -> bool:
        """Write the fine-tuned model (safetensors with its metadata) on a worker thread."""
        if self._model is None:
            self._report_error("There is no fine-tuned model to save yet: fine-tune first.")
            return False
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Save the fine-tuned model", "model.safetensors", "KAF checkpoint (*.safetensors)"
            )
            if not path:
                return False
        from pathlib import Path

        return self._start_job(
            "saving the checkpoint",
            _jobs.save_checkpoint_task,
            (Path(path), self._model, self._metadata),
            lambda written: self.status_label.setText(f"Saved the model to {written}."),
            self.save_checkpoint_button,
        )
