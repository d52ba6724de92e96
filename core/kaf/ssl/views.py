"""Views that carry their geometry back to the source slice, and the correspondences derived from it
(METHODS.md F.1).

Coordinates are pixel positions (x, y) with pixel centres at integers. A view's geometry is a
homogeneous matrix `to_source` [3, 3] taking a view pixel (x, y, 1) to a source pixel, plus an optional
displacement field (elastic warps) added on top in source pixels. Every correspondence a method uses
(transported keypoints, overlap boxes, pixel pairs) is computed from these records, never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kaf.data.keypoints import fallback_lattice

BACKGROUND_ID = -1  # keypoint-id raster background and border (the reference's 0 collides with id 0: E.1)


@dataclass
class ViewGeometry:
    to_source: torch.Tensor  # [3, 3] float64: view pixel (x, y, 1) -> source pixel (x, y, 1)
    size: tuple[int, int]  # (h, w) of the view
    displacement: torch.Tensor | None = None  # [2, h, w] (dx, dy) source pixels added after the affine

    def source_points(self) -> torch.Tensor:
        """[h, w, 2] source (x, y) of every view pixel."""
        height, width = self.size
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij"
        )
        points = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ self.to_source.T
        points = points[..., :2]
        if self.displacement is not None:
            points = points + self.displacement.permute(1, 2, 0).to(torch.float64)
        return points

    def view_points_affine(self, source_xy: torch.Tensor) -> torch.Tensor:
        """[N, 2] source (x, y) -> view (x, y) through the inverse affine (ignores any displacement)."""
        homogeneous = torch.cat(
            [source_xy.to(torch.float64), torch.ones(len(source_xy), 1, dtype=torch.float64)], 1
        )
        return (homogeneous @ torch.linalg.inv(self.to_source).T)[:, :2]


def warp(source: torch.Tensor, geometry: ViewGeometry, mode: str = "bilinear") -> torch.Tensor:
    """Resample a source slice [C, H, W] onto the view grid [C, h, w]; outside the source is 0."""
    grid = normalised_grid(geometry.source_points(), tuple(source.shape[-2:]))
    sampled = F.grid_sample(
        source[None].to(torch.float32), grid[None], mode=mode, padding_mode="zeros", align_corners=False
    )
    return sampled[0]


def normalised_grid(source_xy: torch.Tensor, source_size: tuple[int, int]) -> torch.Tensor:
    """Source pixel (x, y) -> grid_sample's [-1, 1] coordinates (align_corners=False)."""
    height, width = source_size
    scale = torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64)
    return ((source_xy + 0.5) * scale - 1).to(torch.float32)


# --- geometry builders --------------------------------------------------------------------------------------


def translation(dx: float, dy: float) -> torch.Tensor:
    matrix = torch.eye(3, dtype=torch.float64)
    matrix[0, 2], matrix[1, 2] = dx, dy
    return matrix


def linear(matrix_2x2: torch.Tensor) -> torch.Tensor:
    matrix = torch.eye(3, dtype=torch.float64)
    matrix[:2, :2] = matrix_2x2.to(torch.float64)
    return matrix


def crop_geometry(
    origin_xy: tuple[float, float],
    crop_wh: tuple[float, float],
    size: tuple[int, int],
    flips: tuple[bool, bool] = (False, False),
) -> ViewGeometry:
    """A crop of `crop_wh` source pixels at `origin_xy` (its top-left corner edge), resized to `size` (h, w)
    and optionally mirrored along x and/or y. Edges map to edges: view pixel i covers
    source [origin + i * c / n, origin + (i + 1) * c / n)."""
    height, width = size
    scale_x, scale_y = crop_wh[0] / width, crop_wh[1] / height
    flip = torch.eye(3, dtype=torch.float64)
    if flips[0]:
        flip[0, 0], flip[0, 2] = -1.0, width - 1.0
    if flips[1]:
        flip[1, 1], flip[1, 2] = -1.0, height - 1.0
    # view pixel centre i -> edge coordinate i + 0.5 -> source edge origin + (i + 0.5) * s -> centre - 0.5
    scale = linear(torch.diag(torch.tensor([scale_x, scale_y])))
    to_source = translation(origin_xy[0] - 0.5, origin_xy[1] - 0.5) @ scale @ translation(0.5, 0.5) @ flip
    return ViewGeometry(to_source, size)


