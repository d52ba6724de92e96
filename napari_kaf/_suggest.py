"""Which slice to label next: the unannotated slice where the model expects the most mistakes.

Pure numpy. (It belongs with the core's active-learning helpers once the core has them.)

A slice's score is the total uncertainty (normalised entropy) over its predicted foreground, roughly the
number of structure voxels the model may have wrong there. The mean over the foreground alone was tried
first: it picks the edge slices of a volume, where a handful of uncertain voxels make a high mean but
labelling them teaches the model little (on the MNI152 sample it chose slice 1 of 95, a sliver of cortex).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from kaf.data.slices import take_slices


def slice_scores(uncertainty: np.ndarray, prediction: np.ndarray, slice_axis: int = 0) -> np.ndarray:
    """Per slice along `slice_axis`: the sum of the uncertainty over its predicted-foreground voxels."""
    count = uncertainty.shape[slice_axis]
    uncertain = take_slices(uncertainty, slice_axis).reshape(count, -1).astype(np.float64)
    foreground = take_slices(prediction, slice_axis).reshape(count, -1) > 0
    return (uncertain * foreground).sum(1)


def next_slice_to_label(
    uncertainty: np.ndarray, prediction: np.ndarray, annotated: Iterable[int], slice_axis: int = 0
) -> int | None:
    """The unannotated slice with the highest score (the lowest index on ties); None if all are annotated."""
    if uncertainty.shape != prediction.shape:
        raise ValueError(f"uncertainty {uncertainty.shape} and prediction {prediction.shape} differ in shape")
    scores = slice_scores(uncertainty, prediction, slice_axis)
    taken = [i for i in set(annotated) if 0 <= i < len(scores)]
    scores[taken] = -np.inf
    if np.all(np.isneginf(scores)):
        return None
    return int(np.argmax(scores))
