"""npe2 reader and writers: NIfTI (.nii, .nii.gz) and NRRD (.nrrd, .nhdr) through the core's volume I/O.

The reader keeps the voxel spacing as the layer's `scale` and the voxel-to-RAS affine in its metadata;
the writers put that affine back, so a volume read and written again lands on the same grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kaf.data.volume_io import Volume, read_volume, write_volume
from kaf.data.volume_io import write_labels as core_write_labels
from kaf.data.volume_io.label_table import label_table_path, read_label_table, write_label_table
from kaf.runtime.errors import KafError
from napari_kaf._label_names import NAMES_KEY, style_kwargs
from napari_kaf._marshal import affine_of, layer_kwargs, looks_like_labels

READABLE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")
LayerData = tuple[Any, dict[str, Any], str]
# napari's "this file holds nothing to show" answer: the error was already reported, add no layer.
NOTHING = [(None,)]


def _readable(path: Any) -> bool:
    return isinstance(path, str | Path) and str(path).lower().endswith(READABLE_SUFFIXES)


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list] | None:
    """The reader for NIfTI/NRRD paths, None for anything else (napari then asks other plugins)."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(_readable(p) for p in paths):
        return None
    return read_volumes


def _layer_name(path: Path) -> str:
    name = path.name
    for suffix in (".seg.nrrd", *READABLE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_volumes(path: str | Sequence[str]) -> list:
    """Layer data for each file; an unreadable file becomes one error notification, not a traceback."""
    from napari.utils.notifications import show_error

    paths = [path] if isinstance(path, str | Path) else list(path)
    layers: list[LayerData] = []
    for item in paths:
        try:
            volume = read_volume(item)
        except KafError as error:
            show_error(str(error))
            continue
        name = _layer_name(Path(item))
        kwargs = layer_kwargs(volume, name)
        table = _label_table(Path(item), show_error)
        beside = label_table_path(Path(item)).is_file()  # a colour table beside it: a segmentation
        if looks_like_labels(Path(item).name, volume.array, named=beside):
            if table is not None:
                kwargs["metadata"][NAMES_KEY] = table.label_names()
            kwargs.update(style_kwargs(table.label_names() if table else None, int(volume.array.max()) + 1))
            layers.append((volume.array, kwargs, "labels"))
        else:
            layers.append((volume.array, kwargs, "image"))
    return layers or NOTHING


def _label_table(path: Path, show_error: Callable[[str], Any]) -> Any:
    """The colour table beside a segmentation (its class names), None when there is none; a malformed one
    is reported and the labels open without names."""
    try:
        return read_label_table(label_table_path(path))
    except KafError as error:
        show_error(str(error))
        return None


def _volume_for(data: Any, meta: dict[str, Any]) -> Volume:
    array = np.asarray(data)
    if array.ndim != 3:
        raise KafError(f"only 3D layers can be written as NIfTI/NRRD; this one has shape {array.shape}")
    ndim = array.ndim
    affine = affine_of(
        meta.get("metadata"), meta.get("scale", (1.0,) * ndim), meta.get("translate", (0.0,) * ndim)
    )
    return Volume(array, affine)


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write a 3D labels layer on its image's grid, in the smallest integer type holding its values; its
    class names (metadata `label_names`) go beside it in a colour table, `<name>.csv`."""
    volume = _volume_for(data, meta)
    names = (meta.get("metadata") or {}).get(NAMES_KEY)
    written = [str(core_write_labels(volume.array, volume, path))]
    if names:
        written.append(str(write_label_table(label_table_path(path), [str(n) for n in names])))
    return written


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write a 3D image layer with its affine."""
    volume = _volume_for(data, meta)
    return [str(write_volume(volume.array, volume.affine, path))]