def rotation_scale_geometry(
    source_size: tuple[int, int],
    size: tuple[int, int],
    angle: float,
    scale: float,
    centre_xy: tuple[float, float] | None = None,
) -> ViewGeometry:
    """A view of `size` whose centre sits on `centre_xy` of the source (its centre by default), rotated by
    `angle` radians and zoomed by `scale` (> 1 enlarges the anatomy)."""
    height, width = source_size
    cx, cy = centre_xy if centre_xy is not None else ((width - 1) / 2, (height - 1) / 2)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    rotate = linear(torch.tensor([[cos, -sin], [sin, cos]]))
    to_source = translation(cx, cy) @ rotate @ translation(-(size[1] - 1) / 2, -(size[0] - 1) / 2)
    return ViewGeometry(to_source, size)


def mirror(geometry: ViewGeometry, flip_x: bool, flip_y: bool) -> ViewGeometry:
    """The same view mirrored in its own frame."""
    height, width = geometry.size
    flip = torch.eye(3, dtype=torch.float64)
    if flip_x:
        flip[0, 0], flip[0, 2] = -1.0, width - 1.0
    if flip_y:
        flip[1, 1], flip[1, 2] = -1.0, height - 1.0
    displacement = geometry.displacement
    if displacement is not None:
        dims = [d for d, f in ((2, flip_x), (1, flip_y)) if f]
        displacement = displacement.flip(dims) if dims else displacement
    return ViewGeometry(geometry.to_source @ flip, geometry.size, displacement)


# --- correspondences ----------------------------------------------------------------------------------------


