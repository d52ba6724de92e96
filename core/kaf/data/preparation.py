"""A volume made ready for the model: normalised slices on the model grid and their keypoints.

Fine-tuning, prediction and explanation all start here, so they see identical inputs. Keypoints are
detected lazily per slice on the normalised original slice (METHODS.md A.2) and cached in the
object, because SIFT is the slowest part of preparing a slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kaf.data.intensity import IntensityNormalization
from kaf.data.keypoints import (
    KeypointBatch,
    KeypointConfig,
    SliceKeypoints,
    make_detector,
    pad_keypoints,
    transform_slice_keypoints,
)
from kaf.data.slices import SliceLayout, take_slices


@dataclass
class PreparedVolume:
    slices: np.ndarray  # (S, H, W) float32, normalised, on the original slice grid
    layout: SliceLayout
    normalization: IntensityNormalization
    keypoint_config: KeypointConfig
    slice_axis: int
    _keypoints: dict[int, SliceKeypoints] = field(default_factory=dict, repr=False)

    @classmethod
    def from_array(
        cls,
        array_zyx: np.ndarray,
        normalization: IntensityNormalization,
        keypoint_config: KeypointConfig,
        slice_axis: int = 0,
        scale: float = 1.0,
    ) -> PreparedVolume:
        slices = np.ascontiguousarray(
            take_slices(normalization.apply(array_zyx), slice_axis), dtype=np.float32
        )
        return cls(slices, SliceLayout(slices.shape[1:], scale), normalization, keypoint_config, slice_axis)

    @property
    def slice_count(self) -> int:
        return self.slices.shape[0]

    def keypoints(self, index: int) -> SliceKeypoints:
        """Keypoints of slice `index` on the model grid (detected on the original slice, then moved)."""
        if index not in self._keypoints:
            detected = make_detector(self.keypoint_config)(self.slices[index])
            self._keypoints[index] = transform_slice_keypoints(
                detected, self._point_scale(), self.layout.offset, self.layout.padded_shape
            )
        return self._keypoints[index]

    def _point_scale(self) -> tuple[float, float]:
        resized, original = self.layout.resized_shape, self.layout.slice_shape
        return (resized[0] / original[0], resized[1] / original[1])

    def model_images(self, indices: Sequence[int]) -> torch.Tensor:
        """[K, 1, Hp, Wp] float32 model inputs for the given slices."""
        stack = torch.from_numpy(self.slices[list(indices)]).unsqueeze(1)
        return self.layout.to_model(stack)

    def keypoint_batch(self, indices: Sequence[int]) -> KeypointBatch:
        return pad_keypoints([self.keypoints(i) for i in indices], self.keypoint_config.max_keypoints)
