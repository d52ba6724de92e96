"""Sample volumes. The embedded default: a real T1 MRI that ships inside a PyPI wheel (nilearn's MNI152
2009 template, 2 mm) with tissue labels from its grey- and white-matter probability maps; nothing is
downloaded. And a small generated one, a ring around a disc, for the napari sample and the tests."""

from __future__ import annotations

import numpy as np

from kaf.data.volume_io import Volume

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


def ring_and_disc(
    slices: int,
    height: int,
    width: int,
    seed: int,
    noise: float,
    radius: tuple[float, float],
    shift: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(image (z, y, x) float32, labels uint8): a ring (label 1) around a disc (label 2) on Gaussian
    noise of std `noise` and a bias field along x, so slices are not symmetric. The disc's radius is
    radius[0] + radius[1] sin(pi (z + 1) / (slices + 1)), the ring 4 pixels wide; the centre sits `shift`
    pixels right of the slice's centre."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:height, :width]
    image = rng.normal(0.0, noise, (slices, height, width)).astype(np.float32)
    labels = np.zeros((slices, height, width), dtype=np.uint8)
    distance = np.hypot(rows - height / 2, cols - width / 2 - shift)
    for z in range(slices):
        disc = radius[0] + radius[1] * np.sin(np.pi * (z + 1) / (slices + 1))
        labels[z][distance < disc + 4] = 1
        labels[z][distance < disc] = 2
        image[z] += np.choose(labels[z], [0.0, 1.0, 2.0]).astype(np.float32)
    image += 0.3 * np.linspace(0.0, 1.0, width, dtype=np.float32)
    return image, labels
