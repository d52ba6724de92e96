"""Slice geometry: cutting a volume into 2D slices on the model's grid, and mapping results back.

A slice of shape (H, W) is optionally resized by `scale`, then zero-padded (centred) so both sides
are multiples of 16. Everything the model produces is cropped and resized back onto the original
slice grid, so outputs always share the input's shape and affine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kaf.models.unet import SIDE_MULTIPLE


def take_slices(array_zyx: np.ndarray, axis: int) -> np.ndarray:
    """(z, y, x) volume -> (S, H, W) stack of slices along `axis` (a view, no copy)."""
    return np.moveaxis(array_zyx, axis, 0)


def put_slices(stack: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of `take_slices` for [..., S, H, W]: leading axes (e.g. classes) stay in front."""
    return np.moveaxis(stack, -3, stack.ndim - 3 + axis)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class SliceLayout:
    slice_shape: tuple[int, int]  # (H, W) of an original slice
    scale: float = 1.0  # in-plane resize factor applied before padding

    @property
    def resized_shape(self) -> tuple[int, int]:
        return tuple(max(1, round(side * self.scale)) for side in self.slice_shape)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return tuple(_round_up(side, SIDE_MULTIPLE) for side in self.resized_shape)

    @property
    def offset(self) -> tuple[int, int]:
        """Padding before the resized slice (top, left)."""
        return tuple((p - r) // 2 for p, r in zip(self.padded_shape, self.resized_shape, strict=True))

    def _resize(self, stack: torch.Tensor, shape: tuple[int, int], mode: str) -> torch.Tensor:
        if tuple(stack.shape[-2:]) == tuple(shape):
            return stack
        if mode == "nearest":
            return F.interpolate(stack, size=shape, mode="nearest-exact")
        return F.interpolate(stack, size=shape, mode="bilinear", align_corners=False)

    def to_model(self, stack: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """[S, C, H, W] on the slice grid -> [S, C, Hp, Wp] on the model grid (zero padding)."""
        resized = self._resize(stack, self.resized_shape, mode)
        top, left = self.offset
        bottom = self.padded_shape[0] - self.resized_shape[0] - top
        right = self.padded_shape[1] - self.resized_shape[1] - left
        return F.pad(resized, (left, right, top, bottom))

    def from_model(self, stack: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """[S, C, Hp, Wp] on the model grid -> [S, C, H, W] on the original slice grid."""
        top, left = self.offset
        height, width = self.resized_shape
        cropped = stack[..., top : top + height, left : left + width]
        return self._resize(cropped, self.slice_shape, mode)

    def points_from_model(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) (row, col) on the model grid -> float positions on the slice grid (pixel centres)."""
        factor = np.array(self.slice_shape) / np.array(self.resized_shape)
        return (points - np.array(self.offset) + 0.5) * factor - 0.5


def scale_for_max_side(slice_shape: tuple[int, int], max_side: int | None) -> float:
    """The in-plane scale that brings the longer side down to `max_side` (never enlarges)."""
    if not max_side or max(slice_shape) <= max_side:
        return 1.0
    return max_side / max(slice_shape)
