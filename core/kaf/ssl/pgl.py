"""PGL: prior-guided local self-supervised learning (Xie et al. 2020; METHODS.md C), on 2D slices.

PGL is specified on 3D CT patches; our backbone is the 2D slice UNet, so this is a 2D adaptation
(our choice, every item below; the config repeats it field by field):
- Views: one slice per item; two square crops of side s·P (s ~ U[1.1, 1.4] per view), redrawn from the
  item's generator until their shared area is >= 10 % of each crop; each resized to P x P, flipped per
  axis with p = 0.5, then the intensity augmentations of C.2 item 1. A crop larger than the slice covers
  it whole (the slice lies at a random place inside, padded with 0 = the volume mean after normalisation).
- Aligner: 2D RoIAlign written with grid_sample (bilinear, sampling ratio 2 per bin, m x m bins, m = 4)
  over the overlap box of each view (views.overlap_boxes, flip-aware), on the backbone's bottleneck
  (stride 16) or any configured list of levels among the bottleneck and the decoder blocks. Each sampled
  grid is un-flipped, so cell u is the same source location in both views.
- Heads: the aligned m x m grids go through a 1x1-conv projector (C -> 1024, BN, ReLU, -> 256) and
  predictor (256 -> 1024, BN, ReLU, -> 256); they are aligned before projection so that the heads see
  only the shared region.
- Target: a deep copy of the backbone (a KafUNet, run without gradients, BN in training mode as in BYOL;
  only its encoder and bottleneck, plus any decoder blocks of the chosen levels, are used) and of each
  projector, kept in the heads' ModuleDict under "target" with requires_grad False, so it is saved with
  the heads and moves with them. After each step: target <- tau·target + (1 - tau)·online, with tau
  going 0.996 -> 1 along a cosine (BYOL's schedule).
- Loss (C.2 item 5): mean over the aligned grid of (2 - 2 cos(q1, z2)) + (2 - 2 cos(q2, z1)), averaged
  over the local items (no term compares items, so nothing is gathered across ranks); levels are summed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kaf.data.keypoints import drop_padding
from kaf.models import KafUNet
from kaf.models.checkpoints import in_groups
from kaf.models.unet import SIDE_MULTIPLE
from kaf.runtime.errors import KafError
from kaf.ssl.base import Communicator, OptimiserSettings, PretrainMethod
from kaf.ssl.data import PretrainData
from kaf.ssl.losses import cosine_schedule, normalised_regression
from kaf.ssl.views import ViewGeometry, crop_geometry, overlap_boxes, view_keypoints, warp

BOTTLENECK_STRIDE = 16
DECODER_STRIDES = (8, 4, 2, 1)  # outputs of decoder blocks 0..3
TARGET = "target"


@dataclass(frozen=True)
class IntensityAugmentation:
    """C.2 item 1 [3P], applied to each view independently, in this order."""

    noise_probability: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)  # Gaussian noise, variance ~ U(range)
    blur_probability: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # Gaussian blur, sigma in pixels of the view
    contrast_probability: float = 0.5
    contrast_range: tuple[float, float] = (0.75, 1.25)  # multiply, then clip to the view's range (our choice)
    gamma_probability: float = 0.5
    gamma_range: tuple[float, float] = (0.7, 1.5)  # on the view rescaled to [0, 1], then rescaled back


@dataclass(frozen=True)
class PglConfig:
    batch_size: int = 16  # items (slices) per step, 2 views each (our choice; [3P] reference scale: 128)
    view_size: int = 128  # P, the side of both views (our choice: the interactive preset's input size)
    crop_scale: tuple[float, float] = (1.1, 1.4)  # crop side s·P, s drawn per view [3P]
    min_overlap: float = 0.1  # shared area / each crop's area, else redraw the pair [3P: ">= 10 %"]
    flip_probability: float = 0.5  # per view and axis [3P]
    max_draws: int = 1000  # crop pairs tried per item before giving up (our choice; a guard, never hit)
    intensity: IntensityAugmentation = field(default_factory=IntensityAugmentation)
    # Feature levels aligned, by stride: 16 = bottleneck; 8, 4, 2, 1 = decoder blocks 0..3 (their blocks
    # are then trained and transferred too). Our choice: bottleneck, as the [3P] code.
    levels: tuple[int, ...] = (BOTTLENECK_STRIDE,)
    grid_size: int = 4  # m, RoIAlign bins per axis (our choice; unknown in the paper)
    sampling_ratio: int = 2  # bilinear samples per bin and axis (our choice)
    projector_hidden: int = 1024  # our choice (C.2 item 4; [3P] uses 4096)
    projection_dim: int = 256  # our choice ([3P] uses 512)
    predictor_hidden: int = 1024  # our choice
    ema_start: float = 0.996  # tau at the start, -> ema_end along a cosine (BYOL default; [3P] fixed 0.999)
    ema_end: float = 1.0
    global_weight: float = 0.0  # BYOL term on whole-view pooled features, off (C.3: unknown in the paper)
    # Our choice: Adam 3e-4, weight decay 1e-6, cosine decay; warm-up 5 % of the steps (10 of 200 epochs).
    optimiser: OptimiserSettings = field(
        default_factory=lambda: OptimiserSettings(
            "adam", learning_rate=3e-4, weight_decay=1e-6, schedule="cosine", warmup_fraction=0.05
        )
    )

    def __post_init__(self) -> None:
        if self.view_size <= 0 or self.view_size % SIDE_MULTIPLE:
            raise KafError(f"PGL view_size must be a positive multiple of 16, got {self.view_size}")
        allowed = (BOTTLENECK_STRIDE, *DECODER_STRIDES)
        if not self.levels or any(level not in allowed for level in self.levels):
            raise KafError(f"PGL levels must be strides among {allowed}, got {self.levels}")
        if len(set(self.levels)) != len(self.levels):
            raise KafError(f"PGL levels are listed twice: {self.levels}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1]:
            raise KafError(f"PGL crop_scale must be an increasing positive range, got {self.crop_scale}")
        if self.batch_size < 1:
            raise KafError(f"PGL batch_size must be at least 1, got {self.batch_size}")
        if not 0 <= self.min_overlap <= 1:
            raise KafError(f"PGL min_overlap must lie in [0, 1], got {self.min_overlap}")


@dataclass
class PglBatch:
    """Items of one slice and its two views; view axis 1 holds (view 1, view 2)."""

    views: torch.Tensor  # [B, 2, 1, P, P]
    boxes: torch.Tensor  # [B, 2, 4] overlap box (x0, y0, x1, y1) in each view's pixel-edge coordinates
    flips: torch.Tensor  # [B, 2, 2] bool, (x, y) mirrored per view
    to_source: torch.Tensor  # [B, 2, 3, 3] float64 view pixel -> source pixel (views.ViewGeometry)
    keypoints: torch.Tensor | None = None  # [B, 2, N, 2] (row, col) for a KAF backbone
    keypoint_mask: torch.Tensor | None = None  # [B, 2, N]


@dataclass
class ViewPair:
    geometries: tuple[ViewGeometry, ViewGeometry]
    boxes: tuple[torch.Tensor, torch.Tensor]  # [4] float32 each
    flips: tuple[tuple[bool, bool], tuple[bool, bool]]


# --- views --------------------------------------------------------------------------------------------------


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _chance(generator: torch.Generator, probability: float) -> bool:
    return float(torch.rand((), generator=generator)) < probability


def draw_crop(
    source_size: tuple[int, int], config: PglConfig, generator: torch.Generator
) -> tuple[tuple[float, float], float]:
    """(origin (x, y), side) of a square crop of side s·P: inside the slice along an axis where the slice
    is longer than the crop, else covering the slice whole."""
    side = config.view_size * _uniform(generator, *config.crop_scale)
    height, width = source_size
    origin = tuple(
        _uniform(generator, min(0.0, extent - side), max(0.0, extent - side)) for extent in (width, height)
    )
    return origin, side


def draw_view_pair(source_size: tuple[int, int], config: PglConfig, generator: torch.Generator) -> ViewPair:
    """Two flipped crops whose shared area is at least `min_overlap` of each crop, redrawn until so."""
    size = (config.view_size, config.view_size)
    needed = config.min_overlap * config.view_size**2  # a box's area in view pixels / P² = its crop share
    for _ in range(config.max_draws):
        geometries, flips = [], []
        for _ in range(2):
            origin, side = draw_crop(source_size, config, generator)
            flip = (_chance(generator, config.flip_probability), _chance(generator, config.flip_probability))
            geometries.append(crop_geometry(origin, (side, side), size, flip))
            flips.append(flip)
        boxes = overlap_boxes(geometries[0], geometries[1], source_size)
        if boxes is not None and min(_area(box) for box in boxes) >= needed:
            return ViewPair(
                (geometries[0], geometries[1]),
                (torch.tensor(boxes[0], dtype=torch.float32), torch.tensor(boxes[1], dtype=torch.float32)),
                (flips[0], flips[1]),
            )
    raise KafError(
        f"PGL found no two crops overlapping by {config.min_overlap:.0%} in {config.max_draws} draws on a "
        f"{source_size[0]} x {source_size[1]} slice; lower min_overlap or raise view_size"
    )


def _area(box: Sequence[float]) -> float:
    return float((box[2] - box[0]) * (box[3] - box[1]))


def augment_intensity(
    image: torch.Tensor, settings: IntensityAugmentation, generator: torch.Generator
) -> torch.Tensor:
    """Noise, blur, contrast and gamma on one view [1, h, w], each with its own probability."""
    if _chance(generator, settings.noise_probability):
        std = math.sqrt(_uniform(generator, *settings.noise_variance))
        image = image + std * torch.randn(image.shape, generator=generator)
    if _chance(generator, settings.blur_probability):
        image = gaussian_blur(image, _uniform(generator, *settings.blur_sigma))
    if _chance(generator, settings.contrast_probability):
        low, high = image.min(), image.max()
        image = (image * _uniform(generator, *settings.contrast_range)).clamp(low, high)
    if _chance(generator, settings.gamma_probability):
        low, high = image.min(), image.max()
        span = (high - low).clamp(min=1e-8)
        image = ((image - low) / span) ** _uniform(generator, *settings.gamma_range) * span + low
    return image


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [1, h, w] (kernel radius 3 sigma, reflected borders)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return F.conv2d(x, kernel.view(1, 1, -1, 1))[0]


# --- aligner ------------------------------------------------------------------------------------------------


def roi_align(
    features: torch.Tensor,
    boxes: torch.Tensor,
    view_size: tuple[int, int],
    grid_size: int,
    sampling_ratio: int,
) -> torch.Tensor:
    """RoIAlign of each map over its box: features [N, C, h, w] of views of `view_size` (h, w) pixels (any
    stride: a feature cell covers stride x stride view pixels), boxes [N, 4] (x0, y0, x1, y1) in view
    pixel-edge coordinates. Bin (i, j) averages sampling_ratio² bilinear samples spread evenly inside it;
    samples in the half cell along the map's border read the border cell. Returns [N, C, m, m]."""
    points = grid_size * sampling_ratio
    fractions = (torch.arange(points, device=boxes.device, dtype=torch.float32) + 0.5) / points
    boxes = boxes.to(torch.float32)
    xs = boxes[:, 0:1] + fractions * (boxes[:, 2:3] - boxes[:, 0:1])  # [N, points]
    ys = boxes[:, 1:2] + fractions * (boxes[:, 3:4] - boxes[:, 1:2])
    height, width = view_size
    # Edge coordinates normalise the same at every stride under grid_sample's align_corners=False.
    grid_x, grid_y = torch.broadcast_tensors(2 * xs[:, None, :] / width - 1, 2 * ys[:, :, None] / height - 1)
    grid = torch.stack([grid_x, grid_y], -1).to(features.dtype)
    sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(sampled, sampling_ratio)


