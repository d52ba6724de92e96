"""The KAF Segment panel's controls, laid out, with their remembered values: UI only, no behaviour.

Every control is an attribute, so the widget wires them and tests click them.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
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

from kaf.models.config import PRESETS
from kaf.runtime.devices import available_devices
from napari_kaf._checkpoints import menu_entries
from napari_kaf._marshal import ANNOTATION, UNCERTAINTY
from napari_kaf._settings import PluginSettings
from napari_kaf._shortcuts import with_key

NO_KEYPOINT = -1
NEW_ANNOTATION = "New empty layer"  # the annotation menu's first entry: no layer until you paint or train


def _side_by_side(switch: QCheckBox, amount: QSpinBox) -> QHBoxLayout:
    """A check box that enables an option and the spin box that sets its amount, on one form row."""
    row = QHBoxLayout()
    row.addWidget(switch)
    row.addWidget(amount, 1)
    return row


def _spin(low: int, high: int, suffix: str = "", step: int = 1) -> QSpinBox:
    spin = QSpinBox()
    spin.setRange(low, high)
    spin.setSuffix(suffix)
    spin.setSingleStep(step)
    return spin


def _button(text: str, tooltip: str = "") -> QPushButton:
    button = QPushButton(text)
    button.setToolTip(tooltip)
    return button


def select_data(combo: QComboBox, value: Any) -> None:
    """Choose the entry of `combo` whose data is `value`, if there is one."""
    index = combo.findData(value)
    if index >= 0:
        combo.setCurrentIndex(index)


class KafPanel(QWidget):
    """The controls of the dock widget in six groups: data, model, fine-tune, predict, inspect, save."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = PluginSettings()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        for group in (
            self._data_group(),
            self._model_group(),
            self._finetune_group(),
            self._predict_group(),
            self._inspect_group(),
            self._save_group(),
        ):
            layout.addWidget(group)
        layout.addStretch(1)
        self._restore_settings()
        self._remember_settings()

    def job_buttons(self) -> dict[str, QPushButton]:
        """The button of each job; it turns into that job's Stop while it runs."""
        return {
            "finetune": self.finetune_button,
            "predict": self.predict_button,
            "explain": self.keypoints_button,
            "save": self.save_checkpoint_button,
        }

    def _data_group(self) -> QGroupBox:
        group = QGroupBox("Data")
        form = QFormLayout(group)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The 3D scan to segment")
        form.addRow("Image", self.image_combo)
        self.annotation_combo = QComboBox()
        self.annotation_combo.setToolTip(
            f"The labels layer you paint a few slices in; '{NEW_ANNOTATION}' makes one when you paint or "
            "fine-tune"
        )
        self.new_annotation_button = _button(
            "New", f"Add an empty '{ANNOTATION}' labels layer and start painting"
        )
        row = QHBoxLayout()
        row.addWidget(self.annotation_combo, 1)
        row.addWidget(self.new_annotation_button)
        form.addRow("Annotation", row)
        self.classes_edit = QLineEdit()
        self.classes_edit.setPlaceholderText("background, class 1, class 2 (empty: numbered)")
        self.classes_edit.setToolTip(
            "Class names, comma-separated, background first: label value k is the k-th name after "
            "background. Filled from the annotation's or image's names, else the model's; stored in the "
            "fine-tuned model and saved beside the segmentation (<name>.csv)"
        )
        form.addRow("Classes", self.classes_edit)
        self.paint_class_combo = QComboBox()
        self.paint_class_combo.setToolTip(
            "The class you paint in the annotation layer (its label value); it follows napari's own label "
            "control"
        )
        form.addRow("Paint class", self.paint_class_combo)
        return group

    def _model_group(self) -> QGroupBox:
        group = QGroupBox("Model")
        form = QFormLayout(group)
        self.checkpoint_combo = QComboBox()
        for key, label in menu_entries():
            self.checkpoint_combo.addItem(label, key)
        form.addRow("Checkpoint", self.checkpoint_combo)
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("path/to/model.safetensors")
        self.browse_button = _button("Browse...", "Choose a .safetensors checkpoint file")
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
        return group

    def _finetune_group(self) -> QGroupBox:
        group = QGroupBox("Fine-tune")
        form = QFormLayout(group)
        self.steps_spin = _spin(1, 100_000)
        form.addRow("Steps", self.steps_spin)
        self.time_budget_check = QCheckBox("Stop after")
        self.time_budget_spin = _spin(1, 36_000, " s")
        form.addRow("Time budget", _side_by_side(self.time_budget_check, self.time_budget_spin))
        self.batch_spin = _spin(1, 64)
        form.addRow("Batch size", self.batch_spin)
        self.crop_spin = _spin(16, 1024, step=16)
        self.crop_spin.setToolTip("Training crop side in pixels (a multiple of 16)")
        form.addRow("Crop size", self.crop_spin)
        self.adapt_check = QCheckBox("Adapt to this image first for")
        self.adapt_check.setToolTip(
            "A short self-supervised KAF pretraining on the open image (no labels) before fine-tuning"
        )
        self.adapt_spin = _spin(5, 36_000, " s")
        form.addRow("Adapt", _side_by_side(self.adapt_check, self.adapt_spin))
        self.predict_after_check = QCheckBox("Predict the volume when done")
        form.addRow(self.predict_after_check)
        self.finetune_button = _button(
            "Fine-tune", with_key("Train on the painted slices; Stop while it runs", "finetune")
        )
        form.addRow(self.finetune_button)
        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(False)
        self.progress_bar.setValue(0)
        form.addRow(self.progress_bar)
        self.status_label = QLabel("Paint a few slices, then fine-tune.")
        self.status_label.setWordWrap(True)
        form.addRow(self.status_label)
        return group

    def _predict_group(self) -> QGroupBox:
        group = QGroupBox("Predict")
        form = QFormLayout(group)
        self.predict_button = _button(
            "Predict volume", with_key("Segment every slice; show or hide the result", "toggle_prediction")
        )
        form.addRow(self.predict_button)
        self.uncertainty_check = QCheckBox(f"Show uncertainty ({UNCERTAINTY})")
        self.uncertainty_check.setToolTip(with_key("Where the model is unsure", "toggle_uncertainty"))
        form.addRow(self.uncertainty_check)
        self.next_slice_button = _button(
            "Next slice to label",
            with_key(
                "Go to the unannotated slice whose predicted structure the model is least sure about",
                "next_slice",
            ),
        )
        self.accept_button = _button(
            "Accept prediction on this slice",
            with_key("Copy the prediction of this slice into the annotation (Ctrl+Z undoes)", "accept"),
        )
        form.addRow(self.next_slice_button)
        form.addRow(self.accept_button)
        return group

    def _inspect_group(self) -> QGroupBox:
        group = QGroupBox("Inspect")
        form = QFormLayout(group)
        self.keypoints_button = _button(
            "Show keypoints of this slice", with_key("The model's keypoints on this slice", "keypoints")
        )
        form.addRow(self.keypoints_button)
        self.all_slices_check = QCheckBox("Keypoints of all slices")
        self.all_slices_check.setToolTip(
            "Show every slice's keypoints; clicking one on another slice explains that slice first"
        )
        form.addRow(self.all_slices_check)
        self.level_combo = QComboBox()
        # The default preset's KAF levels until an explanation offers its own model's.
        for level in PRESETS["interactive"].config.kaf_levels:
            self.level_combo.addItem(f"level {level}", level)
        form.addRow("Attention level", self.level_combo)
        self.head_spin = _spin(0, 3)
        form.addRow("Head", self.head_spin)
        self.keypoint_spin = _spin(NO_KEYPOINT, NO_KEYPOINT)
        self.keypoint_spin.setSpecialValueText("click a keypoint")
        form.addRow("Keypoint", self.keypoint_spin)
        return group

    def _save_group(self) -> QGroupBox:
        group = QGroupBox("Save")
        row = QHBoxLayout(group)
        self.save_segmentation_button = _button("Segmentation...", "Write the prediction as NIfTI or NRRD")
        self.save_checkpoint_button = _button("Checkpoint...", "Write the fine-tuned model")
        row.addWidget(self.save_segmentation_button)
        row.addWidget(self.save_checkpoint_button)
        for button in self.job_buttons().values():
            button.setProperty("idle_text", button.text())
        return group

    # --- remembered settings -------------------------------------------------------------------------

    def _value_controls(self) -> dict[str, Any]:
        """The controls whose values are remembered, by settings key."""
        return {
            "checkpoint_file": self.checkpoint_edit,
            "steps": self.steps_spin,
            "use_time_budget": self.time_budget_check,
            "time_budget": self.time_budget_spin,
            "batch_size": self.batch_spin,
            "crop_size": self.crop_spin,
            "adapt": self.adapt_check,
            "adapt_seconds": self.adapt_spin,
            "predict_after": self.predict_after_check,
            "all_slices": self.all_slices_check,
            "show_uncertainty": self.uncertainty_check,
            "head": self.head_spin,
        }

    def _data_controls(self) -> dict[str, QComboBox]:
        """The menus whose chosen entry's data is remembered, by settings key."""
        return {"checkpoint": self.checkpoint_combo, "device": self.device_combo, "level": self.level_combo}

    def _restore_settings(self) -> None:
        s = self.settings
        for key, combo in self._data_controls().items():
            select_data(combo, s.get(key))
        preset = s.get("preset")
        self.preset_combo.setCurrentText(preset if preset in PRESETS else "interactive")
        for key, control in self._value_controls().items():
            value = s.get(key)
            if isinstance(control, QLineEdit):
                control.setText(value)
            elif isinstance(control, QCheckBox):
                control.setChecked(value)
            else:
                control.setValue(value)

    def _remember_settings(self) -> None:
        """Each change is written at once."""
        s = self.settings
        for key, combo in self._data_controls().items():
            combo.currentIndexChanged.connect(lambda _i, k=key, c=combo: s.set(k, c.currentData()))
        self.preset_combo.currentTextChanged.connect(lambda text: s.set("preset", text))
        for key, control in self._value_controls().items():
            if isinstance(control, QLineEdit):
                control.textChanged.connect(lambda text, k=key: s.set(k, text))
            elif isinstance(control, QCheckBox):
                control.toggled.connect(lambda value, k=key: s.set(k, value))
            else:
                control.valueChanged.connect(lambda value, k=key: s.set(k, value))
