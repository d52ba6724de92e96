"""Sparse annotations: a label volume on the image grid where only some slices were painted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kaf.data.slices import take_slices
from kaf.runtime.errors import InputDataError

# Predictions are written as 16-bit label maps (kaf.jobs.predict), so labels run from 0 to 65535 at most.
MAX_CLASSES = 2**16


@dataclass(frozen=True)
class SparseAnnotation:
    labels: np.ndarray  # (z, y, x) int64, 0 = background
    slice_axis: int
    annotated: tuple[int, ...]  # indices of the slices whose pixels enter the loss
    classes: int  # background included

    def annotated_stack(self) -> np.ndarray:
        """(K, H, W) label slices of the annotated slices."""
        return take_slices(self.labels, self.slice_axis)[list(self.annotated)]


def painted_slices(labels: np.ndarray, axis: int) -> list[int]:
    stack = take_slices(labels, axis)
    return [int(i) for i in np.flatnonzero(stack.reshape(stack.shape[0], -1).any(axis=1))]


def sparse_annotation(
    labels: np.ndarray,
    slice_axis: int = 0,
    explicit_slices: Sequence[int] = (),
    classes: int | None = None,
    source: str = "labels",
) -> SparseAnnotation:
    """Which slices count: every slice with a painted voxel, plus the ones listed explicitly
    (so an all-background slice can be annotated as such)."""
    if labels.ndim != 3:
        raise InputDataError(f"{source}: a 3D label volume is needed, got shape {labels.shape}")
    if slice_axis not in (0, 1, 2):
        raise InputDataError(f"the slice axis must be 0, 1 or 2, got {slice_axis}")
    if labels.min() < 0:
        raise InputDataError(f"{source}: label values must be 0 or positive, found {int(labels.min())}")
    slice_count = labels.shape[slice_axis]
    outside = [i for i in explicit_slices if not 0 <= i < slice_count]
    if outside:
        raise InputDataError(
            f"slices {outside} do not exist: the volume has {slice_count} slices on axis {slice_axis}"
        )
    annotated = tuple(sorted(set(painted_slices(labels, slice_axis)) | {int(i) for i in explicit_slices}))
    if not annotated:
        raise InputDataError(
            f"{source}: no slice is annotated. Paint at least one slice (or list an all-background slice "
            "explicitly) before fine-tuning."
        )
    found = int(labels.max()) + 1
    if found > MAX_CLASSES:
        raise InputDataError(
            f"{source}: holds label {found - 1}, but labels run from 0 to {MAX_CLASSES - 1} at most; number "
            "the structures 1, 2, 3, ..."
        )
    classes = classes or max(found, 2)
    if found > classes:
        raise InputDataError(
            f"{source}: holds label {found - 1}, but the model has only {classes} classes (0..{classes - 1})"
        )
    return SparseAnnotation(labels.astype(np.int64, copy=False), slice_axis, annotated, classes)