def transport_keypoints(
    coords_rowcol: np.ndarray, source_size: tuple[int, int], geometry: ViewGeometry
) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints of the source slice moved into the view by rasterising their ids (background -1),
    warping the raster with nearest interpolation and taking each surviving id's integer centroid
    (METHODS.md A.4). Works for any warp, elastic included. Returns view (row, col) [N, 2] int64 and a
    survival mask [N]; vanished ids have undefined coordinates."""
    count = len(coords_rowcol)
    raster = torch.full((1, *source_size), float(BACKGROUND_ID))
    rows, cols = np.asarray(coords_rowcol, np.int64).T
    raster[0, rows, cols] = torch.arange(count, dtype=torch.float32)
    grid = normalised_grid(geometry.source_points(), source_size)
    # grid_sample pads with zeros, which is a valid id: shift ids by one so the border reads as -1.
    warped = F.grid_sample(
        (raster + 1)[None], grid[None], mode="nearest", padding_mode="zeros", align_corners=False
    )
    ids = warped[0, 0].to(torch.int64).flatten() - 1
    present = ids >= 0
    height, width = geometry.size
    pixel_rows = torch.arange(height * width) // width
    pixel_cols = torch.arange(height * width) % width
    totals = torch.bincount(ids[present], minlength=count).to(torch.float64)
    row_sums = torch.bincount(ids[present], weights=pixel_rows[present].to(torch.float64), minlength=count)
    col_sums = torch.bincount(ids[present], weights=pixel_cols[present].to(torch.float64), minlength=count)
    alive = totals > 0
    safe = totals.clamp(min=1)
    centroid = torch.stack([row_sums / safe, col_sums / safe], 1).round().to(torch.int64)
    return centroid.numpy(), alive.numpy()


def overlap_boxes(
    first: ViewGeometry, second: ViewGeometry, source_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray] | None:
    """The source region both views show, as a box in each view's pixel-edge coordinates
    [x0, y0, x1, y1] (flip-aware: mirrored views get their box mirrored). Axis-aligned views (crop, scale,
    flip) only. None when the views do not overlap."""
    boxes = [_source_box(g) for g in (first, second)]
    low = np.maximum(boxes[0][:2], boxes[1][:2])
    high = np.minimum(boxes[0][2:], boxes[1][2:])
    if np.any(high <= low):
        return None
    shared = np.concatenate([low, high])
    return _view_box(first, shared), _view_box(second, shared)


def _source_box(geometry: ViewGeometry) -> np.ndarray:
    """Source edge-coordinate box covered by an axis-aligned view."""
    height, width = geometry.size
    corners = torch.tensor([[-0.5, -0.5], [width - 0.5, height - 0.5]], dtype=torch.float64)
    mapped = torch.cat([corners, torch.ones(2, 1, dtype=torch.float64)], 1) @ geometry.to_source.T
    xy = mapped[:, :2].numpy()
    return np.concatenate([xy.min(0), xy.max(0)]) + 0.5


def _view_box(geometry: ViewGeometry, source_box: np.ndarray) -> np.ndarray:
    corners = torch.tensor(source_box.reshape(2, 2) - 0.5, dtype=torch.float64)
    xy = geometry.view_points_affine(corners).numpy() + 0.5
    return np.concatenate([xy.min(0), xy.max(0)])


def sample_pixel_pairs(
    first: ViewGeometry,
    second: ViewGeometry,
    count: int,
    generator: torch.Generator,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `count` view-1 pixels whose source pixel lies in view 2 too, with their view-2 pixels
    ([K, 2] (row, col) each). Views related by an integer shift (dense SSL) map pixel to pixel exactly.
    `mask` [h, w] bool (view 1) restricts the candidates, e.g. to the body."""
    source_1 = first.source_points().reshape(-1, 2)
    in_second = second.view_points_affine(source_1).round().to(torch.int64)
    height, width = second.size
    inside = (
        (in_second[:, 0] >= 0)
        & (in_second[:, 0] < width)
        & (in_second[:, 1] >= 0)
        & (in_second[:, 1] < height)
    )
    if mask is not None:
        inside &= mask.flatten()
    candidates = torch.nonzero(inside).flatten()
    pick = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
    view_width = first.size[1]
    first_rowcol = torch.stack([pick // view_width, pick % view_width], 1)
    second_rowcol = in_second[pick].flip(1)
    return first_rowcol, second_rowcol


def pad_view_keypoints(
    coords: np.ndarray, alive: np.ndarray, max_keypoints: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Surviving keypoints, in their original order, padded to `max_keypoints`: coords [N, 2], mask [N]."""
    kept = np.asarray(coords)[np.asarray(alive)][:max_keypoints]
    padded = torch.zeros(max_keypoints, 2, dtype=torch.int64)
    mask = torch.zeros(max_keypoints, dtype=torch.bool)
    padded[: len(kept)] = torch.from_numpy(kept)
    mask[: len(kept)] = True
    return padded, mask


def view_keypoints(
    coords_rowcol: np.ndarray, source_size: tuple[int, int], geometry: ViewGeometry, max_keypoints: int
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A view's keypoints for the KAF backbone: the source keypoints transported into the view and
    padded, plus the survival mask over the source keypoints. When none survives, the view gets the
    fallback lattice, so attention always has keys."""
    coords, alive = transport_keypoints(coords_rowcol, source_size, geometry)
    if not alive.any():
        lattice = fallback_lattice(geometry.size, max_keypoints)
        padded, mask = pad_view_keypoints(lattice, np.ones(len(lattice), bool), max_keypoints)
        return padded, mask, alive
    padded, mask = pad_view_keypoints(coords, alive, max_keypoints)
    return padded, mask, alive
