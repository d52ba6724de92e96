"""Real napari viewers (Xvfb + Mesa OpenGL): the widget opened through napari's plugin manager drives the
whole loop on a real MRI, and screenshots prove the overlays are drawn. Run under `xvfb-run -a`."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari", reason="napari is not installed: pip install -e '.[test,napari]'")

from napari_kaf._marshal import ANNOTATION, ATTENTION, KEYPOINTS, PREDICTION, UNCERTAINTY, layer_kwargs
from napari_kaf._widget import KafWidget

pytestmark = pytest.mark.gui
PAINTED = (2, 7)
INSPECTED = 5  # an unpainted slice between the two painted ones


def _camera(viewer):
    """napari 0.9 moved the camera to `viewer.scene.camera`; older versions have `viewer.camera`."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def _open_widget(viewer) -> KafWidget:
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-kaf", "KAF Segment")
    assert isinstance(widget, KafWidget)
    return widget


def _menu_texts(menu) -> list[str]:
    texts = []
    for action in menu.actions():
        texts.append(action.text())
        if action.menu() is not None:
            texts.extend(_menu_texts(action.menu()))
    return texts


def _canvas_pixel(viewer, world_yx, shape) -> tuple[int, int]:
    """(x, y) canvas pixel of a world (y, x) position in the 2D view."""
    center = np.asarray(_camera(viewer).center)[-2:]
    zoom = _camera(viewer).zoom
    height, width = shape[:2]
    y = (world_yx[0] - center[0]) * zoom + height / 2
    x = (world_yx[1] - center[1]) * zoom + width / 2
    return round(x), round(y)


def _change(before: np.ndarray, after: np.ndarray, x: int, y: int, radius: int = 3) -> float:
    window = (slice(max(y - radius, 0), y + radius + 1), slice(max(x - radius, 0), x + radius + 1))
    difference = np.abs(after[..., :3].astype(int) - before[..., :3].astype(int)).sum(-1)
    return float(difference[window].mean())


def _click(viewer, qtbot, x: int, y: int) -> None:
    from qtpy.QtCore import QPoint, Qt

    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.mouseClick(canvas, Qt.MouseButton.LeftButton, pos=QPoint(x, y))


@pytest.fixture
def mri_viewer(make_napari_viewer, mni_crop, notifications):
    """A real viewer holding 10 slices of the MNI152 T1 MRI, the widget docked through the plugin manager,
    and two slices painted from the reference tissue labels (what an annotator would paint)."""
    volume, labels, _names = mni_crop
    viewer = make_napari_viewer(show=True)  # shown, so that clicks on the canvas reach napari
    viewer.window.resize(1200, 800)
    image = viewer.add_image(volume.array, **layer_kwargs(volume, "MNI152 T1"))
    widget = _open_widget(viewer)
    annotation = widget.new_annotation_layer()
    for z in PAINTED:
        rows, cols = np.nonzero(np.ones(labels.shape[1:], dtype=bool))
        annotation.data_setitem((np.full(rows.size, z), rows, cols), labels[z][rows, cols])
    # Random initialisation: this test is about the viewer loop. From the shipped default checkpoint
    # (tested in tests/core/test_default_weights.py) 8 steps leave this crop's brain at 0.63 Dice.
    widget._select_data(widget.checkpoint_combo, "random")
    widget.steps_spin.setValue(8)
    widget.batch_spin.setValue(2)
    widget.crop_spin.setValue(64)
    widget._select_data(widget.device_combo, "cpu")
    return viewer, widget, image, labels


def test_widget_is_listed_and_opens_through_the_plugin_manager(make_napari_viewer):
    viewer = make_napari_viewer()
    assert "KAF Segment (KAF Segment)" in _menu_texts(viewer.window.plugins_menu)
    widget = _open_widget(viewer)
    assert widget.image_combo.count() == 0
    viewer.open_sample("napari-kaf", "synthetic")
    assert widget.image_combo.currentText() == "Synthetic ring"


