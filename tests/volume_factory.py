"""Small synthetic volumes and NIfTI writing for tests.

A plain module with its own name (not conftest) so that processes spawned by the DDP tests can
import the test modules that use it: each test folder has its own conftest.py, and the name
`conftest` resolves to whichever comes first on sys.path.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def synthetic_volume(slices: int = 8, height: int = 48, width: int = 64, seed: int = 0):
    """(image, labels): a ring (label 1) around a disc (label 2) whose size changes along z, on noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:height, :width]
    image = rng.normal(0.0, 0.1, (slices, height, width)).astype(np.float32)
    labels = np.zeros((slices, height, width), dtype=np.uint8)
    for z in range(slices):
        radius = 8 + 6 * np.sin(np.pi * (z + 1) / (slices + 1))
        distance = np.hypot(rows - height / 2, cols - width / 2 - 3)
        labels[z][distance < radius + 4] = 1
        labels[z][distance < radius] = 2
        image[z] += np.choose(labels[z], [0.0, 1.0, 2.0]).astype(np.float32)
    image += 0.3 * np.linspace(0, 1, width, dtype=np.float32)  # a bias field, so slices are not symmetric
    return image, labels


def save_nifti(array_zyx: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    affine = np.diag([1.5, 1.5, 4.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(array_zyx.transpose(2, 1, 0), affine), path)
    return path