def unflip(grid: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror each sampled grid [N, C, m, m] back along the axes its view was flipped on ([N, 2] (x, y))."""
    grid = torch.where(flips[:, 0, None, None, None], grid.flip(-1), grid)
    return torch.where(flips[:, 1, None, None, None], grid.flip(-2), grid)


def align(
    features: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, view_size: int, config: PglConfig
) -> torch.Tensor:
    """The overlap region of each view on the shared m x m grid, cell u at the same source place."""
    sampled = roi_align(features, boxes, (view_size, view_size), config.grid_size, config.sampling_ratio)
    return unflip(sampled, flips)


# --- heads --------------------------------------------------------------------------------------------------


def dense_mlp(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """BYOL's MLP as 1x1 convs, keeping the spatial layout."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 1),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out_channels, 1),
    )


def projector_key(stride: int) -> str:
    return f"projector_{stride}"


def predictor_key(stride: int) -> str:
    return f"predictor_{stride}"


def level_channels(model: KafUNet, stride: int) -> int:
    if stride == BOTTLENECK_STRIDE:
        return model.bottleneck_channels
    return model.decoder_channels[DECODER_STRIDES.index(stride)]


def level_map(output, stride: int) -> torch.Tensor:
    if stride == BOTTLENECK_STRIDE:
        return output.bottleneck
    return output.decoder[DECODER_STRIDES.index(stride)]


