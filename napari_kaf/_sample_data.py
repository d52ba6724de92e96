"""Sample data: a real MRI shipped inside nilearn's wheel, and a small volume generated in code.

Nothing is downloaded. The reference labels come in hidden, so the annotator starts from an empty
annotation layer as with their own scans.
"""

from __future__ import annotations

import numpy as np

from kaf.data.sample_data import ring_and_disc
from kaf.data.volume_io import Volume
from napari_kaf._label_names import NAMES_KEY, style_kwargs
from napari_kaf._marshal import layer_kwargs


def _pair(volume: Volume, labels: np.ndarray, name: str, names: list[str]) -> list[tuple]:
    image_kwargs = layer_kwargs(volume, name)
    label_kwargs = layer_kwargs(volume, f"{name} reference labels")
    label_kwargs["metadata"][NAMES_KEY] = names
    label_kwargs.update(style_kwargs(names))
    label_kwargs["visible"] = False
    return [(volume.array, image_kwargs, "image"), (labels, label_kwargs, "labels")]


def mni152_sample() -> list[tuple]:
    """The MNI152 2009 T1 template (2 mm) with grey/white-matter labels, from nilearn's installed files."""
    from kaf.data.sample_data import mni152_with_tissue_labels

    volume, labels, names = mni152_with_tissue_labels()
    return _pair(volume, labels, "MNI152 T1", names)


def synthetic_volume(
    slices: int = 12, height: int = 64, width: int = 64, seed: int = 0
) -> tuple[Volume, np.ndarray]:
    """A ring (label 1) around a disc (label 2) whose radius changes along z, on noise and a bias field."""
    image, labels = ring_and_disc(slices, height, width, seed, noise=0.15, radius=(6, 8), shift=4)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])  # 1 mm in-plane, 3 mm between slices
    return Volume(image, affine), labels


def synthetic_sample() -> list[tuple]:
    volume, labels = synthetic_volume()
    return _pair(volume, labels, "Synthetic ring", ["background", "ring", "disc"])
