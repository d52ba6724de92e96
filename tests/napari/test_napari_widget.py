"""The dock widget against napari's canvas-free ViewerModel, driven by real Qt clicks and keys on its
controls (offscreen or under Xvfb). The session logic itself is tested in test_napari_controller.py."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari", reason="napari is not installed: pip install -e '.[test,napari]'")
import torch

from kaf.app.workflow import load_finetuned_model
from kaf.data.keypoints import KeypointConfig
from kaf.data.volume_io import read_volume
from kaf.models import KafUNet, preset_config
from kaf.models.checkpoints import CheckpointMetadata, save_checkpoint
from kaf.runtime import validation
from napari_kaf._layers import KEYPOINT_DIMMED_OPACITY, KEYPOINT_OPACITY
from napari_kaf._marshal import ANNOTATION, ATTENTION, KEYPOINTS, PREDICTION, UNCERTAINTY, layer_kwargs
from napari_kaf._panel import NEW_ANNOTATION
from napari_kaf._sample_data import synthetic_sample, synthetic_volume
from napari_kaf._settings import APPLICATION, ORGANISATION
from napari_kaf._shortcuts import SHORTCUTS
from napari_kaf._slices import current_slice
from napari_kaf._suggest import next_slice_to_label, slice_scores
from napari_kaf._widget import KafWidget

PAINTED = (2, 9)


@pytest.fixture
def viewer():
    from napari.components import ViewerModel

    return ViewerModel()


@pytest.fixture
def make_widget(qtbot, viewer):
    def make(target=None):
        widget = KafWidget(target if target is not None else viewer)
        qtbot.addWidget(widget)
        widget.show()  # clicks go to controls a user could see
        return widget

    return make


def _quick(widget: KafWidget, user, steps: int = 3) -> None:
    """The test settings, typed in: a few tiny steps on the CPU."""
    user.type_value(widget.steps_spin, steps)
    user.type_value(widget.batch_spin, 2)
    user.type_value(widget.crop_spin, 32)
    user.choose(widget.device_combo, widget.device_combo.itemText(widget.device_combo.findData("cpu")))


def _add_synthetic(viewer):
    volume, labels = synthetic_volume()
    image = viewer.add_image(volume.array, **layer_kwargs(volume, "scan"))
    return image, labels


def _errors(shown):
    return [message for severity, message in shown if severity == "error"]


def _entries(combo) -> list[str]:
    return [combo.itemText(i) for i in range(combo.count())]


def test_panel_lists_layers_and_new_makes_an_empty_annotation_layer(viewer, make_widget, user, notifications):
    widget = make_widget()
    assert widget.image_combo.count() == 0
    image, _ = _add_synthetic(viewer)
    viewer.add_image(np.zeros((5, 5)), name="kaf:uncertainty")  # plugin outputs are not offered as inputs
    assert _entries(widget.image_combo) == ["scan"]
    image.name = "renamed scan"
    assert widget.image_combo.currentText() == "renamed scan"

    user.click(widget.new_annotation_button)  # clicked(False) once landed in image_layer: issue #22
    assert not _errors(notifications), notifications
    layer = viewer.layers[ANNOTATION]
    assert layer.data.shape == image.data.shape and not layer.data.any()
    np.testing.assert_allclose(layer.scale, image.scale)
    np.testing.assert_allclose(layer.metadata["affine"], image.metadata["affine"])
    assert layer.mode == "paint" and viewer.layers.selection.active is layer
    assert widget.annotation_combo.currentText() == ANNOTATION

    user.click(widget.new_annotation_button)  # still empty: the same layer, no second one
    assert [x.name for x in viewer.layers if x.name.startswith(ANNOTATION)] == [ANNOTATION]
    layer.data[3] = 1
    user.click(widget.new_annotation_button)  # painted: a new empty one, the painted one kept
    assert widget.annotation_combo.currentText() != ANNOTATION
    assert not viewer.layers[widget.annotation_combo.currentText()].data.any()
    assert viewer.layers[ANNOTATION].data[3].all()


def test_annotation_never_starts_on_a_layer_the_user_did_not_choose(viewer, make_widget, user, notifications):
    widget = make_widget()
    for data, kwargs, kind in synthetic_sample():  # the image and its hidden full reference labels
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    assert _entries(widget.annotation_combo) == [NEW_ANNOTATION, "Synthetic ring reference labels"]
    assert widget.annotation_combo.currentText() == NEW_ANNOTATION
    assert widget.annotation_layer() is None

    user.choose(widget.annotation_combo, "Synthetic ring reference labels")  # chosen: warned at once
    [warning] = [m for s, m in notifications if s == "warning"]
    assert "'Synthetic ring reference labels' has all 12 slices painted" in warning
    assert "full labelling" in warning

    # Fine-tune from "New empty layer" trains on nothing the user did not paint.
    user.choose(widget.annotation_combo, NEW_ANNOTATION)
    _quick(widget, user)
    user.click(widget.finetune_button)
    assert "no slice is annotated" in _errors(notifications)[-1]
    assert widget.annotation_combo.currentText() == ANNOTATION and not viewer.layers[ANNOTATION].data.any()
    assert not widget.controller.busy


def test_devices_and_cpu_warning(make_widget, user):
    widget = make_widget()
    names = [widget.device_combo.itemData(i) for i in range(widget.device_combo.count())]
    assert names[0] == "auto" and names[-1] == "cpu"
    expected_cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert [n for n in names if n.startswith("cuda")] == expected_cuda
    user.choose(widget.device_combo, widget.device_combo.itemText(len(names) - 1))
    assert widget.device_name() == "cpu"
    assert not widget.cpu_warning_label.isHidden() and "CPU" in widget.cpu_warning_label.text()


def test_checkpoint_menu_and_browse(make_widget, user, monkeypatch, tmp_path):
    from qtpy.QtWidgets import QFileDialog

    widget = make_widget()
    keys = [widget.checkpoint_combo.itemData(i) for i in range(widget.checkpoint_combo.count())]
    assert keys == ["default", "random", "file"]
    assert "pretrained" in widget.checkpoint_combo.itemText(0)
    assert widget.checkpoint_combo.itemText(1) == "Random initialisation"
    assert widget.checkpoint_row.isHidden()
    user.choose(widget.checkpoint_combo, "Random initialisation")
    assert widget.chosen_checkpoint() is None
    user.choose(widget.checkpoint_combo, "Checkpoint file...")
    assert not widget.checkpoint_row.isHidden()
    chosen = tmp_path / "mine.safetensors"
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *_args, **_kwargs: (str(chosen), ""))
    user.click(widget.browse_button)
    assert widget.checkpoint_edit.text() == str(chosen) and widget.chosen_checkpoint() == chosen


def test_every_setting_is_set_by_the_user_and_remembered(make_widget, user, _private_settings):
    from qtpy.QtCore import QSettings

    first = make_widget()
    assert not first.uncertainty_check.isChecked()  # off by default: it washes out image and prediction
    user.type_value(first.steps_spin, 42)
    user.choose(first.preset_combo, "paper-chd")
    user.choose(first.device_combo, first.device_combo.itemText(first.device_combo.count() - 1))
    user.click(first.time_budget_check)
    user.type_value(first.time_budget_spin, 90)
    user.type_value(first.batch_spin, 3)
    user.type_value(first.crop_spin, 48)
    user.click(first.adapt_check)
    user.type_value(first.adapt_spin, 20)
    user.click(first.predict_after_check)
    user.click(first.all_slices_check)
    user.click(first.uncertainty_check)
    user.choose(first.level_combo, "level 3")
    user.type_value(first.head_spin, 2)
    stored = QSettings(ORGANISATION, APPLICATION)  # written on change: the file already holds them
    assert stored.fileName().startswith(str(_private_settings))
    assert int(stored.value("steps")) == 42

    second = make_widget()
    settings = second.finetune_settings()
    assert (settings.steps, settings.preset, settings.device) == (42, "paper-chd", "cpu")
    assert (settings.time_budget, settings.batch_size, settings.crop_size) == (90.0, 3, 48)
    assert second.adapt_check.isChecked() and second.adapt_spin.value() == 20
    assert not second.predict_after_check.isChecked()
    assert second.all_slices_check.isChecked() and second.uncertainty_check.isChecked()
    assert second.level_combo.currentData() == 3 and second.head_spin.value() == 2


def test_buttons_without_their_inputs_give_one_message_each(
    viewer, make_widget, user, notifications, wait_idle
):
    widget = make_widget()
    user.click(widget.finetune_button)
    assert "No image is open" in _errors(notifications)[-1]

    viewer.add_image(np.zeros((32, 32), np.float32), name="flat")
    user.click(widget.finetune_button)
    assert "has 2 dimensions" in _errors(notifications)[-1]

    viewer.layers.remove("flat")
    _add_synthetic(viewer)
    user.click(widget.predict_button)  # with the pretrained default, which cannot segment yet
    wait_idle(widget)
    assert "not a fine-tuned model: fine-tune from it first" in _errors(notifications)[-1]
    for button in (widget.next_slice_button, widget.accept_button):
        user.click(button)
        assert "There is no prediction yet" in _errors(notifications)[-1]
    user.click(widget.keypoints_button)
    assert "no model to inspect" in _errors(notifications)[-1]
    user.click(widget.save_segmentation_button)
    assert "no segmentation to save" in _errors(notifications)[-1]
    user.click(widget.save_checkpoint_button)
    assert "no fine-tuned model to save" in _errors(notifications)[-1]
    assert not widget.controller.busy
    assert all(severity == "error" for severity, _ in notifications)


@pytest.fixture
def painted(viewer, make_widget, user, notifications):
    """A widget on the synthetic volume: New clicked, slices 2 and 9 painted, quick settings typed in."""
    image, labels = _add_synthetic(viewer)
    widget = make_widget()
    user.click(widget.new_annotation_button)
    viewer.layers[ANNOTATION].data[list(PAINTED)] = labels[list(PAINTED)]
    _quick(widget, user)
    return widget, image, labels


def test_checkpoint_mismatch_is_reported(painted, user, tmp_path, notifications, wait_idle):
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
    path = save_checkpoint(tmp_path / "chd.safetensors", {"encoder.stem.weight": torch.zeros(1)}, metadata)
    user.choose(widget.checkpoint_combo, "Checkpoint file...")
    widget.checkpoint_edit.setText(str(path))
    user.click(widget.finetune_button)
    wait_idle(widget)
    message = _errors(notifications)[-1]
    assert "chd.safetensors" in message and "paper-chd" in message and "interactive" in message
    assert widget.controller.model is None and PREDICTION not in widget.viewer.layers
    assert widget.finetune_button.text() == "Fine-tune" and widget.finetune_button.isEnabled()


def test_stop_midway_and_two_jobs_refused(painted, user, qtbot, notifications, wait_idle):
    widget, _, _ = painted
    controller = widget.controller
    user.type_value(widget.steps_spin, 10_000)
    user.click(widget.finetune_button)
    assert widget.finetune_button.text() == "Stop" and widget.finetune_button.isEnabled()
    assert not widget.predict_button.isEnabled() and not widget.keypoints_button.isEnabled()
    assert widget.start_predict() is False  # a second job is refused (its button is disabled)
    assert any("already fine-tuning" in message for _, message in notifications)

    qtbot.waitUntil(
        lambda: controller.last_event is not None and controller.last_event.stage == "finetune",
        timeout=180_000,
    )
    stopped_at = controller.last_event.step
    user.click(widget.finetune_button)  # Stop
    wait_idle(widget, timeout=120_000)
    assert controller.last_event.step <= stopped_at + 2  # within one step (plus one already on its way)
    assert controller.model is None and PREDICTION not in widget.viewer.layers  # no half state
    assert widget.finetune_button.text() == "Fine-tune"
    assert all(button.isEnabled() for button in widget.job_buttons().values())
    assert notifications[-1] == ("info", "Stopped fine-tuning; nothing was changed.")
    assert "Stopped" in widget.status_label.text()

    # The next job runs normally.
    user.type_value(widget.steps_spin, 1)
    user.click(widget.predict_after_check)
    user.click(widget.finetune_button)
    wait_idle(widget)
    assert controller.model is not None and not _errors(notifications)


def test_whole_loop_by_clicks(painted, user, qtbot, tmp_path, monkeypatch, notifications, wait_idle, plugins):
    from qtpy.QtWidgets import QFileDialog

    widget, image, _ = painted
    viewer = widget.viewer
    assert "Measured here" not in widget.cpu_warning_label.text()
    user.click(widget.finetune_button)
    wait_idle(widget)
    assert not _errors(notifications), notifications

    # The device note now states this machine's measured step time, and rescales with the steps typed.
    measured = widget.controller.step_times["cpu"]
    assert f"{measured.per_step:.2f} s per fine-tuning step" in widget.cpu_warning_label.text()
    user.type_value(widget.steps_spin, 100)
    assert f"about {measured.per_step * 100:.0f} s for 100 steps" in widget.cpu_warning_label.text()
    user.type_value(widget.steps_spin, 3)

    # Prediction on the image grid, the structure found on unpainted slices too; uncertainty hidden, under it.
    prediction, uncertainty = viewer.layers[PREDICTION], viewer.layers[UNCERTAINTY]
    assert prediction.data.shape == image.data.shape
    np.testing.assert_allclose(prediction.scale, image.scale)
    assert set(np.unique(prediction.data)) <= {0, 1, 2} and (prediction.data[5] > 0).sum() > 100
    assert uncertainty.data.min() >= 0.0 and uncertainty.data.max() <= 1.0
    assert not uncertainty.visible
    assert viewer.layers.index(uncertainty) < viewer.layers.index(prediction)
    user.click(widget.uncertainty_check)
    assert uncertainty.visible
    user.click(widget.uncertainty_check)
    assert not uncertainty.visible

    # Predicting again updates the same layers in place.
    user.click(widget.predict_button)
    wait_idle(widget)
    assert viewer.layers[PREDICTION] is prediction and viewer.layers[UNCERTAINTY] is uncertainty

    # Next slice: the most uncertain unpainted slice, and the view moves there.
    user.click(widget.next_slice_button)
    index = current_slice(viewer, image, 0)
    assert index == next_slice_to_label(uncertainty.data, prediction.data, PAINTED, 0)
    assert index not in PAINTED and viewer.dims.point[0] == pytest.approx(index * image.scale[0])

    # Accept the prediction there: it becomes annotation, and Ctrl+Z undoes it.
    annotation = viewer.layers[ANNOTATION]
    user.click(widget.accept_button)
    np.testing.assert_array_equal(annotation.data[index], prediction.data[index])
    annotation.undo()
    assert not annotation.data[index].any()
    annotation.redo()

    # Keypoints of the current slice: 3D points with score/index/level/head features, sized to the image.
    user.click(widget.keypoints_button)
    wait_idle(widget)
    points = viewer.layers[KEYPOINTS]
    assert points.ndim == 3 and len(points.data) > 4
    np.testing.assert_array_equal(points.data[:, 0], index)
    assert {"score", "index", "level", "head"} <= set(points.features.columns)
    np.testing.assert_array_equal(points.features["index"], np.arange(len(points.data)))
    np.testing.assert_allclose(points.scale, image.scale)
    assert points.projection_mode == "rescale_linear"  # napari 0.9's name for out_of_slice_display=True
    assert points.size[0] == pytest.approx(1.0)  # 64 x 64 slices: 1/80 of a side, but at least 1 pixel
    assert points.opacity == KEYPOINT_OPACITY and ATTENTION not in viewer.layers

    # Choosing a keypoint shows its attention map with a colour bar; the markers fade over it.
    user.type_value(widget.keypoint_spin, 2)
    qtbot.waitUntil(lambda: ATTENTION in viewer.layers, timeout=60_000)
    attention = viewer.layers[ATTENTION]
    assert attention.data.shape == image.data.shape
    np.testing.assert_allclose(attention.scale, image.scale)
    assert attention.colormap.name == "inferno" and attention.colorbar.visible
    assert attention.data[index].max() == pytest.approx(1.0)
    assert not np.delete(attention.data, index, axis=0).any()
    assert attention.metadata["keypoint"] == 2
    assert points.opacity == KEYPOINT_DIMMED_OPACITY
    assert viewer.layers.index(attention) < viewer.layers.index(points)
    attention.visible = False
    assert points.opacity == KEYPOINT_OPACITY
    attention.visible = True

    # Head and level update the same layer in place, and the keypoints' features follow.
    before = attention.data[index].copy()
    user.type_value(widget.head_spin, 3)
    qtbot.waitUntil(lambda: attention.metadata["head"] == 3, timeout=60_000)
    user.choose(widget.level_combo, "level 4")
    qtbot.waitUntil(lambda: attention.metadata["level"] == 4, timeout=60_000)
    assert viewer.layers[ATTENTION] is attention and not np.allclose(attention.data[index], before)
    assert (points.features["level"] == 4).all() and (points.features["head"] == 3).all()

    # Save the segmentation through the writer and the model; both read back.
    target = tmp_path / "segmentation.nii.gz"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *_args, **_kwargs: (str(target), ""))
    user.click(widget.save_segmentation_button)
    back = read_volume(target)
    np.testing.assert_array_equal(back.array, prediction.data)
    np.testing.assert_allclose(back.affine, image.metadata["affine"])
    model_path = tmp_path / "model.safetensors"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *_args, **_kwargs: (str(model_path), ""))
    user.click(widget.save_checkpoint_button)
    wait_idle(widget)
    _, metadata = load_finetuned_model(model_path)
    assert metadata.method == "finetune" and metadata.steps == 3
    assert not _errors(notifications), notifications


def test_shortcuts_run_the_actions_through_napari_keybindings(painted, qtbot, notifications, wait_idle):
    from napari.utils.key_bindings import KeymapHandler
    from qtpy.QtWidgets import QWidget

    widget, image, _ = painted
    viewer = widget.viewer
    keys = KeymapHandler()
    keys.keymap_providers = [viewer]  # what the Qt viewer does with a key press on the canvas
    tooltips = " ".join(child.toolTip() for child in widget.findChildren(QWidget))
    for shortcut in SHORTCUTS:  # each is listed in a tooltip
        assert f"({shortcut.key.replace('-', '+')})" in tooltips

    keys.press_key("Shift-F")
    assert widget.finetune_button.text() == "Stop"
    wait_idle(widget)
    prediction, uncertainty = viewer.layers[PREDICTION], viewer.layers[UNCERTAINTY]
    keys.press_key("Shift-S")
    assert not prediction.visible
    keys.press_key("Shift-S")
    assert prediction.visible
    keys.press_key("Shift-U")
    assert uncertainty.visible and widget.uncertainty_check.isChecked()
    keys.press_key("Shift-N")
    index = current_slice(viewer, image, 0)
    assert index not in PAINTED
    keys.press_key("Shift-C")
    np.testing.assert_array_equal(viewer.layers[ANNOTATION].data[index], prediction.data[index])
    keys.press_key("Shift-K")
    wait_idle(widget)
    assert (viewer.layers[KEYPOINTS].data[:, 0] == index).all()
    assert not _errors(notifications), notifications

    widget.close()  # a closed panel takes its keys back
    keys.press_key("Shift-F")
    assert not widget.controller.busy


def test_keypoints_of_all_slices_and_attention_of_another_slice(
    painted, user, qtbot, notifications, wait_idle
):
    """With "Keypoints of all slices" the layer holds every slice's keypoints; choosing one on another
    slice explains that slice, moves the view there and shows that keypoint's attention."""
    widget, image, _ = painted
    viewer = widget.viewer
    user.click(widget.finetune_button)
    wait_idle(widget)
    viewer.dims.set_point(0, 4 * image.scale[0])
    user.click(widget.all_slices_check)
    user.click(widget.keypoints_button)
    wait_idle(widget)
    points = viewer.layers[KEYPOINTS]
    slices = points.features["slice"].to_numpy()
    assert set(slices) == set(range(image.data.shape[0]))
    np.testing.assert_array_equal(points.data[:, 0], slices)  # each point lies on its own slice
    on_four = slices == 4
    np.testing.assert_array_equal(points.features["index"][on_four], np.arange(on_four.sum()))
    np.testing.assert_allclose(points.data[on_four, 1:], widget.controller.explanation.keypoints)

    widget.inspector.select_keypoint(1, slice_index=7)  # what a click on that marker does
    qtbot.waitUntil(lambda: ATTENTION in viewer.layers, timeout=60_000)
    wait_idle(widget)
    assert widget.controller.explanation.slice_index == 7 and widget.keypoint_spin.value() == 1
    assert current_slice(viewer, image, 0) == 7
    attention = viewer.layers[ATTENTION]
    assert attention.metadata["slice"] == 7 and attention.metadata["keypoint"] == 1
    assert attention.data[7].max() == pytest.approx(1.0)
    assert not np.delete(attention.data, 7, axis=0).any()
    assert not _errors(notifications), notifications


