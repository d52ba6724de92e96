"""Make the napari screenshots in docs/ from a real session on the MNI152 sample (needs OpenGL):

    xvfb-run -a -s "-screen 0 1600x1200x24" python docs/make_screenshots.py [--steps 150]

It opens the plugin's MNI152 sample, clicks New and paints two axial slices from the reference tissue
labels (what an annotator would paint), then clicks through the widget as a user would: Fine-tune (which
predicts when done), Next slice, Show uncertainty, Show keypoints, and a click on the strongest keypoint.
It writes napari_finetune.png (training in progress),
napari_predict.png (prediction and uncertainty) and napari_inspect.png (keypoints and attention).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _camera(viewer):
    """napari 0.9 moved the camera to `viewer.scene.camera`; older versions have `viewer.camera`."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    import napari
    from qtpy.QtCore import QPoint, QSettings, Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication

    QSettings.setPath(
        QSettings.Format.NativeFormat, QSettings.Scope.UserScope, "/tmp/kaf-screenshot-settings"
    )
    viewer = napari.Viewer(show=True, title="KAF Segment")
    viewer.window.resize(1500, 950)
    viewer.open_sample("napari-kaf", "mni152")
    image, reference = viewer.layers["MNI152 T1"], viewer.layers["MNI152 T1 reference labels"]
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-kaf", "KAF Segment")
    app = QApplication.instance()

    def pump(seconds: float = 0.3) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)

    def wait_idle() -> None:
        while widget.controller.busy:
            pump(0.1)

    def click(control) -> None:
        QTest.mouseClick(control, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, QPoint(6, 8))
        pump(0.1)

    def type_value(spin, value: int) -> None:
        spin.setFocus()
        QTest.keyClick(spin, Qt.Key.Key_A, Qt.KeyboardModifier.ControlModifier)
        QTest.keyClicks(spin, str(value))
        QTest.keyClick(spin, Qt.Key.Key_Return)

    def choose(combo, text: str) -> None:
        combo.setFocus()
        QTest.keyClick(combo, Qt.Key.Key_Home)
        while combo.currentText() != text:
            QTest.keyClick(combo, Qt.Key.Key_Down)

    # New annotation layer, then paint two axial slices, as an annotator would, from the reference.
    pump()
    click(widget.new_annotation_button)
    annotation = viewer.layers[widget.annotation_combo.currentText()]
    painted = (38, 58)
    for z in painted:
        rows, cols = np.nonzero(np.ones(reference.data.shape[1:], dtype=bool))
        annotation.data_setitem((np.full(rows.size, z), rows, cols), reference.data[z][rows, cols])
    _camera(viewer).orientation2d = ("up", "right")  # anterior at the top, as axial slices are shown
    viewer.dims.set_point(0, image.data_to_world((painted[0], 0, 0))[0])
    type_value(widget.steps_spin, args.steps)
    choose(widget.device_combo, widget.device_combo.itemText(widget.device_combo.findData("cpu")))
    if not widget.predict_after_check.isChecked():
        click(widget.predict_after_check)
    pump()

    click(widget.finetune_button)
    last = lambda: widget.controller.last_event  # noqa: E731
    while last() is None or last().stage != "finetune" or last().step < 12:
        pump(0.1)
    pump(0.5)
    viewer.screenshot(str(args.out / "napari_finetune.png"), canvas_only=False)
    wait_idle()

    click(widget.next_slice_button)
    click(widget.uncertainty_check)  # off by default; shown here to document it, under the prediction
    pump()
    viewer.screenshot(str(args.out / "napari_predict.png"), canvas_only=False)

    click(widget.uncertainty_check)
    viewer.layers["kaf:prediction"].visible = False
    annotation.visible = False
    click(widget.keypoints_button)
    wait_idle()
    points = viewer.layers["kaf:keypoints"]
    viewer.reset_view()
    pump()
    # Click the strongest keypoint on the canvas, as a user would.
    world = np.asarray(points.data_to_world(points.data[0]))
    canvas = viewer.window._qt_viewer.canvas.native
    center, zoom = np.asarray(_camera(viewer).center)[-2:], _camera(viewer).zoom
    y_sign = -1 if _camera(viewer).orientation2d[0] == "up" else 1
    x = (world[2] - center[1]) * zoom + canvas.width() / 2
    y = y_sign * (world[1] - center[0]) * zoom + canvas.height() / 2
    QTest.mouseClick(
        canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, QPoint(round(x), round(y))
    )
    while "kaf:attention" not in viewer.layers:
        pump(0.1)
    pump(0.5)
    viewer.screenshot(str(args.out / "napari_inspect.png"), canvas_only=False)
    suggested = round(image.world_to_data(viewer.dims.point)[0])
    print(
        f"screenshots written to {args.out}; next slice suggested: {suggested}; "
        f"keypoint clicked: {widget.keypoint_spin.value()}"
    )
    viewer.close()


if __name__ == "__main__":
    main()
