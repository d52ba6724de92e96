"""Shared data of the Slicer module tests: an oblique geometry, a small two-class annotation, and a way to
add a volume node. (A plain module, not a conftest: tests/ has two conftest files.)"""

from __future__ import annotations

import numpy as np

NAMES = ["background", "anterior", "posterior"]


def oblique_affine() -> np.ndarray:
    """Spacing (0.7, 0.8, 3) mm, rotated about two axes, shifted: like an oblique MRI acquisition."""
    a, b = np.radians(25), np.radians(-10)
    about_s = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_r = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = about_s @ about_r @ np.diag([0.7, 0.8, 3.0])
    affine[:3, 3] = [-31.5, 12.25, 40.0]
    return affine


def two_class_labels(shape=(6, 8, 9)) -> np.ndarray:
    """Label 1 painted on slices 1 and 4, label 2 on slice 4."""
    labels = np.zeros(shape, np.uint8)
    labels[1, 2:5, 3:7] = 1
    labels[4, 4:7, 1:4] = 2
    labels[4, 1, 1] = 1
    return labels


def add_volume(scene, array: np.ndarray, affine: np.ndarray, name: str = "volume"):
    import slicer

    assert slicer.mrmlScene is scene
    return slicer.util.addVolumeFromArray(array, affine, name)
