"""Make the napari screenshots in docs/ from a real session on the MNI152 sample (needs OpenGL):

    xvfb-run -a -s "-screen 0 1600x1200x24" python docs/make_screenshots.py [--steps 150]

It opens the plugin's MNI152 sample, paints two axial slices from the reference tissue labels (what an
annotator would paint), fine-tunes with the widget, predicts, goes to the suggested next slice, and shows
the keypoints and one keypoint's attention. It writes napari_finetune.png (training in progress),
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
        while widget.busy or widget._follow_up is not None:
            pump(0.1)

    # Paint two axial slices, as an annotator would, from the reference tissue labels.
    annotation = widget.new_annotation_layer()
    painted = (38, 58)
    for z in painted:
        rows, cols = np.nonzero(np.ones(reference.data.shape[1:], dtype=bool))
        annotation.data_setitem((np.full(rows.size, z), rows, cols), reference.data[z][rows, cols])
    _camera(viewer).orientation2d = ("up", "right")  # anterior at the top, as axial slices are shown
    viewer.dims.set_point(0, image.data_to_world((painted[0], 0, 0))[0])
    widget.steps_spin.setValue(args.steps)
    widget._select_data(widget.device_combo, "cpu")
    widget.predict_after_check.setChecked(True)
    widget.uncertainty_check.setChecked(True)
    pump()

    widget.finetune_button.click()
    while widget.last_event is None or widget.last_event.stage != "finetune" or widget.last_event.step < 12:
        pump(0.1)
    pump(0.5)
    viewer.screenshot(str(args.out / "napari_finetune.png"), canvas_only=False)
    wait_idle()

    index = widget.go_to_next_slice()
    viewer.layers["MNI152 T1 reference labels"].visible = False
    pump()
    viewer.screenshot(str(args.out / "napari_predict.png"), canvas_only=False)

    viewer.layers["kaf:uncertainty"].visible = False
    viewer.layers["kaf:prediction"].visible = False
    viewer.layers["kaf:annotation"].visible = False
    widget.keypoints_button.click()
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
    print(
        f"screenshots written to {args.out}; next slice suggested: {index}; "
        f"keypoint clicked: {widget.keypoint_spin.value()}"
    )
    viewer.close()


if __name__ == "__main__":
    main()
