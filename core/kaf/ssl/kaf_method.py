"""KAF pretraining (METHODS.md A.4-A.5): L = 1 * L_PCL + 1 * L_global + 0.01 * L_local.

Two configurations of the same method: `kaf` (KafConfig), the measured default, and `kaf-paper`
(KafPaperConfig), the paper's values. They differ in three settings only; with the paper's, the SupCon
terms stay near chance on our data, because the embeddings collapse (BENCHMARKS.md, "Why the SupCon
terms sit at chance" and "The paper's pretraining settings against the measured ones").

A batch item is a pair of neighbouring slices of one volume, each augmented independently (mirror,
then elastic + rotation + scaling with p = 0.67). SIFT keypoints detected on the original slices are
transported into each view through its warp; ground-truth matches come from the original coordinates
and descriptors of the keypoints that survive in both views (Manhattan gate, mutual nearest
descriptors). The heads: a bottleneck projector (L_PCL), a keypoint-token projector (L_global), and a
SuperGlue-style matcher with a learnable dustbin and log-space Sinkhorn (L_local).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from kaf.data.keypoints import used_length
from kaf.models import KafUNet
from kaf.models.kaf_layer import AttentionBlock, KeypointEncoder, normalise_positions
from kaf.models.unet import SIDE_MULTIPLE
from kaf.ssl.base import Communicator, OptimiserSettings, PretrainMethod
from kaf.ssl.data import PretrainData, UnlabeledVolume
from kaf.ssl.losses import log_optimal_transport, matching_loss, supcon_by_position
from kaf.ssl.views import ViewGeometry, crop_geometry, rotation_scale_geometry, view_keypoints, warp

REFERENCE_SLICE_SIZE = 352  # the reference's ACDC slices: its pixel-valued settings are for this size


@dataclass(frozen=True)
class KafAugmentation:
    """batchgenerators semantics, per view [code]; pixel values are for 352-px views and are scaled
    to the view size so the deformation keeps its shape relative to the anatomy (our choice)."""

    mirror_probability: float = 0.5  # per axis
    spatial_probability: float = 0.67
    elastic_alpha: tuple[float, float] = (100.0, 350.0)
    elastic_sigma: tuple[float, float] = (14.0, 17.0)
    rotation: tuple[float, float] = (0.0, 2 * math.pi)
    scale: tuple[float, float] = (0.7, 1.3)


@dataclass(frozen=True)
class KafConfig:
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 0.01)  # L_PCL, L_global, L_local [paper eq. 3]
    temperature: float = 0.1
    base_temperature: float = 0.07  # the reference's constant factor tau / tau_b, kept for fidelity
    # |position_i - position_p| < threshold makes a positive: 0.35 for ACDC, 0.1 for CHD [code]. Ours: 0.01,
    # so that only the other view of a pair is positive; with 0.35 chains of positives join most of a
    # batch into one class and the embeddings collapse.
    position_threshold: float = 0.01
    # neighbour slice j of slice i: |j - i| in these offsets (our choice: symmetric, reflected at the ends;
    # the reference draws {i-2, i-1, i+1} on ACDC)
    neighbour_offsets: tuple[int, ...] = (-2, -1, 1, 2)
    match_gate: float = 20.0  # Manhattan distance in px at 352-px slices (one gate; E.8) [paper sweep 5-40]
    matcher_dim: int = 256
    matcher_heads: int = 4
    matcher_blocks: tuple[str, ...] = ("self", "cross", "self", "cross")
    sinkhorn_iterations: int = 100
    dustbin_init: float = 1.0
    projection_dim: int = 512
    # BatchNorm1d after the PCL head's first Linear, as in the global head (ours; the paper's PCL head has
    # none): without it the pooled bottleneck features' common component reaches the embeddings, which
    # start and stay collapsed (BENCHMARKS.md, "the embeddings collapse")
    pcl_head_norm: bool = True
    view_size: int = 128  # views are view_size^2 (the reference pads/crops to 352)
    batch_size: int = 32  # [code]
    augmentation: KafAugmentation = field(default_factory=KafAugmentation)
    # Ours: GCL's Adam at 1e-3; the paper's SGD at 0.002 barely moves the terms in 1000 steps
    optimiser: OptimiserSettings = field(
        default_factory=lambda: OptimiserSettings(
            kind="adam", learning_rate=1e-3, weight_decay=1e-5, schedule="cosine"
        )
    )

    def __post_init__(self) -> None:
        if self.view_size % SIDE_MULTIPLE:
            raise ValueError(f"view_size must be a multiple of {SIDE_MULTIPLE}, got {self.view_size}")
        for name in ("temperature", "base_temperature", "position_threshold"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class KafPaperConfig(KafConfig):
    """The paper's values where the default departs from them (METHODS.md A.4-A.6): `--method kaf-paper`."""

    position_threshold: float = 0.35  # ACDC [code]
    pcl_head_norm: bool = False
    optimiser: OptimiserSettings = field(
        default_factory=lambda: OptimiserSettings(
            kind="sgd", learning_rate=0.002, weight_decay=1e-5, momentum=0.9, schedule="cosine"
        )
    )


