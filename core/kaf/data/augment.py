"""Fine-tuning augmentation on the model grid: crop + rotation + scale (+ flip) in one resampling,
with keypoints moved through the same transform so they stay on the same anatomy.

Spatial transforms are written in pixel coordinates, p_in = M (p_out - c_out) + c_in, and turned
into the normalised `theta` that `torch.nn.functional.affine_grid` expects (align_corners=False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kaf.models.kaf_layer import normalise_positions


@dataclass(frozen=True)
class AugmentationSettings:
    rotation_degrees: float = 15.0
    scale_range: tuple[float, float] = (0.7, 1.3)  # wide: structures shrink and grow from slice to slice
    flip: bool = False  # anatomy has a handedness: off by default
    spatial_probability: float = 0.8
    foreground_crop_probability: float = 0.67  # crops centred on a labelled pixel, as nnU-Net oversamples
    contrast_range: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.1
    noise_std: float = 0.05
    # Each keypoint is left out with this probability (a crop keeps at least one): a few annotated slices
    # otherwise show the KAF layers only their own fixed keypoint sets.
    keypoint_dropout: float = 0.0


@dataclass
class AugmentedBatch:
    images: torch.Tensor  # [B, 1, h, w]
    labels: torch.Tensor  # [B, h, w] int64
    keypoints: torch.Tensor  # [B, N, 2] int64 (row, col) in the crop
    keypoint_mask: torch.Tensor  # [B, N] bool
    # [B, 2, N] normalised (x, y) of each keypoint in its un-augmented slice, as inference encodes them
    slice_positions: torch.Tensor


def _uniform(generator: torch.Generator, low: float, high: float, count: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def random_matrices(batch: int, settings: AugmentationSettings, generator: torch.Generator) -> torch.Tensor:
    """[B, 2, 2] pixel-space matrices acting on (x, y): rotation x isotropic scale (x optional flip)."""
    apply = torch.rand(batch, generator=generator) < settings.spatial_probability
    angle = _uniform(generator, -1, 1, batch) * math.radians(settings.rotation_degrees) * apply
    scale = torch.where(apply, _uniform(generator, *settings.scale_range, batch), torch.ones(batch))
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    matrices = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    if settings.flip:
        flips = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
        matrices[:, :, 0] *= flips[:, None]
    return matrices


def crop_centres(
    labels: torch.Tensor, settings: AugmentationSettings, generator: torch.Generator
) -> torch.Tensor:
    """[B, 2] (x, y) input-pixel centres: a random labelled pixel, or any pixel."""
    batch, height, width = labels.shape
    centres = torch.stack(
        [
            torch.randint(0, width, (batch,), generator=generator),
            torch.randint(0, height, (batch,), generator=generator),
        ],
        -1,
    ).to(torch.float32)
    use_foreground = torch.rand(batch, generator=generator) < settings.foreground_crop_probability
    for index in torch.nonzero(use_foreground).flatten().tolist():
        rows, cols = torch.nonzero(labels[index], as_tuple=True)
        if len(rows):
            pick = torch.randint(0, len(rows), (1,), generator=generator)
            centres[index] = torch.stack([cols[pick], rows[pick]], -1).to(torch.float32)[0]
    return centres


def affine_theta(
    matrices: torch.Tensor, centres: torch.Tensor, in_size: tuple[int, int], out_size: tuple[int, int]
) -> torch.Tensor:
    """Pixel-space p_in = M (p_out - c_out) + c_in as normalised theta [B, 2, 3] (sizes are (H, W))."""
    in_wh = torch.tensor([in_size[1], in_size[0]], dtype=torch.float32)
    out_wh = torch.tensor([out_size[1], out_size[0]], dtype=torch.float32)
    linear = (2 / in_wh)[None, :, None] * matrices * (out_wh / 2)[None, None, :]
    translation = (2 * centres + 1) / in_wh - 1
    return torch.cat([linear, translation.unsqueeze(-1)], dim=-1)


def move_keypoints(
    keypoints: torch.Tensor,
    mask: torch.Tensor,
    matrices: torch.Tensor,
    centres: torch.Tensor,
    out_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input (row, col) -> output (row, col) under p_out = M^-1 (p_in - c_in) + c_out; points that leave
    the crop are masked out; a sample that loses all keeps its nearest point, clamped, so attention has
    a key to attend to (a sample that had none gets none: padding is no point of the slice)."""
    xy = keypoints.flip(-1).to(torch.float32)
    centre_out = torch.tensor([(out_size[1] - 1) / 2, (out_size[0] - 1) / 2])
    moved = torch.einsum("bij,bnj->bni", torch.linalg.inv(matrices), xy - centres[:, None]) + centre_out
    rowcol = moved.round().to(torch.int64).flip(-1)
    limits = torch.tensor(out_size)
    inside = mask & (rowcol >= 0).all(-1) & (rowcol < limits).all(-1)
    empty = ~inside.any(-1) & mask.any(-1)
    if empty.any():
        distance = (moved - centre_out).norm(dim=-1).masked_fill(~mask, float("inf"))
        inside[empty, distance[empty].argmin(-1)] = True
    rowcol = torch.minimum(rowcol.clamp(min=0), limits - 1)
    return rowcol, inside


def drop_keypoints(mask: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Leaves each valid keypoint out with `probability`; a sample that would lose all keeps its mask."""
    if probability <= 0:
        return mask
    kept = mask & (torch.rand(mask.shape, generator=generator) >= probability)
    empty = ~kept.any(-1)
    kept[empty] = mask[empty]
    return kept


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    keypoints: torch.Tensor,
    keypoint_mask: torch.Tensor,
    crop_size: tuple[int, int],
    settings: AugmentationSettings,
    generator: torch.Generator,
) -> AugmentedBatch:
    """images [B, 1, H, W], labels [B, H, W] -> augmented crops of `crop_size` with their keypoints."""
    batch = images.shape[0]
    in_size = tuple(images.shape[-2:])
    matrices = random_matrices(batch, settings, generator)
    centres = crop_centres(labels, settings, generator)
    theta = affine_theta(matrices, centres, in_size, crop_size)
    grid = F.affine_grid(theta, (batch, 1, *crop_size), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped_labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", align_corners=False)
    contrast = _uniform(generator, *settings.contrast_range, batch).view(-1, 1, 1, 1)
    brightness = _uniform(generator, -settings.brightness, settings.brightness, batch).view(-1, 1, 1, 1)
    noise = settings.noise_std * torch.randn(warped.shape, generator=generator)
    moved, moved_mask = move_keypoints(keypoints, keypoint_mask, matrices, centres, crop_size)
    moved_mask = drop_keypoints(moved_mask, settings.keypoint_dropout, generator)
    return AugmentedBatch(
        warped * contrast + brightness + noise,
        warped_labels[:, 0].long(),
        moved,
        moved_mask,
        normalise_positions(keypoints, *in_size),
    )
