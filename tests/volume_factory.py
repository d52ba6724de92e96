"""Small synthetic volumes and NIfTI writing for tests.

A plain module with its own name (not conftest) so that processes spawned by the DDP tests can
import the test modules that use it: each test folder has its own conftest.py, and the name
`conftest` resolves to whichever comes first on sys.path.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from kaf.sample_data import ring_and_disc


def synthetic_volume(slices: int = 8, height: int = 48, width: int = 64, seed: int = 0):
    """(image, labels): a ring (label 1) around a disc (label 2) whose size changes along z, on noise."""
    return ring_and_disc(slices, height, width, seed, noise=0.1, radius=(8, 6), shift=3)


def save_nifti(array_zyx: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    affine = np.diag([1.5, 1.5, 4.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(array_zyx.transpose(2, 1, 0), affine), path)
    return path
