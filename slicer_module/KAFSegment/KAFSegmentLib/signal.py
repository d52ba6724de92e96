"""Logic → widget notifications without Qt: custom signals declared on PythonQt classes crash Slicer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Signal:
    """A list of callables, each called with the arguments given to `emit`, in the order connected."""

    def __init__(self) -> None:
        self._slots: list[Callable[..., Any]] = []

    def connect(self, slot: Callable[..., Any]) -> None:
        self._slots.append(slot)

    def disconnect(self, slot: Callable[..., Any]) -> None:
        self._slots.remove(slot)

    def emit(self, *args: Any) -> None:
        for slot in list(self._slots):  # a slot may disconnect itself while we iterate
            slot(*args)
