"""Remembered choices: QSettings("KAF Segment", "napari-kaf"), written as soon as a value changes."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import QSettings

ORGANISATION = "KAF Segment"
APPLICATION = "napari-kaf"

DEFAULTS: dict[str, Any] = {
    "checkpoint": "default",
    "checkpoint_file": "",
    "preset": "interactive",
    "device": "auto",
    "steps": 150,
    "use_time_budget": False,
    "time_budget": 60,
    "batch_size": 4,
    "crop_size": 128,
    "adapt": False,
    "adapt_seconds": 60,
    "predict_after": True,
    "all_slices": False,
    "show_uncertainty": False,  # it washes out image and prediction; shown on demand
    "level": 1,
    "head": 0,
}


class PluginSettings:
    """Typed access to the plugin's QSettings; every `set` is flushed to disk at once."""

    def __init__(self) -> None:
        self._store = QSettings(ORGANISATION, APPLICATION)

    def get(self, key: str) -> Any:
        default = DEFAULTS[key]
        value = self._store.value(key, default)
        try:
            if isinstance(default, bool):
                return value if isinstance(value, bool) else str(value).lower() in ("true", "1", "yes")
            if isinstance(default, int):
                return int(value)
            return str(value)
        except (TypeError, ValueError):
            return default

    def set(self, key: str, value: Any) -> None:
        if key not in DEFAULTS:
            raise KeyError(key)
        self._store.setValue(key, value)
        self._store.sync()

    def file_name(self) -> str:
        return self._store.fileName()
