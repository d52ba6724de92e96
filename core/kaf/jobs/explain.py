"""Explanation: the keypoints of a slice and, per level and head, where a keypoint's attention goes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from kaf.data.preparation import PreparedVolume
from kaf.jobs.events import Job, StageClock
from kaf.jobs.predict import non_finite_outputs
from kaf.models import KafUNet
from kaf.runtime.devices import resolve_device
from kaf.runtime.errors import InputDataError


@dataclass
class Explanation:
    slice_index: int
    keypoints: np.ndarray  # (N, 2) float (row, col) on the original slice grid
    keypoints_model: np.ndarray  # (N, 2) int (row, col) on the model grid
    scores: np.ndarray  # (N,) SIFT response (0 for fallback points)
    attention: dict[int, np.ndarray]  # level -> [heads, N, N] weights of the last attention block
    prepared: PreparedVolume

    @property
    def levels(self) -> list[int]:
        return sorted(self.attention)

    @property
    def heads(self) -> int:
        return next(iter(self.attention.values())).shape[0]

    def check_keypoint(self, keypoint: int) -> None:
        if not 0 <= keypoint < len(self.keypoints_model):
            raise InputDataError(
                f"keypoint {keypoint} does not exist; "
                f"slice {self.slice_index} has {len(self.keypoints_model)} keypoints"
            )

    def attention_map(self, level: int, head: int, keypoint: int) -> np.ndarray:
        """(H, W) float32 in [0, 1] on the slice grid: keypoint `keypoint`'s attention to every keypoint,
        drawn as a Gaussian blob at each target whose width is the level's pixel size (2**(level-1))."""
        if level not in self.attention:
            raise InputDataError(f"level {level} has no KAF layer; levels with attention: {self.levels}")
        if not 0 <= head < self.heads:
            raise InputDataError(f"head {head} does not exist; the model has heads 0..{self.heads - 1}")
        self.check_keypoint(keypoint)
        weights = self.attention[level][head, keypoint]
        canvas = np.zeros(self.prepared.layout.padded_shape, dtype=np.float32)
        np.add.at(canvas, tuple(self.keypoints_model.T), weights)
        blurred = gaussian_filter(canvas, sigma=max(1.5, 2.0 ** (level - 1)))
        on_slice = self.prepared.layout.from_model(torch.from_numpy(blurred)[None, None])[0, 0].numpy()
        peak = on_slice.max()
        return on_slice / peak if peak > 0 else on_slice


def explain(
    model: KafUNet,
    prepared: PreparedVolume,
    slice_index: int,
    device: str | torch.device = "auto",
    checkpoint: str | Path | None = None,
) -> Job[Explanation]:
    """`checkpoint`, the file `model` came from, is named in errors."""
    if not model.uses_keypoints:
        raise InputDataError("this model has no KAF layer, so it has no keypoint attention to show")
    if not 0 <= slice_index < prepared.slice_count:
        raise InputDataError(
            f"slice {slice_index} does not exist; the volume has {prepared.slice_count} slices"
        )
    clock = StageClock()
    device = resolve_device(device) if isinstance(device, str) else device
    yield clock.event("explain", 0, 1, message=f"keypoints and attention of slice {slice_index}")
    model.to(device).eval()
    keypoints = prepared.keypoints(slice_index)
    batch = prepared.keypoint_batch([slice_index]).to(device)
    with torch.no_grad():
        output = model(
            prepared.model_images([slice_index]).to(device), batch.coords, batch.mask, return_attention=True
        )
    count = len(keypoints.coords)
    attention = {
        level: weights[0, :, :count, :count].float().cpu().numpy()
        for level, weights in output.attention.items()
    }
    # Attention maps drawn from NaN would be blank or meaningless, yet look like an explanation.
    if not all(np.isfinite(weights).all() for weights in attention.values()):
        raise non_finite_outputs(checkpoint, f"slice {slice_index}", "the explanation")
    yield clock.event("explain", 1, 1)
    return Explanation(
        slice_index=slice_index,
        keypoints=prepared.layout.points_from_model(keypoints.coords),
        keypoints_model=keypoints.coords,
        scores=keypoints.scores,
        attention=attention,
        prepared=prepared,
    )
