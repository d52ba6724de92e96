"""napari plugin tests: widget tests on a canvas-free ViewerModel (any Qt platform, offscreen included)
and real-viewer tests (`gui`) that need an X display with OpenGL (run under `xvfb-run -a`)."""

from __future__ import annotations

import os

# Before any QApplication exists: without a display, Qt runs offscreen (no OpenGL, so no real viewer).
if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest

HEADLESS = os.environ.get("QT_QPA_PLATFORM") == "offscreen" or not (
    os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
)


@pytest.fixture(autouse=True)
def _needs_display(request):
    if HEADLESS and request.node.get_closest_marker("gui"):
        pytest.skip(
            "a real napari viewer needs an X display with OpenGL; run under `xvfb-run -a` "
            "(QT_QPA_PLATFORM=offscreen has no OpenGL)"
        )


@pytest.fixture(autouse=True)
def _private_settings(tmp_path, monkeypatch):
    """Every test gets its own QSettings files, so remembered choices never leak between tests or into
    the user's real settings."""
    from qtpy.QtCore import QSettings

    folder = tmp_path / "qsettings"
    folder.mkdir()
    for settings_format in (QSettings.Format.NativeFormat, QSettings.Format.IniFormat):
        QSettings.setPath(settings_format, QSettings.Scope.UserScope, str(folder))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(folder))
    return folder


@pytest.fixture(scope="session")
def _plugins():
    """Register installed npe2 manifests (a bare ViewerModel does not; a napari Viewer does)."""
    import npe2

    manager = npe2.PluginManager.instance()
    manager.discover(include_npe1=False)
    assert "napari-kaf" in manager._manifests, "napari-kaf is not installed: pip install -e '.[napari]'"
    return manager


@pytest.fixture
def plugins(_plugins):
    return _plugins


@pytest.fixture
def notifications(monkeypatch):
    """Every notification the widget shows, as (severity, message)."""
    import napari_kaf._widget as widget_module

    shown: list[tuple[str, str]] = []
    for severity in ("error", "warning", "info"):
        monkeypatch.setattr(
            widget_module, f"show_{severity}", lambda message, s=severity: shown.append((s, str(message)))
        )
    return shown


@pytest.fixture(scope="session")
def mni_sample():
    """The plugin's MNI152 sample: [(image, kwargs, "image"), (labels, kwargs, "labels")] (loaded once)."""
    from napari_kaf._sample_data import mni152_sample

    return mni152_sample()


@pytest.fixture(scope="session")
def mni_crop(mni_sample):
    """A real MRI: the MNI152 template (nilearn's wheel) cut to 10 axial slices, with its tissue labels."""
    from kaf.data.volume_io import Volume

    (image, image_kwargs, _), (labels, label_kwargs, _) = mni_sample
    volume = Volume(image, image_kwargs["metadata"]["affine"])
    names = label_kwargs["metadata"]["label_names"]
    first = 40
    shift = np.eye(4)
    shift[2, 3] = first  # the crop's voxel 0 is the template's slice 40
    affine = volume.affine @ shift
    crop = slice(first, first + 10)
    return Volume(np.ascontiguousarray(volume.array[crop]), affine), np.ascontiguousarray(labels[crop]), names


@pytest.fixture
def wait_idle(qtbot):
    """Wait until the widget's job (and the prediction that may follow a fine-tune) has ended."""

    def wait(widget, timeout: int = 300_000) -> None:  # generous: CI machines may be shared and slow
        qtbot.waitUntil(lambda: not widget.controller.busy, timeout=timeout)

    return wait


class UserInput:
    """Real Qt input on the controls a user sees: mouse clicks on buttons and check boxes, keys on menus
    and spin boxes (no method calls, no `setValue`)."""

    def __init__(self, qtbot) -> None:
        self.qtbot = qtbot

    def click(self, widget) -> None:
        from qtpy.QtCore import QPoint, Qt

        assert widget.isVisible() and widget.isEnabled(), f"{widget.text()!r} is not there to click"
        # At the left end: a check box reacts to its indicator and text, not to the blank space after.
        self.qtbot.mouseClick(widget, Qt.MouseButton.LeftButton, pos=QPoint(6, widget.height() // 2))

    def choose(self, combo, text: str) -> None:
        """Pick the entry `text` of a menu with the keyboard: Home, then Down until it is chosen."""
        from qtpy.QtCore import Qt

        assert combo.isVisible() and combo.findText(text) >= 0, f"{text!r} is not in the menu"
        combo.setFocus()
        self.qtbot.keyClick(combo, Qt.Key.Key_Home)
        for _ in range(combo.count()):
            if combo.currentText() == text:
                return
            self.qtbot.keyClick(combo, Qt.Key.Key_Down)
        assert combo.currentText() == text

    def type_value(self, spin, value: int) -> None:
        """Select the spin box's text, type `value` and press Enter."""
        from qtpy.QtCore import Qt

        assert spin.isVisible() and spin.isEnabled()
        spin.setFocus()
        self.qtbot.keyClick(spin, Qt.Key.Key_A, Qt.KeyboardModifier.ControlModifier)
        self.qtbot.keyClicks(spin, str(value))
        self.qtbot.keyClick(spin, Qt.Key.Key_Return)
        assert spin.value() == value, f"typed {value}, the spin box holds {spin.value()}"

    def type_text(self, edit, text: str) -> None:
        """Select the line edit's text, type `text` and press Enter."""
        from qtpy.QtCore import Qt

        assert edit.isVisible() and edit.isEnabled()
        edit.setFocus()
        self.qtbot.keyClick(edit, Qt.Key.Key_A, Qt.KeyboardModifier.ControlModifier)
        self.qtbot.keyClicks(edit, text)
        self.qtbot.keyClick(edit, Qt.Key.Key_Return)
        assert edit.text() == text


@pytest.fixture
def user(qtbot) -> UserInput:
    return UserInput(qtbot)
