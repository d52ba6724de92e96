"""Figures a person can open: a slice with its keypoints, and attention maps per level and head."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the core never opens a window
import matplotlib.pyplot as plt
import numpy as np

from kaf.data.volume_io import replace_atomically
from kaf.jobs.explain import Explanation


def save_figure(figure: plt.Figure, path: Path) -> Path:
    with replace_atomically(path) as temporary:
        figure.savefig(temporary, dpi=110, bbox_inches="tight", format="png")
    plt.close(figure)
    return path


def attention_figure(
    explanation: Explanation, keypoint: int, path: Path, segmentation: np.ndarray | None = None
) -> Path:
    """Top-left: the slice, its keypoints (the chosen one ringed) and the segmentation outline; then one
    panel per level and head with the chosen keypoint's attention (inferno, 0..1)."""
    image = explanation.prepared.slices[explanation.slice_index]
    levels, heads = explanation.levels, explanation.heads
    figure, axes = plt.subplots(
        len(levels), heads + 1, figsize=(2.6 * (heads + 1), 2.6 * len(levels)), squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    overview = axes[0, 0]
    overview.imshow(image, cmap="gray")
    if segmentation is not None:
        overview.contour(
            segmentation, levels=np.arange(0.5, segmentation.max() + 0.5), colors="cyan", linewidths=0.6
        )
    rows, cols = explanation.keypoints[:, 0], explanation.keypoints[:, 1]
    overview.scatter(cols, rows, s=4, c="yellow")
    overview.scatter(
        cols[keypoint], rows[keypoint], s=60, facecolors="none", edgecolors="red", linewidths=1.5
    )
    overview.set_title(f"slice {explanation.slice_index}: {len(rows)} keypoints", fontsize=8)
    for row, level in enumerate(levels):
        for head in range(heads):
            axis = axes[row, head + 1]
            axis.imshow(image, cmap="gray")
            axis.imshow(
                explanation.attention_map(level, head, keypoint), cmap="inferno", alpha=0.6, vmin=0, vmax=1
            )
            axis.scatter(
                cols[keypoint], rows[keypoint], s=30, facecolors="none", edgecolors="cyan", linewidths=1
            )
            axis.set_title(f"level {level}, head {head}", fontsize=8)
    return save_figure(figure, path)
