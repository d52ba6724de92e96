"""Keyboard shortcuts of the main actions, bound on the viewer through napari's keybinding system.

Shift + a letter: napari binds no Shift combination of these letters by default, so they work while
the image, labels or points layer is active (the points layer keeps Shift-A, so Accept is Shift-C).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shortcut:
    action: str  # the name the widget gives the action
    key: str  # napari's key name
    does: str


SHORTCUTS = (
    Shortcut("finetune", "Shift-F", "Fine-tune, or Stop while it runs"),
    Shortcut("accept", "Shift-C", "Accept the prediction on this slice (copy it into the annotation)"),
    Shortcut("next_slice", "Shift-N", "Go to the next slice to label"),
    Shortcut("keypoints", "Shift-K", "Show the keypoints of this slice"),
    Shortcut("toggle_prediction", "Shift-S", "Show or hide the prediction (segmentation)"),
    Shortcut("toggle_uncertainty", "Shift-U", "Show or hide the uncertainty"),
)


def key_of(action: str) -> str:
    """The key of `action`, written the way users read it ("Shift+F")."""
    [shortcut] = [s for s in SHORTCUTS if s.action == action]
    return shortcut.key.replace("-", "+")


def with_key(tooltip: str, action: str) -> str:
    return f"{tooltip} ({key_of(action)})"


def bind_shortcuts(viewer: Any, actions: Mapping[str, Callable[[], Any]]) -> Callable[[], None]:
    """Bind each shortcut to its action on `viewer`; returns the function that unbinds them all."""
    for shortcut in SHORTCUTS:
        action = actions[shortcut.action]
        viewer.bind_key(shortcut.key, lambda _viewer, act=action: _run(act), overwrite=True)

    def unbind() -> None:
        for shortcut in SHORTCUTS:
            viewer.bind_key(shortcut.key, None, overwrite=True)

    return unbind


def _run(action: Callable[[], Any]) -> None:
    """napari runs a keybinding that returns a generator as press/release; the actions return values."""
    action()
