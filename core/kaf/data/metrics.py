"""Scores for few-slice segmentation: Dice on the slices nobody annotated, and the copy baseline."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from kaf.data.slices import put_slices, take_slices


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, classes: int) -> np.ndarray:
    """Foreground Dice per class (classes 1..C-1) over all voxels given; NaN where a class is absent
    from both."""

    def encode(labels: np.ndarray) -> torch.Tensor:
        return one_hot(torch.from_numpy(labels.astype(np.int64))[None, None], classes, dim=1)

    scores = compute_dice(encode(prediction), encode(reference), include_background=False, ignore_empty=False)
    return scores[0].numpy()


def unannotated_slices(slice_count: int, annotated: Sequence[int]) -> list[int]:
    return sorted(set(range(slice_count)) - set(annotated))


def dice_on_unannotated(
    prediction: np.ndarray, reference: np.ndarray, annotated: Sequence[int], classes: int, slice_axis: int = 0
) -> tuple[float, np.ndarray]:
    """(mean foreground Dice, per-class Dice) over the slices that were not annotated."""
    rest = unannotated_slices(reference.shape[slice_axis], annotated)
    per_class = dice_per_class(
        take_slices(prediction, slice_axis)[rest], take_slices(reference, slice_axis)[rest], classes
    )
    return float(np.nanmean(per_class)), per_class


def copy_nearest_annotated(
    reference: np.ndarray, annotated: Sequence[int], slice_axis: int = 0
) -> np.ndarray:
    """The trivial baseline: every slice gets the labels of the nearest annotated slice
    (ties go to the lower index)."""
    stack = take_slices(reference, slice_axis)
    anchors = np.asarray(sorted(annotated))
    nearest = anchors[np.abs(np.arange(stack.shape[0])[:, None] - anchors[None, :]).argmin(1)]
    return np.ascontiguousarray(put_slices(stack[nearest], slice_axis))


def spread_slices(reference: np.ndarray, count: int, slice_axis: int = 0, min_gap: int = 2) -> list[int]:
    """Slices an annotator would pick: the ones showing the most classes (then the most foreground),
    at least `min_gap` apart, as in CALIBRATION.md."""
    stack = take_slices(reference, slice_axis)
    classes_present = np.array([len(np.unique(s[s > 0])) for s in stack])
    foreground = (stack > 0).reshape(stack.shape[0], -1).sum(1)
    chosen: list[int] = []
    for index in np.lexsort((-foreground, -classes_present)):
        if all(abs(int(index) - c) >= min_gap for c in chosen):
            chosen.append(int(index))
        if len(chosen) == count:
            break
    return sorted(chosen)
