"""SIFT keypoints that the KAF encoder samples its feature maps at.

Keypoints are detected once per slice, on the original (un-augmented, un-padded) slice, and stored as
integer (row, col) pixel coordinates, strongest first. Slices where SIFT finds (almost) nothing get a
regular fallback lattice so that every slice still has keypoints to attend over.

Determinism: OpenCV sorts its keypoints before returning them and every keypoint is computed
independently of the others, so the result does not depend on `cv2.setNumThreads`; we therefore leave
OpenCV's thread count alone. Our own ordering breaks every tie explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import cv2
import numpy as np
import torch

from kaf.runtime.errors import InputDataError, KafError
from kaf.runtime.problems import listed
from kaf.runtime.validation import MAX_KEYPOINTS

DESCRIPTOR_SIZE = 128
NUM_LEVELS = 4
# Below this many SIFT points the attention has too little to work with, so the lattice is used instead.
MIN_DETECTED_KEYPOINTS = 4
SUPPORTED_DETECTORS = ("sift",)


@dataclass(frozen=True)
class KeypointConfig:
    """How keypoints are detected; stored in checkpoints so inference uses the training settings."""

    max_keypoints: int = 256
    detector: str = "sift"

    def __post_init__(self) -> None:
        MAX_KEYPOINTS.check(self.max_keypoints, "max_keypoints")
        if self.detector not in SUPPORTED_DETECTORS:
            raise KafError(
                f"Unknown keypoint detector {self.detector!r}; supported: {', '.join(SUPPORTED_DETECTORS)}."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KeypointConfig:
        """Build from `to_dict` output; missing keys take their defaults, unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise KafError(f"Unknown keypoint setting(s): {listed(unknown)}.")
        return cls(**dict(d))


@dataclass
class SliceKeypoints:
    """Keypoints of one slice, strongest first."""

    coords: np.ndarray  # (N, 2) int64 (row, col)
    scores: np.ndarray  # (N,) float32 SIFT response, 0 for fallback points
    descriptors: np.ndarray | None  # (N, 128) float32, or None (never computed, or fallback)
    is_fallback: bool

    def __len__(self) -> int:
        return len(self.coords)


class KeypointDetector(Protocol):
    """Anything that turns a 2D float slice (H, W) into keypoints."""

    def __call__(self, image: np.ndarray) -> SliceKeypoints: ...


@dataclass(frozen=True)
class SiftDetector:
    """The default `KeypointDetector`: OpenCV SIFT with default parameters."""

    max_keypoints: int
    with_descriptors: bool = False

    def __call__(self, image: np.ndarray) -> SliceKeypoints:
        return sift_keypoints(image, self.max_keypoints, self.with_descriptors)


def make_detector(config: KeypointConfig) -> KeypointDetector:
    """The detector named in `config` (validated by `KeypointConfig`, so only "sift" reaches here)."""
    return SiftDetector(max_keypoints=config.max_keypoints)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Min-max scale a 2D image to 0..255 uint8; a constant image becomes all zeros."""
    values = np.asarray(image, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise InputDataError("The slice contains NaN or infinite values; cannot detect keypoints on it.")
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = values.min(), values.max()
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def sift_keypoints(image: np.ndarray, max_keypoints: int, with_descriptors: bool = False) -> SliceKeypoints:
    """Up to `max_keypoints` SIFT keypoints of `image`, one per pixel, strongest first.

    Falls back to `fallback_lattice` when SIFT finds fewer than `MIN_DETECTED_KEYPOINTS` distinct pixels.
    """
    _check_image(image)
    _check_max_keypoints(max_keypoints)
    pixels = to_uint8(image)
    sift = cv2.SIFT_create()
    if with_descriptors:
        keypoints, descriptors = sift.detectAndCompute(pixels, None)
    else:
        keypoints, descriptors = sift.detect(pixels, None), None

    coords, scores, order = _unique_pixels_strongest_first(keypoints, pixels.shape)
    if len(order) < MIN_DETECTED_KEYPOINTS:
        return _fallback_keypoints(pixels.shape, max_keypoints)

    keep = order[:max_keypoints]
    kept_descriptors = None
    if descriptors is not None:
        kept_descriptors = np.ascontiguousarray(descriptors[keep], dtype=np.float32)
    return SliceKeypoints(
        coords=coords[keep], scores=scores[keep], descriptors=kept_descriptors, is_fallback=False
    )


def _unique_pixels_strongest_first(
    keypoints: Sequence[cv2.KeyPoint], shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer (row, col) and score of every OpenCV keypoint, plus the indices to keep, in output order.

    SIFT reports one location several times (one per dominant orientation, sometimes per octave);
    after rounding, each pixel keeps only its strongest keypoint.
    """
    if not keypoints:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
    xy = np.array([kp.pt for kp in keypoints], dtype=np.float64)
    scores = np.array([kp.response for kp in keypoints], dtype=np.float32)
    sizes = np.array([kp.size for kp in keypoints], dtype=np.float64)
    angles = np.array([kp.angle for kp in keypoints], dtype=np.float64)

    # OpenCV puts pixel centres at integer positions, so rounding picks the pixel the point lies in.
    rows = np.clip(np.floor(xy[:, 1] + 0.5), 0, shape[0] - 1).astype(np.int64)
    cols = np.clip(np.floor(xy[:, 0] + 0.5), 0, shape[1] - 1).astype(np.int64)
    coords = np.stack([rows, cols], axis=1)

    # np.lexsort sorts by its last key first: score descending, then (row, col), then sub-pixel details
    # so that the strongest copy of a pixel is chosen the same way whatever order OpenCV used.
    order = np.lexsort((angles, sizes, xy[:, 0], xy[:, 1], cols, rows, -scores))
    _, first = np.unique(rows[order] * shape[1] + cols[order], return_index=True)
    return coords, scores, order[np.sort(first)]


