"""The dock widget against napari's canvas-free ViewerModel: runs offscreen (plain qtbot) or under Xvfb."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari", reason="napari is not installed: pip install -e '.[test,napari]'")
import torch

from kaf.app.workflow import load_finetuned_model
from kaf.data.keypoints import KeypointConfig
from kaf.data.volume_io import read_volume
from kaf.jobs.events import ProgressEvent
from kaf.models import KafUNet, preset_config
from kaf.models.checkpoints import CheckpointMetadata, save_checkpoint
from napari_kaf._marshal import ANNOTATION, ATTENTION, KEYPOINTS, PREDICTION, UNCERTAINTY, layer_kwargs
from napari_kaf._sample_data import synthetic_volume
from napari_kaf._settings import APPLICATION, ORGANISATION
from napari_kaf._suggest import next_slice_to_label, slice_scores
from napari_kaf._widget import KafWidget, describe_event


@pytest.fixture
def viewer():
    from napari.components import ViewerModel

    return ViewerModel()


@pytest.fixture
def make_widget(qtbot, viewer):
    def make(target=None):
        widget = KafWidget(target if target is not None else viewer)
        qtbot.addWidget(widget)
        return widget

    return make


def _quick(widget: KafWidget, steps: int = 3) -> None:
    """The test settings: a few tiny steps on the CPU."""
    widget.steps_spin.setValue(steps)
    widget.batch_spin.setValue(2)
    widget.crop_spin.setValue(32)
    widget._select_data(widget.device_combo, "cpu")


def _add_synthetic(viewer, painted=(2, 9)):
    volume, labels = synthetic_volume()
    image = viewer.add_image(volume.array, **layer_kwargs(volume, "scan"))
    return image, labels, painted


def _errors(shown):
    return [message for severity, message in shown if severity == "error"]


def test_panel_lists_layers_and_creates_the_annotation_layer(viewer, make_widget, notifications):
    widget = make_widget()
    assert widget.image_combo.count() == 0
    image, _, _ = _add_synthetic(viewer)
    viewer.add_image(np.zeros((5, 5)), name="kaf:uncertainty")  # plugin outputs are not offered as inputs
    assert [widget.image_combo.itemText(i) for i in range(widget.image_combo.count())] == ["scan"]
    image.name = "renamed scan"
    assert widget.image_combo.currentText() == "renamed scan"

    layer = widget.new_annotation_layer()
    assert layer.name == ANNOTATION and layer.data.shape == image.data.shape
    np.testing.assert_allclose(layer.scale, image.scale)
    assert layer.mode == "paint" and viewer.layers.selection.active is layer
    assert widget.annotation_combo.currentText() == ANNOTATION
    np.testing.assert_allclose(layer.metadata["affine"], image.metadata["affine"])


def test_devices_and_cpu_warning(make_widget):
    widget = make_widget()
    names = [widget.device_combo.itemData(i) for i in range(widget.device_combo.count())]
    assert names[0] == "auto" and names[-1] == "cpu"
    expected_cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert [n for n in names if n.startswith("cuda")] == expected_cuda
    widget._select_data(widget.device_combo, "cpu")
    assert not widget.cpu_warning_label.isHidden()
    assert "CPU" in widget.cpu_warning_label.text()


def test_checkpoint_menu_has_a_labelled_default_and_a_file_choice(make_widget):
    widget = make_widget()
    keys = [widget.checkpoint_combo.itemData(i) for i in range(widget.checkpoint_combo.count())]
    assert keys == ["default", "random", "file"]
    assert "pretrained" in widget.checkpoint_combo.itemText(0)
    assert widget.checkpoint_combo.itemText(1) == "Random initialisation"
    assert widget.checkpoint_row.isHidden()
    widget._select_data(widget.checkpoint_combo, "file")
    assert not widget.checkpoint_row.isHidden()
    assert widget.chosen_checkpoint is not None


def test_settings_are_remembered(make_widget, _private_settings):
    from qtpy.QtCore import QSettings

    first = make_widget()
    first.steps_spin.setValue(42)
    first.preset_combo.setCurrentText("paper-chd")
    first._select_data(first.device_combo, "cpu")
    first.time_budget_check.setChecked(True)
    first.time_budget_spin.setValue(90)
    first.uncertainty_check.setChecked(False)
    # Written on change: the file on disk already holds the values.
    stored = QSettings(ORGANISATION, APPLICATION)
    assert stored.fileName().startswith(str(_private_settings))
    assert int(stored.value("steps")) == 42

    second = make_widget()
    assert second.steps_spin.value() == 42
    assert second.preset_combo.currentText() == "paper-chd"
    assert second.device_name() == "cpu"
    assert second.time_budget_check.isChecked() and second.time_budget_spin.value() == 90
    assert not second.uncertainty_check.isChecked()
    assert second.finetune_settings().time_budget == 90.0


def test_input_errors_become_notifications(viewer, make_widget, notifications):
    widget = make_widget()
    assert widget.start_finetune() is False
    assert "No image is open" in _errors(notifications)[-1]

    viewer.add_image(np.zeros((32, 32), np.float32), name="flat")
    assert widget.start_finetune() is False
    assert "has 2 dimensions" in _errors(notifications)[-1]

    viewer.layers.remove("flat")
    _add_synthetic(viewer)
    assert widget.start_finetune() is False  # creates the annotation layer, which is still empty
    assert "no slice is annotated" in _errors(notifications)[-1]
    assert ANNOTATION in viewer.layers

    for action in (widget.go_to_next_slice, widget.accept_prediction, widget.start_explain):
        action()
        assert "fine-tune" in _errors(notifications)[-1]
    assert widget.save_segmentation("unused.nii.gz") == []
    assert widget.save_checkpoint("unused.safetensors") is False
    assert not widget.busy
    assert all(severity == "error" for severity, _ in notifications)


def _paint(viewer, labels, slices):
    annotation = viewer.layers[ANNOTATION]
    annotation.data[list(slices)] = labels[list(slices)]


@pytest.fixture
def painted(viewer, make_widget, notifications):
    """A widget on the synthetic volume with slices 2 and 9 painted and quick settings."""
    image, labels, slices = _add_synthetic(viewer)
    widget = make_widget()
    widget.new_annotation_layer()
    _paint(viewer, labels, slices)
    _quick(widget)
    return widget, image, labels


def test_checkpoint_mismatch_is_reported(painted, tmp_path, notifications, wait_idle):
    widget, _, _ = painted
    config = preset_config("paper-chd", classes=3)
    metadata = CheckpointMetadata(
        preset="paper-chd",
        model=config.to_dict(),
        method="kaf",
        label_names=["background", "a", "b"],
        normalization=None,
        keypoints=KeypointConfig(max_keypoints=config.max_keypoints).to_dict(),
    )
    tiny = {"encoder.stem.weight": torch.zeros(1)}
    path = save_checkpoint(tmp_path / "chd.safetensors", tiny, metadata)
    widget._select_data(widget.checkpoint_combo, "file")
    widget.checkpoint_edit.setText(str(path))
    assert widget.start_finetune() is True
    wait_idle(widget)
    message = _errors(notifications)[-1]
    assert "chd.safetensors" in message and "paper-chd" in message and "interactive" in message
    assert widget._model is None and PREDICTION not in widget.viewer.layers
    assert widget.finetune_button.text() == "Fine-tune" and widget.finetune_button.isEnabled()


def test_out_of_memory_is_reported(painted, monkeypatch, notifications, wait_idle):
    widget, _, _ = painted

    def exhausted(*_args, **_kwargs):
        yield ProgressEvent("prepare", 0, 1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("napari_kaf._jobs.finetune_task", exhausted)
    widget.start_finetune()
    wait_idle(widget)
    message = _errors(notifications)[-1]
    assert "Ran out of memory while fine-tuning" in message and "smaller batch" in message
    assert widget.viewer.add_image(np.zeros((4, 4))) is not None  # the viewer keeps working


def test_unexpected_error_is_one_notification(painted, monkeypatch, notifications, wait_idle):
    widget, _, _ = painted

    def broken(*_args, **_kwargs):
        yield ProgressEvent("prepare", 0, 1)
        raise ValueError("something odd")

    monkeypatch.setattr("napari_kaf._jobs.finetune_task", broken)
    widget.start_finetune()
    wait_idle(widget)
    assert _errors(notifications)[-1] == "Fine-tuning failed: ValueError: something odd"


def test_stop_midway_and_two_jobs_refused(painted, qtbot, notifications, wait_idle):
    widget, _, _ = painted
    widget.steps_spin.setValue(10_000)
    assert widget.start_finetune() is True
    assert widget.finetune_button.text() == "Stop"
    assert widget.finetune_button.isEnabled()
    assert not widget.predict_button.isEnabled() and not widget.keypoints_button.isEnabled()
    assert widget.start_predict() is False  # a second job is refused
    assert widget.start_finetune() is False
    assert any("already fine-tuning" in message for _, message in notifications)

    qtbot.waitUntil(
        lambda: widget.last_event is not None and widget.last_event.stage == "finetune", timeout=180_000
    )
    stopped_at = widget.last_event.step
    widget.finetune_button.click()  # Stop
    wait_idle(widget, timeout=120_000)
    assert widget.last_event.step <= stopped_at + 2  # within one step (plus one already on its way)
    assert widget._model is None and PREDICTION not in widget.viewer.layers  # no half state
    assert widget.finetune_button.text() == "Fine-tune"
    assert all(button.isEnabled() for button in widget._job_buttons())
    assert "stopped" in notifications[-1][1]
    assert "Stopped" in widget.status_label.text()

    # The next job runs normally.
    widget.steps_spin.setValue(1)
    widget.predict_after_check.setChecked(False)
    assert widget.start_finetune()
    wait_idle(widget)
    assert widget._model is not None and not _errors(notifications)


def test_progress_text():
    event = ProgressEvent("finetune", 5, 150, loss=0.4321, elapsed=10.0, remaining=95.0)
    assert describe_event(event) == "Fine-tuning: step 5/150, loss 0.432, 1 min 35 s left"
    assert describe_event(ProgressEvent("predict", 4, 8, remaining=2.2)) == "Predicting: slice 4/8, 2 s left"


def test_whole_loop(painted, qtbot, tmp_path, notifications, wait_idle, plugins):
    widget, image, _ = painted
    viewer = widget.viewer
    assert widget.start_finetune()
    wait_idle(widget)
    assert not _errors(notifications), notifications

    # Prediction: a labels layer on the image grid, with the structure found on unpainted slices too.
    prediction = viewer.layers[PREDICTION]
    assert prediction.data.shape == image.data.shape
    np.testing.assert_allclose(prediction.scale, image.scale)
    assert set(np.unique(prediction.data)) <= {0, 1, 2}
    assert (prediction.data[5] > 0).sum() > 100
    uncertainty = viewer.layers[UNCERTAINTY]
    assert uncertainty.data.shape == image.data.shape
    assert uncertainty.data.min() >= 0.0 and uncertainty.data.max() <= 1.0
    assert widget._model is not None and "Predicted" in widget.status_label.text()

    # Predicting again updates the same layers in place.
    widget.predict_button.click()
    wait_idle(widget)
    assert viewer.layers[PREDICTION] is prediction and viewer.layers[UNCERTAINTY] is uncertainty

    # Next slice: the most uncertain unpainted slice, and the view moves there.
    index = widget.go_to_next_slice()
    expected = next_slice_to_label(uncertainty.data, prediction.data, [2, 9], 0)
    assert index == expected and index not in (2, 9)
    assert widget.current_slice(image, 0) == index
    assert viewer.dims.point[0] == pytest.approx(index * image.scale[0])

    # Accept the prediction there: it becomes annotation (and Ctrl+Z would undo it).
    annotation = viewer.layers[ANNOTATION]
    assert widget.accept_prediction() == index
    np.testing.assert_array_equal(annotation.data[index], prediction.data[index])
    annotation.undo()
    assert not annotation.data[index].any()
    annotation.redo()

    # Inspect: keypoints of the current slice as 3D points in (z, y, x) with score/index/level features.
    widget.keypoints_button.click()
    wait_idle(widget)
    points = viewer.layers[KEYPOINTS]
    assert points.ndim == 3 and len(points.data) > 4
    np.testing.assert_array_equal(points.data[:, 0], index)
    assert {"score", "index", "level"} <= set(points.features.columns)
    np.testing.assert_array_equal(points.features["index"], np.arange(len(points.data)))
    np.testing.assert_allclose(points.scale, image.scale)
    assert points.projection_mode == "rescale_linear"  # napari 0.9's name for out_of_slice_display=True
    np.testing.assert_allclose(points.border_color[0], [1, 1, 1, 1])
    assert ATTENTION not in viewer.layers  # nothing is shown until a keypoint is chosen

    # Selecting a keypoint shows its attention map on the image grid.
    widget.select_keypoint(2)
    qtbot.waitUntil(lambda: ATTENTION in viewer.layers, timeout=60_000)
    attention = viewer.layers[ATTENTION]
    assert widget.keypoint_spin.value() == 2
    assert attention.data.shape == image.data.shape
    np.testing.assert_allclose(attention.scale, image.scale)
    np.testing.assert_allclose(attention.translate, image.translate)
    assert attention.colormap.name == "inferno" and attention.blending == "additive"
    assert tuple(attention.contrast_limits) == (0.0, 1.0)
    assert attention.data[index].max() == pytest.approx(1.0)
    assert not np.delete(attention.data, index, axis=0).any()
    assert attention.metadata["keypoint"] == 2

    # Changing head or level updates the same layer in place.
    before = attention.data[index].copy()
    widget.head_spin.setValue(3)
    qtbot.waitUntil(lambda: attention.metadata["head"] == 3, timeout=60_000)
    widget._select_data(widget.level_combo, 2)
    qtbot.waitUntil(lambda: attention.metadata["level"] == 2, timeout=60_000)
    assert viewer.layers[ATTENTION] is attention
    assert not np.allclose(attention.data[index], before)
    assert (points.features["level"] == 2).all()

    # Save through the writer and the checkpoint; both read back.
    [written] = widget.save_segmentation(str(tmp_path / "segmentation.nii.gz"))
    back = read_volume(written)
    np.testing.assert_array_equal(back.array, prediction.data)
    np.testing.assert_allclose(back.affine, image.metadata["affine"])
    assert widget.save_checkpoint(str(tmp_path / "model.safetensors"))
    wait_idle(widget)
    _, metadata = load_finetuned_model(tmp_path / "model.safetensors")
    assert metadata.method == "finetune" and metadata.steps == 3
    assert not _errors(notifications), notifications


def test_keypoints_of_all_slices_and_attention_of_another_slice(painted, qtbot, notifications, wait_idle):
    """With "Keypoints of all slices" the layer holds every slice's keypoints; choosing one on another
    slice explains that slice, moves the view there and shows that keypoint's attention."""
    widget, image, _ = painted
    viewer = widget.viewer
    assert widget.start_finetune()
    wait_idle(widget)
    viewer.dims.set_point(0, 4 * image.scale[0])
    widget.all_slices_check.setChecked(True)
    widget.keypoints_button.click()
    wait_idle(widget)
    points = viewer.layers[KEYPOINTS]
    slices = points.features["slice"].to_numpy()
    assert set(slices) == set(range(image.data.shape[0]))
    np.testing.assert_array_equal(points.data[:, 0], slices)  # each point lies on its own slice
    on_four = slices == 4
    np.testing.assert_array_equal(points.features["index"][on_four], np.arange(on_four.sum()))
    np.testing.assert_allclose(points.data[on_four, 1:], widget._explanation.keypoints)
    assert widget._explanation.slice_index == 4

    widget.select_keypoint(1, slice_index=7)
    qtbot.waitUntil(lambda: ATTENTION in viewer.layers, timeout=60_000)
    wait_idle(widget)
    assert widget._explanation.slice_index == 7 and widget.keypoint_spin.value() == 1
    assert widget.current_slice(image, 0) == 7
    attention = viewer.layers[ATTENTION]
    assert attention.metadata["slice"] == 7 and attention.metadata["keypoint"] == 1
    assert attention.data[7].max() == pytest.approx(1.0)
    assert not np.delete(attention.data, 7, axis=0).any()
    assert not _errors(notifications), notifications