@dataclass
class KafPairBatch:
    images: torch.Tensor  # [2B, 1, P, P]: all first views, then all second views
    keypoints: torch.Tensor  # [2B, N, 2] (row, col) in the view
    keypoint_mask: torch.Tensor  # [2B, N]
    positions: torch.Tensor  # [B] slice position (k + 1) / S of the first slice (both views carry it)
    matches: torch.Tensor  # [B, N]: for view-1 keypoint a, its index among view-2 keypoints, or -1


def _pcl_head(bottleneck: int, projection_dim: int, norm: bool) -> nn.Sequential:
    """Linear(32f -> 16f), [BatchNorm1d,] ReLU, Linear(16f -> projection_dim) on the pooled bottleneck."""
    hidden = bottleneck // 2
    layers = [nn.Linear(bottleneck, hidden), *([nn.BatchNorm1d(hidden)] if norm else []), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, projection_dim))


class Matcher(nn.Module):
    """Descriptors from keypoint tokens + positions, alternating self/cross attention, final projection."""

    def __init__(self, dim: int, heads: int, kinds: Sequence[str]) -> None:
        super().__init__()
        self.position_encoder = KeypointEncoder(dim)
        self.kinds = tuple(kinds)
        self.blocks = nn.ModuleList(AttentionBlock(dim, heads) for _ in self.kinds)
        self.final = nn.Conv1d(dim, dim, 1)

    def forward(
        self, descriptors: tuple[torch.Tensor, torch.Tensor], masks: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = descriptors
        for kind, block in zip(self.kinds, self.blocks, strict=True):
            # both views are updated from the previous state of the other (METHODS.md A.5)
            source_first, source_second = (first, second) if kind == "self" else (second, first)
            mask_first, mask_second = (masks[0], masks[1]) if kind == "self" else (masks[1], masks[0])
            first, second = (
                block(first, masks[0], source=source_first, source_mask=mask_first)[0],
                block(second, masks[1], source=source_second, source_mask=mask_second)[0],
            )
        return self.final(first), self.final(second)


class KafPretraining(PretrainMethod):
    name = "kaf"
    config_class = KafConfig
    slices_per_item = 2

    def build_heads(self, model: KafUNet) -> nn.ModuleDict:
        if not model.uses_keypoints:
            raise ValueError("KAF pretraining needs a backbone with KAF layers")
        config = self.config
        bottleneck = model.bottleneck_channels
        token_width = model.config.token_dim * len(model.config.kaf_levels)
        return nn.ModuleDict(
            {
                "pcl": _pcl_head(bottleneck, config.projection_dim, config.pcl_head_norm),
                "token_projection": nn.Conv1d(token_width, config.matcher_dim, 1),
                "global": nn.Sequential(
                    nn.Linear(config.matcher_dim, config.matcher_dim),
                    nn.BatchNorm1d(config.matcher_dim),
                    nn.ReLU(),
                    nn.Linear(config.matcher_dim, config.projection_dim),
                ),
                "matcher": Matcher(config.matcher_dim, config.matcher_heads, config.matcher_blocks),
                "dustbin": _Scalar(config.dustbin_init),
            }
        )

    def make_batch(
        self, data: PretrainData, generators: Sequence[torch.Generator], stage: str, with_keypoints: bool
    ) -> KafPairBatch:
        items = [self._pair(data, generator) for generator in generators]
        first, second = ([item["views"][v] for item in items] for v in (0, 1))
        matches = torch.full(first[0][2].shape, -1, dtype=torch.int64).repeat(len(items), 1)
        for index, item in enumerate(items):
            matches[index, : len(item["matches"])] = torch.from_numpy(item["matches"])
        views = first + second
        keypoint_mask = torch.stack([view[2] for view in views])
        length = used_length(keypoint_mask)
        return KafPairBatch(
            images=torch.stack([view[0] for view in views]),
            keypoints=torch.stack([view[1] for view in views])[:, :length],
            keypoint_mask=keypoint_mask[:, :length],
            positions=torch.tensor([item["position"] for item in items], dtype=torch.float32),
            matches=matches[:, :length],
        )

    def _pair(self, data: PretrainData, generator: torch.Generator) -> dict:
        volume_index = data.random_volume(generator)
        volume = data.volumes[volume_index]
        first = data.random_slice(volume_index, generator)
        second = neighbour_slice(first, volume.slice_count, self.config.neighbour_offsets, generator)
        views, alive = [], []
        for index in (first, second):
            geometry = random_view_geometry(volume.slice_shape, self.config, generator)
            image = warp(volume.slice_tensor(index), geometry, mode="bicubic")
            coords, mask, survived = view_keypoints(
                volume.keypoints(index).coords, volume.slice_shape, geometry, volume.max_keypoints
            )
            views.append((image, coords, mask))
            alive.append(survived)
        gate = self.config.match_gate * max(volume.slice_shape) / REFERENCE_SLICE_SIZE
        matches = ground_truth_matches(volume, first, second, alive[0], alive[1], gate)
        return {"views": views, "matches": matches, "position": (first + 1) / volume.slice_count}

    def loss(
        self, model: KafUNet, heads: nn.ModuleDict, batch: KafPairBatch, stage: str, comm: Communicator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        config = self.config
        output = model(batch.images, batch.keypoints, batch.keypoint_mask, decode_until=0)
        half = batch.images.shape[0] // 2
        pooled = output.bottleneck.mean(dim=(2, 3))
        tokens = torch.cat([output.tokens[level] for level in sorted(output.tokens)], dim=1)
        projected = heads["token_projection"](tokens)  # [2B, 256, N]
        mask = batch.keypoint_mask
        aggregated = (projected * mask[:, None]).sum(2) / mask.sum(1, keepdim=True).clamp(min=1)
        positions = comm.gather_constant(batch.positions)
        positions = torch.cat([positions, positions])

        def contrast(embeddings: torch.Tensor) -> torch.Tensor:
            return supcon_by_position(
                _gather_views(embeddings, half, comm),
                positions,
                config.position_threshold,
                config.temperature,
                config.base_temperature,
            )

        pcl = contrast(heads["pcl"](pooled))
        global_term = contrast(heads["global"](aggregated))
        local = self._local_loss(heads, projected, batch, half)
        weights = config.loss_weights
        terms = {
            "L_PCL": weights[0] * pcl,
            "L_global": weights[1] * global_term,
            "L_local": weights[2] * local,
        }
        return sum(terms.values()), terms

    def _local_loss(
        self, heads: nn.ModuleDict, projected: torch.Tensor, batch: KafPairBatch, half: int
    ) -> torch.Tensor:
        height, width = batch.images.shape[-2:]
        mask = batch.keypoint_mask
        positions = normalise_positions(batch.keypoints, height, width)
        descriptors = projected + heads["matcher"].position_encoder(positions, mask)
        first, second = heads["matcher"]((descriptors[:half], descriptors[half:]), (mask[:half], mask[half:]))
        scores = torch.einsum("bdm,bdn->bmn", first, second) / math.sqrt(first.shape[1])
        log_assignment = log_optimal_transport(
            scores, heads["dustbin"].value, mask[:half], mask[half:], self.config.sinkhorn_iterations
        )
        return matching_loss(log_assignment, batch.matches, mask[:half], mask[half:])

    def trainable_groups(self, stage: str) -> tuple[str, ...]:
        return ("encoder", "bottleneck")

    def transfer_groups(self) -> tuple[str, ...]:
        return ("encoder", "bottleneck")  # the encoder including its KAF layers [paper]


class KafPaperPretraining(KafPretraining):
    """KAF pretraining with the paper's settings, kept to reproduce it and to compare against."""

    name = "kaf-paper"
    config_class = KafPaperConfig


class _Scalar(nn.Module):
    """One learnable number (the dustbin score alpha), as a module so it lives in the heads' state."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(value)))


def _gather_views(embeddings: torch.Tensor, half: int, comm: Communicator) -> torch.Tensor:
    """[2B_local, D] (view 1 then view 2) -> [2B_global, D] with all ranks' view 1 first, then view 2."""
    return torch.cat([comm.gather(embeddings[:half]), comm.gather(embeddings[half:])])


def neighbour_slice(index: int, count: int, offsets: Sequence[int], generator: torch.Generator) -> int:
    """A neighbour at one of `offsets`, reflected at the volume's ends, never the slice itself (a
    one-slice volume pairs with itself)."""
    candidates = sorted({_reflect(index + offset, count) for offset in offsets} - {index})
    if not candidates:
        return index
    return candidates[int(torch.randint(0, len(candidates), (1,), generator=generator))]


def _reflect(position: int, count: int) -> int:
    if count == 1:
        return 0
    period = 2 * (count - 1)
    position = abs(position) % period
    return period - position if position >= count else position


def _uniform(generator: torch.Generator, bounds: tuple[float, float]) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * float(torch.rand(1, generator=generator))


def random_view_geometry(
    slice_shape: tuple[int, int], config: KafConfig, generator: torch.Generator
) -> ViewGeometry:
    """Mirror each axis (p = 0.5), then with p = 0.67 elastic deformation + rotation + scaling about the
    slice centre; otherwise a random crop (or centred padding where the slice is smaller than the view)."""
    settings = config.augmentation
    size = (config.view_size, config.view_size)
    flips = [bool(torch.rand(1, generator=generator) < settings.mirror_probability) for _ in range(2)]
    if float(torch.rand(1, generator=generator)) < settings.spatial_probability:
        geometry = _spatial(slice_shape, size, settings, generator)
    else:
        geometry = _random_crop(slice_shape, size, generator)
    return _mirror_source(geometry, slice_shape, flips)


def _spatial(
    slice_shape: tuple[int, int], size: tuple[int, int], settings: KafAugmentation, generator: torch.Generator
) -> ViewGeometry:
    angle = _uniform(generator, settings.rotation)
    # batchgenerators scales coordinates: a factor s samples s times the area, i.e. zooms out by s
    zoom = _uniform(generator, settings.scale)
    geometry = rotation_scale_geometry(slice_shape, size, angle, 1 / zoom)
    # At s times the reference resolution the field keeps its shape if sigma scales by s and the
    # displacement by s; smoothing noise over s-times fewer pixels raises its amplitude by 1/s, so
    # alpha scales by s^2.
    pixel_scale = size[0] / REFERENCE_SLICE_SIZE
    alpha = _uniform(generator, settings.elastic_alpha) * pixel_scale**2
    sigma = _uniform(generator, settings.elastic_sigma) * pixel_scale
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    noise = np.random.default_rng(seed).uniform(-1, 1, (2, *size))
    field_view = np.stack(
        [gaussian_filter(channel, sigma, mode="constant", cval=0.0) * alpha for channel in noise]
    )
    # the deformation is applied to the centred view grid before rotation and scaling, so in source
    # pixels it is the same linear map applied to the displacement
    linear = geometry.to_source[:2, :2]
    displacement = torch.einsum("ij,jhw->ihw", linear, torch.from_numpy(field_view))
    return ViewGeometry(geometry.to_source, size, displacement)


def _random_crop(
    slice_shape: tuple[int, int], size: tuple[int, int], generator: torch.Generator
) -> ViewGeometry:
    origin = []
    for source_side, view_side in zip(reversed(slice_shape), reversed(size), strict=True):
        slack = source_side - view_side
        offset = int(torch.randint(0, slack + 1, (1,), generator=generator)) if slack > 0 else slack // 2
        origin.append(float(offset))
    return crop_geometry((origin[0], origin[1]), (float(size[1]), float(size[0])), size)


def _mirror_source(geometry: ViewGeometry, slice_shape: tuple[int, int], flips: list[bool]) -> ViewGeometry:
    """Mirroring the slice before the spatial transform = composing its flip after the view's map."""
    height, width = slice_shape
    flip = torch.eye(3, dtype=torch.float64)
    if flips[0]:
        flip[0, 0], flip[0, 2] = -1.0, width - 1.0
    if flips[1]:
        flip[1, 1], flip[1, 2] = -1.0, height - 1.0
    displacement = geometry.displacement
    if displacement is not None:
        displacement = (
            displacement
            * torch.tensor([-1.0 if f else 1.0 for f in flips], dtype=displacement.dtype)[:, None, None]
        )
    return ViewGeometry(flip @ geometry.to_source, geometry.size, displacement)


def ground_truth_matches(
    volume: UnlabeledVolume,
    first: int,
    second: int,
    alive_first: np.ndarray,
    alive_second: np.ndarray,
    gate: float,
) -> np.ndarray:
    """For each view-1 keypoint (in view order: the survivors of `first`), the index of its match among
    the view-2 keypoints, or -1. Computed on original coordinates and descriptors: the candidate set is
    the other slice's keypoints within Manhattan distance < gate; the nearest descriptor wins; only mutual
    nearest neighbours are kept (METHODS.md A.4)."""
    kp_first, kp_second = volume.keypoints(first), volume.keypoints(second)
    count_first = int(alive_first.sum())
    matches = np.full(count_first, -1, dtype=np.int64)
    if kp_first.descriptors is None or kp_second.descriptors is None:
        return matches
    # A view that lost every keypoint to its warp carries the fallback lattice: nothing to match.
    if not alive_first.any() or not alive_second.any():
        return matches
    coords_a, coords_b = kp_first.coords[alive_first], kp_second.coords[alive_second]
    desc_a, desc_b = kp_first.descriptors[alive_first], kp_second.descriptors[alive_second]
    manhattan = np.abs(coords_a[:, None, :] - coords_b[None, :, :]).sum(-1)
    distance = np.sqrt(((desc_a[:, None, :] - desc_b[None, :, :]) ** 2).sum(-1))
    distance = np.where(manhattan < gate, distance, np.inf)
    best_b = distance.argmin(1)
    best_a = distance.argmin(0)
    finite = np.isfinite(distance[np.arange(len(coords_a)), best_b])
    mutual = finite & (best_a[best_b] == np.arange(len(coords_a)))
    matches[mutual] = best_b[mutual]
    return matches