def fallback_lattice(shape: tuple[int, int], max_keypoints: int) -> np.ndarray:
    """A centred regular grid of at most `max_keypoints` points inside an image of `shape`, row-major.

    Points sit at the centres of g_r x g_c equal cells (see `_lattice_size`), so they keep half a cell
    away from the border whenever a cell is wider than one pixel.
    """
    height, width = shape
    if height < 1 or width < 1:
        raise ValueError(f"Cannot place keypoints in an empty image of shape {shape}.")
    _check_max_keypoints(max_keypoints)
    grid_rows, grid_cols = _lattice_size(height, width, max_keypoints)
    rows = np.floor((np.arange(grid_rows) + 0.5) * height / grid_rows).astype(np.int64)
    cols = np.floor((np.arange(grid_cols) + 0.5) * width / grid_cols).astype(np.int64)
    grid_r, grid_c = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([grid_r.ravel(), grid_c.ravel()], axis=1)


def _lattice_size(height: int, width: int, max_keypoints: int) -> tuple[int, int]:
    """Grid size (g_r, g_c): at most `max_keypoints` points, at most one per pixel, near-square cells.

    Every grid that fits is scored by its point count times its cells' squareness (short side over
    long side), so a 2:1 cell shape is worth half the points; ties go to the fewest rows.
    """
    rows = np.arange(1, min(height, max_keypoints) + 1)[:, None]
    cols = np.arange(1, min(width, max_keypoints) + 1)[None, :]
    cell_height, cell_width = height / rows, width / cols
    squareness = np.minimum(cell_height, cell_width) / np.maximum(cell_height, cell_width)
    count = rows * cols
    score = np.where(count <= max_keypoints, count * squareness, -1.0)
    best_row, best_col = np.unravel_index(np.argmax(score), score.shape)
    return int(best_row) + 1, int(best_col) + 1


def _fallback_keypoints(shape: tuple[int, int], max_keypoints: int) -> SliceKeypoints:
    coords = fallback_lattice(shape, max_keypoints)
    return SliceKeypoints(
        coords=coords, scores=np.zeros(len(coords), np.float32), descriptors=None, is_fallback=True
    )


def detect_volume(
    slices: np.ndarray,
    config: KeypointConfig,
    progress: Callable[[int, int], None] | None = None,
) -> list[SliceKeypoints]:
    """Keypoints for every slice of an (S, H, W) volume; `progress(done, total)` is called after each."""
    if np.ndim(slices) != 3:
        raise InputDataError(f"Expected a volume of slices (S, H, W), got shape {np.shape(slices)}.")
    detector = make_detector(config)
    total = len(slices)
    results = []
    for done, image in enumerate(slices, start=1):
        results.append(detector(image))
        if progress is not None:
            progress(done, total)
    return results