def test_predict_from_a_saved_checkpoint(viewer, make_widget, user, tmp_path, notifications, wait_idle):
    """Without a session model, Predict uses a fine-tuned checkpoint file."""
    from kaf.data.intensity import fit_normalization

    image, _ = _add_synthetic(viewer)
    config = preset_config("interactive", classes=3)
    metadata = CheckpointMetadata(
        preset="interactive",
        model=config.to_dict(),
        method="finetune",
        label_names=["background", "ring", "disc"],
        normalization=fit_normalization(image.data, "auto").to_dict(),
        keypoints=KeypointConfig(max_keypoints=config.max_keypoints).to_dict(),
    )
    path = save_checkpoint(tmp_path / "finetuned.safetensors", KafUNet(config).state_dict(), metadata)
    widget = make_widget()
    _quick(widget, user)
    user.choose(widget.checkpoint_combo, "Checkpoint file...")
    widget.checkpoint_edit.setText(str(path))
    user.click(widget.predict_button)
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


def test_keypoint_markers_scale_with_the_image():
    from napari_kaf._controller import ImageRef
    from napari_kaf._layers import keypoint_size

    def size(shape):
        return keypoint_size(ImageRef(("image", 0), shape, {"scale": (3.0, 0.5, 0.5)}), 0)

    assert size((10, 256, 320)) == pytest.approx(256 / 80)
    assert size((10, 512, 512)) == pytest.approx(2 * size((10, 256, 256)))
    assert size((10, 32, 32)) == 1.0  # never below one pixel


def test_full_labelling_is_every_slice_painted():
    from napari_kaf._annotation import is_full_labelling

    labels = np.zeros((6, 8, 8), np.uint8)
    labels[:, 3, 3] = 1
    assert is_full_labelling(labels, 0)
    labels[4] = 0
    assert not is_full_labelling(labels, 0)
    assert not is_full_labelling(np.ones((2, 8, 8), np.uint8), 0)  # two slices: a few, not a labelling


def test_every_setting_spin_box_allows_only_values_the_core_accepts(make_widget):
    """The panel's ranges are practical limits inside the core's validation bounds, so a value typed in
    the panel is never refused later by the job it starts."""
    widget = make_widget()
    limits = {
        widget.steps_spin: validation.STEPS,
        widget.batch_spin: validation.BATCH_SIZE,
        widget.crop_spin: validation.TRAINING_SIDE,
        widget.time_budget_spin: validation.TIME_BUDGET,
        widget.adapt_spin: validation.TIME_BUDGET,
    }
    for spin, bounds in limits.items():
        for value in (spin.minimum(), spin.maximum()):
            assert bounds.check(value, spin.objectName() or "a spin box") == value