def test_whole_loop_on_a_real_mri(mri_viewer, qtbot, notifications, wait_idle):
    viewer, widget, image, labels = mri_viewer
    qtbot.mouseClick(widget.finetune_button, _left())
    assert widget.finetune_button.text() == "Stop"
    wait_idle(widget)
    assert not [m for s, m in notifications if s == "error"], notifications

    # The prediction: the volume's shape, and it found the brain and both tissues on unpainted slices.
    prediction = viewer.layers[PREDICTION].data
    assert prediction.shape == image.data.shape == labels.shape
    unpainted = [z for z in range(labels.shape[0]) if z not in PAINTED]
    predicted, reference = prediction[unpainted], labels[unpainted]
    brain, true_brain = predicted > 0, reference > 0
    assert 2 * (brain & true_brain).sum() / (brain.sum() + true_brain.sum()) > 0.85
    assert (predicted == reference).mean() > (reference == 0).mean() + 0.1  # beats "all background"
    assert set(np.unique(predicted)) == {0, 1, 2}
    assert viewer.layers[UNCERTAINTY].data.shape == labels.shape

    # Keypoints of an unpainted slice.
    viewer.dims.set_point(0, image.data_to_world((INSPECTED, 0, 0))[0])
    viewer.layers[UNCERTAINTY].visible = False
    qtbot.mouseClick(widget.keypoints_button, _left())
    wait_idle(widget)
    points = viewer.layers[KEYPOINTS]
    assert points.ndim == 3 and len(points.data) >= 16
    np.testing.assert_array_equal(points.data[:, 0], INSPECTED)
    assert {"score", "index", "level"} <= set(points.features.columns)
    assert ATTENTION not in viewer.layers

    # Click the strongest keypoint on the canvas: its attention map appears and is drawn there.
    viewer.reset_view()
    before = viewer.screenshot(canvas_only=True)
    chosen = 0
    world = np.asarray(points.data_to_world(points.data[chosen]))
    x, y = _canvas_pixel(viewer, world[1:], before.shape)
    _click(viewer, qtbot, x, y)
    qtbot.waitUntil(lambda: ATTENTION in viewer.layers, timeout=60_000)
    selected = widget.keypoint_spin.value()
    assert selected >= 0 and selected in points.selected_data
    picked = np.asarray(points.data_to_world(points.data[selected]))
    assert np.hypot(*(picked[1:] - world[1:])) < 3 * image.scale[-1]  # the click hit (a neighbour of) it
    attention = viewer.layers[ATTENTION]
    np.testing.assert_allclose(attention.scale, image.scale)
    np.testing.assert_allclose(attention.translate, image.translate)
    after = viewer.screenshot(canvas_only=True)
    x, y = _canvas_pixel(viewer, picked[1:], after.shape)
    assert attention.data[INSPECTED][round(points.data[selected][1]), round(points.data[selected][2])] > 0.3
    assert _change(before, after, x, y) > 30, "the attention overlay is not drawn near the keypoint"
    peak = np.unravel_index(np.argmax(attention.data[INSPECTED]), attention.data.shape[1:])
    peak_world = attention.data_to_world((INSPECTED, *peak))
    assert _change(before, after, *_canvas_pixel(viewer, peak_world[1:], after.shape)) > 30

    # A head change updates the drawn map in place.
    widget.head_spin.setValue(1)
    qtbot.waitUntil(lambda: attention.metadata["head"] == 1, timeout=60_000)
    assert viewer.layers[ATTENTION] is attention


def test_stop_midway_keeps_the_viewer_usable(mri_viewer, qtbot, notifications, wait_idle):
    viewer, widget, image, _labels = mri_viewer
    widget.steps_spin.setValue(10_000)
    qtbot.mouseClick(widget.finetune_button, _left())
    assert not widget.predict_button.isEnabled()
    qtbot.waitUntil(
        lambda: widget.last_event is not None and widget.last_event.stage == "finetune", timeout=180_000
    )
    qtbot.mouseClick(widget.finetune_button, _left())  # Stop
    wait_idle(widget, timeout=120_000)
    assert widget._model is None and PREDICTION not in viewer.layers
    assert widget.finetune_button.text() == "Fine-tune" and widget.predict_button.isEnabled()
    assert any("stopped" in message for _, message in notifications)
    assert not [m for s, m in notifications if s == "error"]

    # The viewer still works: move through slices, paint, add a layer, draw.
    viewer.dims.set_point(0, image.data_to_world((4, 0, 0))[0])
    viewer.layers[ANNOTATION].data_setitem((np.array([4]), np.array([50]), np.array([50])), 1)
    viewer.add_points(np.array([[4.0, 50.0, 50.0]]), name="after stop")
    assert viewer.screenshot(canvas_only=True).std() > 0


def _left():
    from qtpy.QtCore import Qt

    return Qt.MouseButton.LeftButton


def test_demo_outputs_open_in_napari_with_the_widget(tmp_path, monkeypatch, plugins, make_napari_viewer):
    """`kaf demo` opens its folder through `python -m napari_kaf.show_demo`: image, uncertainty, reference,
    annotation and prediction layers on the image's grid, and the KAF Segment dock widget."""
    import napari

    from kaf.data.volume_io import Volume, write_labels, write_volume
    from napari_kaf import show_demo
    from napari_kaf._sample_data import synthetic_volume

    volume, labels = synthetic_volume()
    write_volume(volume.array, volume.affine, tmp_path / "image.nii.gz")
    write_volume(np.zeros_like(volume.array), volume.affine, tmp_path / "uncertainty.nii.gz")
    annotation = np.zeros_like(labels)
    annotation[[3, 9]] = labels[[3, 9]]
    image = Volume(volume.array, volume.affine)
    for name, array in (("reference", labels), ("annotation", annotation), ("segmentation", labels)):
        write_labels(array, image, tmp_path / f"{name}.nii.gz")
    viewers = []
    monkeypatch.setattr(
        napari, "Viewer", lambda **kwargs: viewers.append(make_napari_viewer(**kwargs)) or viewers[-1]
    )
    monkeypatch.setattr(napari, "run", lambda: None)
    show_demo.show(tmp_path)
    viewer = viewers[0]
    names = [layer.name for layer in viewer.layers]
    assert names == ["image", "kaf:uncertainty", "reference", "kaf:annotation", "kaf:prediction"]
    assert np.array_equal(viewer.layers["kaf:prediction"].data, labels)
    assert viewer.dims.current_step[0] == 3  # the first annotated slice
    assert any(isinstance(widget, KafWidget) for widget in viewer.window.dock_widgets.values())