def symmetric_regression(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """C.2 item 5 for [2B, D, ...] stacks (view 1 items, then view 2): per item, the mean over the grid of
    ||q1 - z2||² + ||q2 - z1||² on normalised vectors, then the mean over items."""
    half = len(prediction) // 2
    per_cell = normalised_regression(prediction[:half], target[half:]) + normalised_regression(
        prediction[half:], target[:half]
    )
    return per_cell.mean()


def _both_views(tensor: torch.Tensor) -> torch.Tensor:
    """[B, 2, ...] -> [2B, ...]: all view 1s, then all view 2s."""
    return torch.cat([tensor[:, 0], tensor[:, 1]])


class PglPretraining(PretrainMethod):
    name = "pgl"
    config_class = PglConfig
    slices_per_item = 1
    config: PglConfig

    @property
    def decode_until(self) -> int:
        """Decoder blocks the chosen levels need (0: the decoder is not run)."""
        decoder_levels = [DECODER_STRIDES.index(s) + 1 for s in self.config.levels if s in DECODER_STRIDES]
        return max(decoder_levels, default=0)

    def build_heads(self, model: KafUNet) -> nn.ModuleDict:
        config = self.config
        heads = nn.ModuleDict()
        for stride in config.levels:
            channels = level_channels(model, stride)
            heads[projector_key(stride)] = dense_mlp(channels, config.projector_hidden, config.projection_dim)
            heads[predictor_key(stride)] = dense_mlp(
                config.projection_dim, config.predictor_hidden, config.projection_dim
            )
        target = nn.ModuleDict({"backbone": copy.deepcopy(model)})
        for stride in config.levels:
            target[projector_key(stride)] = copy.deepcopy(heads[projector_key(stride)])
        target.requires_grad_(False)
        heads[TARGET] = target
        return heads

    def make_batch(
        self, data: PretrainData, generators: Sequence[torch.Generator], stage: str, with_keypoints: bool
    ) -> PglBatch:
        items = [self._item(data, generator, with_keypoints) for generator in generators]
        stacked = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        if with_keypoints:
            stacked["keypoints"], stacked["keypoint_mask"] = drop_padding(
                stacked["keypoints"], stacked["keypoint_mask"]
            )
        return PglBatch(**stacked)

    def _item(
        self, data: PretrainData, generator: torch.Generator, with_keypoints: bool
    ) -> dict[str, torch.Tensor]:
        volume_index = data.random_volume(generator)
        slice_index = data.random_slice(volume_index, generator)
        volume = data.volumes[volume_index]
        source = volume.slice_tensor(slice_index)
        pair = draw_view_pair(volume.slice_shape, self.config, generator)
        views = [
            augment_intensity(warp(source, g), self.config.intensity, generator) for g in pair.geometries
        ]
        item = {
            "views": torch.stack(views),
            "boxes": torch.stack(pair.boxes),
            "flips": torch.tensor(pair.flips, dtype=torch.bool),
            "to_source": torch.stack([g.to_source for g in pair.geometries]),
        }
        if with_keypoints:
            coords = volume.keypoints(slice_index).coords
            transported = [
                view_keypoints(coords, volume.slice_shape, g, volume.max_keypoints)[:2]
                for g in pair.geometries
            ]
            item["keypoints"] = torch.stack([points for points, _ in transported])
            item["keypoint_mask"] = torch.stack([mask for _, mask in transported])
        return item

    def loss(
        self, model: KafUNet, heads: nn.ModuleDict, batch: PglBatch, stage: str, comm: Communicator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        config = self.config
        images = _both_views(batch.views)
        keypoints = None if batch.keypoints is None else _both_views(batch.keypoints)
        keypoint_mask = None if batch.keypoint_mask is None else _both_views(batch.keypoint_mask)
        boxes, flips = _both_views(batch.boxes), _both_views(batch.flips)
        online = model(images, keypoints, keypoint_mask, decode_until=self.decode_until)
        target_net = heads[TARGET]
        with torch.no_grad():
            target = target_net["backbone"](images, keypoints, keypoint_mask, decode_until=self.decode_until)
        terms = {}
        for stride in config.levels:
            project, predict = heads[projector_key(stride)], heads[predictor_key(stride)]
            target_project = target_net[projector_key(stride)]
            online_map, target_map = level_map(online, stride), level_map(target, stride)
            prediction = predict(project(align(online_map, boxes, flips, config.view_size, config)))
            with torch.no_grad():
                projection = target_project(align(target_map, boxes, flips, config.view_size, config))
            terms[f"local_{stride}"] = symmetric_regression(prediction, projection)
            if config.global_weight:
                pooled = predict(project(online_map.mean((2, 3), keepdim=True)))
                with torch.no_grad():
                    pooled_target = target_project(target_map.mean((2, 3), keepdim=True))
                terms[f"global_{stride}"] = config.global_weight * symmetric_regression(pooled, pooled_target)
        return torch.stack(list(terms.values())).sum(), terms

    def trainable_groups(self, stage: str) -> tuple[str, ...]:
        return ("encoder", "bottleneck", *(f"decoder.{i}" for i in range(self.decode_until)))

    def transfer_groups(self) -> tuple[str, ...]:
        return self.trainable_groups("pretrain")

    @torch.no_grad()
    def on_after_step(self, heads: nn.ModuleDict, model: KafUNet, progress: float) -> None:
        """EMA of the target: target <- tau·target + (1 - tau)·online, tau on BYOL's cosine schedule."""
        tau = cosine_schedule(min(max(progress, 0.0), 1.0), self.config.ema_start, self.config.ema_end)
        for target, online in self.ema_pairs(heads, model):
            target.mul_(tau).add_(online.detach(), alpha=1 - tau)

    def ema_pairs(self, heads: nn.ModuleDict, model: KafUNet) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(target, online) parameters: the trained backbone groups and each projector."""
        target_net = heads[TARGET]
        backbone = dict(target_net["backbone"].named_parameters())
        groups = self.trainable_groups("pretrain")
        for name, parameter in model.named_parameters():
            if in_groups(name, groups):
                yield backbone[name], parameter
        for stride in self.config.levels:
            key = projector_key(stride)
            yield from zip(target_net[key].parameters(), heads[key].parameters(), strict=True)