def transform_keypoint_coords(
    coords: np.ndarray,
    scale: tuple[float, float],
    offset: tuple[float, float],
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Map (row, col) from an original slice onto a resized-and-padded grid: floor(coords * scale + offset).

    Returns (new_coords, valid): new_coords (N, 2) int64 as computed (possibly outside the grid), and
    valid (N,) bool, True where the point lies inside `shape`.
    """
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape (N, 2), got {coords.shape}.")
    mapped = coords.astype(np.float64) * np.asarray(scale, np.float64) + np.asarray(offset, np.float64)
    new_coords = np.floor(mapped).astype(np.int64)
    valid = np.all((new_coords >= 0) & (new_coords < np.asarray(shape)), axis=1)
    return new_coords, valid


def transform_slice_keypoints(
    keypoints: SliceKeypoints,
    scale: tuple[float, float],
    offset: tuple[float, float],
    shape: tuple[int, int],
) -> SliceKeypoints:
    """`transform_keypoint_coords` for a whole slice: drops points that leave `shape` or land on a pixel
    already taken by a stronger point (possible when downscaling), keeping the strongest-first order.

    If no point survives, the slice gets the fallback lattice of `shape` so it still has keypoints.
    """
    new_coords, valid = transform_keypoint_coords(keypoints.coords, scale, offset, shape)
    inside = np.flatnonzero(valid)
    _, first = np.unique(new_coords[inside, 0] * shape[1] + new_coords[inside, 1], return_index=True)
    keep = inside[np.sort(first)]
    if len(keep) == 0:
        return _fallback_keypoints(shape, max(len(keypoints), 1))
    descriptors = None if keypoints.descriptors is None else keypoints.descriptors[keep]
    return SliceKeypoints(
        coords=new_coords[keep],
        scores=keypoints.scores[keep],
        descriptors=descriptors,
        is_fallback=keypoints.is_fallback,
    )


@dataclass
class KeypointBatch:
    """Keypoints of a batch of slices, padded to a common length for the model."""

    coords: torch.Tensor  # [B, N_max, 2] int64 (row, col); padded rows are 0
    mask: torch.Tensor  # [B, N_max] bool, True = real keypoint
    scores: torch.Tensor  # [B, N_max] float32; padded entries are 0

    def __post_init__(self) -> None:
        batch, length = self.mask.shape
        if self.coords.shape != (batch, length, 2) or self.scores.shape != (batch, length):
            raise ValueError(
                f"Inconsistent keypoint batch: coords {tuple(self.coords.shape)}, "
                f"mask {tuple(self.mask.shape)}, scores {tuple(self.scores.shape)}."
            )

    def at_level(self, level: int) -> torch.Tensor:
        """Coordinates on encoder level `level` (1..4), whose stride is 2**(level-1)."""
        if not 1 <= level <= NUM_LEVELS:
            raise ValueError(f"level must be between 1 and {NUM_LEVELS}, got {level}.")
        # Coordinates are non-negative, so floor division is the truncation the model expects.
        return torch.div(self.coords, 2 ** (level - 1), rounding_mode="floor")

    def to(self, device: torch.device | str) -> KeypointBatch:
        return KeypointBatch(
            coords=self.coords.to(device), mask=self.mask.to(device), scores=self.scores.to(device)
        )

    def index_select(self, idx: torch.Tensor) -> KeypointBatch:
        """The batch entries listed in `idx`, in that order."""
        idx = idx.to(self.coords.device)
        return KeypointBatch(
            coords=self.coords.index_select(0, idx),
            mask=self.mask.index_select(0, idx),
            scores=self.scores.index_select(0, idx),
        )


def pad_keypoints(per_slice: Sequence[SliceKeypoints], max_keypoints: int) -> KeypointBatch:
    """Stack slices' keypoints into a `KeypointBatch` of length `max_keypoints`, zero-padded."""
    _check_max_keypoints(max_keypoints)
    batch = len(per_slice)
    coords = torch.zeros((batch, max_keypoints, 2), dtype=torch.int64)
    mask = torch.zeros((batch, max_keypoints), dtype=torch.bool)
    scores = torch.zeros((batch, max_keypoints), dtype=torch.float32)
    for i, keypoints in enumerate(per_slice):
        count = len(keypoints.coords)
        if count > max_keypoints:
            raise ValueError(f"Slice {i} has {count} keypoints, more than max_keypoints={max_keypoints}.")
        coords[i, :count] = torch.from_numpy(np.asarray(keypoints.coords, dtype=np.int64))
        mask[i, :count] = True
        scores[i, :count] = torch.from_numpy(np.asarray(keypoints.scores, dtype=np.float32))
    return KeypointBatch(coords=coords, mask=mask, scores=scores)


def used_length(mask: torch.Tensor) -> int:
    """How many columns of a padded keypoint mask hold a real keypoint in some row (at least 1).
    `pad_keypoints` puts each slice's real keypoints first, so the columns past this are padding in every
    row and can be dropped: small slices have far fewer keypoints than the cap, and attention and Sinkhorn
    work shrinks with the length."""
    return max(1, int(mask.sum(1).max()))


def drop_padding(keypoints: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keypoints [..., N, 2] and mask [..., N] without the slots past `used_length`, which are padding in
    every row. Padding takes part in nothing, so a model gives the same output on both."""
    length = used_length(mask.reshape(-1, mask.shape[-1]))
    return keypoints[..., :length, :], mask[..., :length]


def _check_image(image: np.ndarray) -> None:
    if np.ndim(image) != 2 or min(np.shape(image)) < 1:
        raise InputDataError(f"Expected a non-empty 2D slice (H, W), got shape {np.shape(image)}.")


def _check_max_keypoints(max_keypoints: int) -> None:
    if max_keypoints < 1:
        raise ValueError(f"max_keypoints must be at least 1, got {max_keypoints}.")
