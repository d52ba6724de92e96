"""The embedded default: a real T1 MRI that ships inside a PyPI wheel (nilearn's MNI152 2009 template,
2 mm) with tissue labels from its grey- and white-matter probability maps. Nothing is downloaded."""

from __future__ import annotations

import numpy as np

from kaf.volume_io import Volume

MNI152_LABEL_NAMES = ["background", "grey matter", "white matter"]


def mni152_with_tissue_labels() -> tuple[Volume, np.ndarray, list[str]]:
    """(image, labels (z, y, x) uint8 with 0 background, 1 grey matter, 2 white matter, names)."""
    from nilearn import datasets  # imported here: nilearn is slow to import and only the demo needs it

    template = datasets.load_mni152_template(resolution=2)
    grey = np.asarray(datasets.load_mni152_gm_template(resolution=2).dataobj, dtype=np.float32)
    white = np.asarray(datasets.load_mni152_wm_template(resolution=2).dataobj, dtype=np.float32)
    labels = np.zeros(grey.shape, dtype=np.uint8)
    tissue = np.maximum(grey, white) >= 0.5  # the probabilistic maps' majority vote
    labels[tissue & (grey >= white)] = 1
    labels[tissue & (white > grey)] = 2
    image = np.asarray(template.dataobj, dtype=np.float32)
    volume = Volume(np.ascontiguousarray(image.transpose(2, 1, 0)), template.affine.astype(np.float64))
    return volume, np.ascontiguousarray(labels.transpose(2, 1, 0)), MNI152_LABEL_NAMES
