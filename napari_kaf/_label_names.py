"""Class names on labels layers: the panel's comma-separated text, and how a layer shows the names.

A labels layer carries its names three ways: `metadata["label_names"]` (background first; what the
writer saves beside the file and the panel reads back), `features` with an "index" column (napari's
status bar then shows "2; class: RV" under the cursor) and a `DirectLabelColormap` with the core's
palette, so that class k has the colour it has in the saved colour table and in Slicer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from napari.utils.colormaps import DirectLabelColormap

from kaf.data.volume_io.label_table import PALETTE, check_label_names, label_color

NAMES_KEY = "label_names"
CLASS_COLUMN = "class"
TRANSPARENT = (0.0, 0.0, 0.0, 0.0)


def parse_names(text: str) -> list[str] | None:
    """The names typed in the Classes field (comma-separated, background first); None when empty."""
    names = [part.strip() for part in text.split(",")]
    if not any(names):
        return None
    return check_label_names(names)


def format_names(names: Sequence[str] | None) -> str:
    return ", ".join(names) if names else ""


def layer_names(layer: Any) -> list[str] | None:
    """The names a layer carries in its metadata, if any."""
    if layer is None:
        return None
    names = layer.metadata.get(NAMES_KEY)
    return [str(name) for name in names] if names else None


def numbered(count: int) -> list[str]:
    return ["background", *(f"label {value}" for value in range(1, count))]


def label_colormap(classes: int = len(PALETTE) + 1) -> DirectLabelColormap:
    """The palette's colours for labels 1.. (one round of the palette, or `classes` - 1 values where there
    are more); background transparent, any value beyond in the palette's first colour."""
    colors: dict[int | None, tuple[float, ...]] = {None: (*_rgb(label_color(1)), 1.0), 0: TRANSPARENT}
    for value in range(1, max(classes, len(PALETTE) + 1)):
        colors[value] = (*_rgb(label_color(value)), 1.0)
    return DirectLabelColormap(color_dict=colors)


def _rgb(color: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(channel / 255 for channel in color)  # type: ignore[return-value]


def label_features(names: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({"index": list(range(len(names))), CLASS_COLUMN: list(names)})


def style_kwargs(names: Sequence[str] | None, classes: int = 0) -> dict[str, Any]:
    """`features` and `colormap` of a labels layer with these names (colours alone when None)."""
    kwargs: dict[str, Any] = {"colormap": label_colormap(max(classes, len(names or ())))}
    if names:
        kwargs["features"] = label_features(names)
    return kwargs


def apply_names(layer: Any, names: Sequence[str] | None) -> None:
    """Give a labels layer these names (metadata, features for the status bar) and the palette."""
    if names:
        layer.metadata[NAMES_KEY] = list(names)
        layer.features = label_features(names)
    else:
        layer.metadata.pop(NAMES_KEY, None)
        layer.features = pd.DataFrame()
    layer.colormap = label_colormap(len(names or ()))