def test_predict_from_a_saved_checkpoint(viewer, make_widget, tmp_path, notifications, wait_idle):
    """Without a session model, Predict uses a fine-tuned checkpoint file, and refuses a pretrained one."""
    image, _, _ = _add_synthetic(viewer)
    config = preset_config("interactive", classes=3)
    model = KafUNet(config)
    from kaf.data.intensity import fit_normalization

    metadata = CheckpointMetadata(
        preset="interactive",
        model=config.to_dict(),
        method="finetune",
        label_names=["background", "ring", "disc"],
        normalization=fit_normalization(image.data, "auto").to_dict(),
        keypoints=KeypointConfig(max_keypoints=config.max_keypoints).to_dict(),
    )
    path = save_checkpoint(tmp_path / "finetuned.safetensors", model.state_dict(), metadata)
    widget = make_widget()
    _quick(widget)
    widget._select_data(widget.checkpoint_combo, "file")
    widget.checkpoint_edit.setText(str(path))
    assert widget.start_predict()
    wait_idle(widget)
    assert not _errors(notifications), notifications
    assert viewer.layers[PREDICTION].data.shape == image.data.shape
    assert viewer.layers[PREDICTION].metadata["label_names"] == ["background", "ring", "disc"]


def test_next_slice_scores():
    uncertainty = np.zeros((4, 4, 4), np.float32)
    prediction = np.zeros((4, 4, 4), np.uint8)
    prediction[1, 1, 1] = 1  # slice 1: one very uncertain foreground voxel
    uncertainty[1, 1, 1] = 0.9
    prediction[2, :2, :2] = 2  # slice 2: four fairly uncertain ones, more to get wrong in all
    uncertainty[2, :2, :2] = 0.5
    uncertainty[3] = 0.4  # slice 3: unsure, but no structure predicted there
    np.testing.assert_allclose(slice_scores(uncertainty, prediction), [0.0, 0.9, 2.0, 0.0])
    assert next_slice_to_label(uncertainty, prediction, []) == 2
    assert next_slice_to_label(uncertainty, prediction, [2]) == 1
    assert next_slice_to_label(uncertainty, prediction, [0, 1, 2, 3]) is None
    assert next_slice_to_label(uncertainty.transpose(1, 0, 2), prediction.transpose(1, 0, 2), [2], 1) == 1
