"""Left clicks in slice views, as world RAS positions: how the module lets the user pick a keypoint.

A click is a left-button press and release at (nearly) the same place: a drag (window/level, panning with
a modifier) is no click. The observers only listen: Slicer's own handling of the events goes on as before.
Needs VTK and Slicer's MRML classes, not Qt, so it runs on the slicer-core wheel's classes in the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import slicer
import vtk

DRAG_TOLERANCE_PX = 3  # a press and release farther apart than this is a drag, not a click


def slice_view_ras(interactor, slice_node, x: float, y: float) -> np.ndarray:
    """The world RAS position under the display position (x, y) of a slice view's interactor, converted
    as Slicer's slice-view displayable managers convert it."""
    manager = slicer.vtkMRMLAbstractSliceViewDisplayableManager
    xyz = [0.0, 0.0, 0.0]
    manager.ConvertDeviceToXYZ(interactor, slice_node, float(x), float(y), xyz)
    ras = [0.0, 0.0, 0.0]
    manager.ConvertXYZToRAS(slice_node, xyz, ras)
    return np.array(ras)


def millimetres_per_pixel(slice_node) -> float:
    """The width of a screen pixel of a slice view, in millimetres: field of view over view width."""
    return slice_node.GetFieldOfView()[0] / max(slice_node.GetDimensions()[0], 1)


class SliceViewClicks:
    """Calls `on_click(ras, slice_node)` for each left click in the slice views it observes.

    `observe([(interactor, slice_node), ...])` starts listening (replacing what it listened to before);
    `stop()` removes every observer, after which clicks do nothing.
    """

    def __init__(self, on_click: Callable[[np.ndarray, object], None], priority: float = 1.0) -> None:
        self.on_click = on_click
        self.priority = priority  # before Slicer's own interactor style, which may stop some events
        self._tags: list[tuple[object, int]] = []
        self._pressed: dict[int, tuple[int, int]] = {}  # by id(interactor): where the left button went down

    @property
    def active(self) -> bool:
        return bool(self._tags)

    def observe(self, views: Iterable[tuple[object, object]]) -> None:
        self.stop()
        for interactor, slice_node in views:
            press = self._on_press
            release = self._releaser(slice_node)
            for event, callback in (
                (vtk.vtkCommand.LeftButtonPressEvent, press),
                (vtk.vtkCommand.LeftButtonReleaseEvent, release),
            ):
                self._tags.append((interactor, interactor.AddObserver(event, callback, self.priority)))

    def stop(self) -> None:
        for interactor, tag in self._tags:
            interactor.RemoveObserver(tag)
        self._tags.clear()
        self._pressed.clear()

    def _on_press(self, interactor, _event) -> None:
        self._pressed[id(interactor)] = tuple(interactor.GetEventPosition())

    def _releaser(self, slice_node) -> Callable[[object, str], None]:
        def on_release(interactor, _event) -> None:
            pressed = self._pressed.pop(id(interactor), None)
            x, y = interactor.GetEventPosition()
            if pressed is None or max(abs(x - pressed[0]), abs(y - pressed[1])) > DRAG_TOLERANCE_PX:
                return
            self.on_click(slice_view_ras(interactor, slice_node, *pressed), slice_node)

        return on_release
