"""Dense hierarchical SSL (Kats, Hirsch, Heinrich 2024; METHODS.md D), adapted to our 2D slice UNet.

The paper trains a 3D FPN on 128 x 128 x 32 patches. Our product backbone is the 2D KAF/plain UNet, so
this module is a 2D adaptation (our choice), faithful to D.2-D.4 otherwise:
- Views: an anchor pixel inside the body mask of one slice; two square `view_size` crops of that slice
  that both contain it, related by a pure integer shift (crop origins are integers and the crop size
  equals the view size, so view pixel v of view 1 is view pixel v + o_1 - o_2 of view 2). Crop origins
  are uniform among those keeping the crop inside the slice [code]; along a side shorter than the view,
  the crop overhangs and the overhang is filled with the slice minimum (our choice: background, where
  the reference instead refuses images smaller than the patch).
- Body mask (our choice): pixels whose intensity, rescaled to [0, 1] between the slice's minimum and
  maximum, exceeds `body_threshold` (the reference thresholds [0, 1]-scaled MRI at 0.03 and flood-fills
  from the border; our slices are z-scored, so we rescale per slice). An empty mask falls back to all
  pixels.
- Up to `pairs` pixel pairs per view pair, inside both crops and the body, padded to a fixed count with
  a mask so items stack.
- Local appearance augmentations per view [code], on the crop; the clean crop is the restoration target.
  Our data are z-scored, not [0, 1]: the Bezier curve acts on the crop rescaled to [0, 1] by its min and
  max and is mapped back, and in-painting noise is uniform over the crop's [min, max] (the reference's
  [0, 1)). Local shuffling keeps the block side dim/20 and scales the block count from 3D to 2D so the
  same nominal fraction of the image is shuffled: 5000 blocks x (1/20)^3 = 0.625 of a volume, so
  0.625 / (1/20)^2 = 250 blocks of a slice.
- Embedding (D.3) on our UNet's pyramid: the bottleneck (stride 16) and the four decoder maps (strides
  8, 4, 2, 1) = 5 levels, each with its own 1x1 conv to 32 channels, read at floor(v / stride).
- Negatives (D.4) are intra-volume in the paper; here intra-item (one view pair of one slice): batch
  items must be independent (kaf.ssl.base), and the paper's step of 10 pairs from one volume would tie
  them together. Each item draws its own volume and slice; the NCE is a per-item term averaged over the
  local items, so no cross-rank gathering is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kaf.data.keypoints import drop_padding
from kaf.models import KafUNet
from kaf.runtime.errors import KafError
from kaf.ssl.base import Communicator, OptimiserSettings, PretrainMethod
from kaf.ssl.data import PretrainData, UnlabeledVolume
from kaf.ssl.losses import info_nce, not_self
from kaf.ssl.views import ViewGeometry, crop_geometry, sample_pixel_pairs, view_keypoints, warp

# Strides of the pyramid levels the embedding reads: the bottleneck, then decoder blocks 0..3.
LEVEL_STRIDES = (16, 8, 4, 2, 1)
BEZIER_SAMPLES = 1000  # points on the intensity curve; the mapping interpolates between them
INPAINT_MARGIN = 3  # [code] in-painted blocks keep this many pixels from the view border
FLAT_RANGE = 1e-6  # a crop or slice with a smaller intensity range counts as constant


@dataclass(frozen=True)
class DenseConfig:
    view_size: int = 128  # [code] 128 x 128 (x 32 in 3D); our choice: square crops, a multiple of 16
    pairs: int = 1024  # [code] pixel pairs per view pair, at most
    # [code] 10 view pairs per step (drawn from one volume there; independent slices here, module doc)
    batch_size: int = 10
    temperature: float = 0.1  # [code] tau of the InfoNCE
    restoration_weight: float = 10.0  # [code] L = L_NCE + 10 L_rest
    scale_channels: int = 32  # [code] per-level 1x1 conv width; the MLP is 5 x 32 = 160 wide
    embedding_dim: int = 128  # [code]
    # Our choice: trainable per-level convs (paper intent); True keeps them at their random init as the
    # released code does (it never registers them).
    freeze_scale_projections: bool = False
    body_threshold: float = 0.05  # our choice: fraction of the slice's [min, max] range (see module doc)
    shuffle_rate: float = 0.8  # [code] local pixel shuffling probability
    shuffle_blocks: int = 250  # our choice: the [code]'s 5000 3D blocks scaled to 2D (module doc)
    shuffle_block_divisor: int = 20  # [code] block side = view side // 20
    bezier_rate: float = 0.9  # [code] non-linear Bezier intensity mapping probability
    # [code] in-painting always runs (the released code ignores its rate); our choice: configurable.
    inpaint_rate: float = 1.0
    inpaint_max_blocks: int = 30  # [code]
    inpaint_continue: float = 0.95  # [code] each block, the first included, is added with this chance
    # [code] Adam 3e-4 at a constant rate, gradient clipping at norm 1.0, no weight decay.
    optimiser: OptimiserSettings = field(
        default_factory=lambda: OptimiserSettings("adam", 3e-4, schedule="constant", gradient_clip=1.0)
    )

    def __post_init__(self) -> None:
        if self.view_size < 16 or self.view_size % 16:
            raise KafError(f"dense: view_size must be a positive multiple of 16, got {self.view_size}")
        if self.pairs < 1 or self.batch_size < 1 or self.temperature <= 0:
            raise KafError(
                f"dense: pairs ({self.pairs}), batch_size ({self.batch_size}) and temperature "
                f"({self.temperature}) must be > 0"
            )
        for name in ("shuffle_rate", "bezier_rate", "inpaint_rate", "inpaint_continue"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise KafError(f"dense: {name} must lie in [0, 1], got {getattr(self, name)}")


@dataclass
class DensePairs:
    """One item (the shapes below) or a batch of them (a leading batch dimension), always padded."""

    views: torch.Tensor  # [2, 1, S, S] augmented crops (view 1, view 2)
    targets: torch.Tensor  # [2, 1, S, S] the clean crops: the restoration targets
    pixels: torch.Tensor  # [2, P, 2] int64 (row, col) of pair k in view 1 and in view 2
    pair_mask: torch.Tensor  # [P] bool: the first K pairs are real, the rest padding
    origins: torch.Tensor  # [2, 2] int64 (x, y) of each crop's top-left pixel in the source slice
    source: torch.Tensor  # [2] int64 (volume index, slice index)
    keypoints: torch.Tensor | None = None  # [2, N, 2] int64 (row, col) per view, KAF backbones only
    keypoint_mask: torch.Tensor | None = None  # [2, N] bool

    @classmethod
    def stack(cls, items: Sequence[DensePairs]) -> DensePairs:
        def stacked(name: str) -> torch.Tensor | None:
            values = [getattr(item, name) for item in items]
            return None if values[0] is None else torch.stack(values)

        return cls(**{f.name: stacked(f.name) for f in fields(cls)})


class DensePretraining(PretrainMethod):
    name: ClassVar[str] = "dense"
    config_class: ClassVar[type] = DenseConfig
    slices_per_item: ClassVar[int] = 1  # two views of one slice

    def build_heads(self, model: KafUNet) -> nn.ModuleDict:
        config = self.config
        channels = [model.bottleneck_channels, *model.decoder_channels]
        width = config.scale_channels * len(channels)
        return nn.ModuleDict(
            {
                "scale_projections": nn.ModuleList(
                    PointwiseProjection(c, config.scale_channels, not config.freeze_scale_projections)
                    for c in channels
                ),
                "embedding": embedding_mlp(width, config.embedding_dim),
                "restoration": nn.Conv2d(model.decoder_channels[-1], 1, 1),
            }
        )

    def make_batch(
        self, data: PretrainData, generators: Sequence[torch.Generator], stage: str, with_keypoints: bool
    ) -> DensePairs:
        batch = DensePairs.stack([self.make_item(data, g, with_keypoints) for g in generators])
        if with_keypoints:
            batch.keypoints, batch.keypoint_mask = drop_padding(batch.keypoints, batch.keypoint_mask)
        return batch

    def make_item(self, data: PretrainData, generator: torch.Generator, with_keypoints: bool) -> DensePairs:
        """Two shifted, locally augmented crops of one slice and their pixel pairs (module doc)."""
        config = self.config
        volume_index = data.random_volume(generator)
        slice_index = data.random_slice(volume_index, generator)
        volume = data.volumes[volume_index]
        source = volume.slice_tensor(slice_index)
        body = body_mask(source[0], config.body_threshold)
        anchor = random_pixel(body, generator)
        origins = [crop_origin(anchor, volume.slice_shape, config.view_size, generator) for _ in range(2)]
        size = (config.view_size, config.view_size)
        geometries = [crop_geometry(o, size[::-1], size) for o in origins]
        targets = torch.stack([crop(source, g) for g in geometries])
        body_in_first = warp(body[None].float(), geometries[0], mode="nearest")[0] > 0.5
        first, second = sample_pixel_pairs(*geometries, config.pairs, generator, body_in_first)
        pixels, pair_mask = pad_pairs(first, second, config.pairs)
        views = torch.stack([local_augmentations(t, config, generator) for t in targets])
        item = DensePairs(
            views=views,
            targets=targets,
            pixels=pixels,
            pair_mask=pair_mask,
            origins=torch.tensor(origins, dtype=torch.int64),
            source=torch.tensor([volume_index, slice_index], dtype=torch.int64),
        )
        if with_keypoints:
            item.keypoints, item.keypoint_mask = crop_keypoints(volume, slice_index, geometries)
        return item

    def loss(
        self, model: KafUNet, heads: nn.ModuleDict, batch: DensePairs, stage: str, comm: Communicator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_NCE + 10 L_rest; both are per-item terms over the local items (no cross-rank term)."""
        config = self.config
        keypoints = None if batch.keypoints is None else batch.keypoints.flatten(0, 1)
        keypoint_mask = None if batch.keypoint_mask is None else batch.keypoint_mask.flatten(0, 1)
        output = model(batch.views.flatten(0, 1), keypoints, keypoint_mask)
        levels = [output.bottleneck, *output.decoder]
        # Views are ordered item by item: item b's view 1 is row 2b, its view 2 row 2b + 1.
        view_mask = batch.pair_mask[:, None].expand(-1, 2, -1).flatten(0, 1)
        embeddings = pixel_embeddings(heads, levels, batch.pixels.flatten(0, 1), view_mask)
        nce = torch.stack(
            [
                pair_nce(embeddings[2 * b][mask], embeddings[2 * b + 1][mask], config.temperature)
                for b, mask in enumerate(batch.pair_mask)
            ]
        ).mean()
        restored = heads["restoration"](output.decoder[-1]).float()
        restoration = config.restoration_weight * F.mse_loss(restored, batch.targets.flatten(0, 1))
        return nce + restoration, {"nce": nce.detach(), "restoration": restoration.detach()}

    def trainable_groups(self, stage: str) -> tuple[str, ...]:
        return ("encoder", "bottleneck", "decoder.0", "decoder.1", "decoder.2", "decoder.3")

    def transfer_groups(self) -> tuple[str, ...]:
        """The whole FPN in the paper: here the whole UNet except its segmentation head."""
        return self.trainable_groups("pretrain")


# --- views ------------------------------------------------------------------------------------------------


def body_mask(image: torch.Tensor, threshold: float) -> torch.Tensor:
    """[H, W] bool: intensity above `threshold` of the slice's [min, max] range; all pixels when that
    leaves none (or the slice is constant)."""
    low, high = image.min(), image.max()
    if high - low < FLAT_RANGE:
        return torch.ones_like(image, dtype=torch.bool)
    mask = (image - low) / (high - low) > threshold
    return mask if mask.any() else torch.ones_like(mask)


def random_pixel(mask: torch.Tensor, generator: torch.Generator) -> tuple[int, int]:
    """(x, y) of a uniformly drawn True pixel of `mask` [H, W]."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    pick = int(torch.randint(0, len(rows), (1,), generator=generator))
    return int(cols[pick]), int(rows[pick])


def crop_origin(
    anchor_xy: tuple[int, int], slice_hw: tuple[int, int], size: int, generator: torch.Generator
) -> tuple[int, int]:
    """(x, y) integer origin of a `size` crop that contains the anchor, uniform over the origins that
    keep the crop inside the slice (or, along a side shorter than `size`, the slice inside the crop)."""
    origin = []
    for anchor, length in zip(anchor_xy, slice_hw[::-1], strict=True):
        low = max(anchor - size + 1, min(0, length - size))
        high = min(anchor, max(0, length - size))
        origin.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    return origin[0], origin[1]


def crop(source: torch.Tensor, geometry: ViewGeometry) -> torch.Tensor:
    """The view [1, S, S] of an integer-shift geometry: exact source pixels, the slice minimum outside."""
    low = source.min()
    return warp(source - low, geometry, mode="nearest") + low


def pad_pairs(first: torch.Tensor, second: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, 2] pixel pairs of each view -> [2, count, 2] padded with zeros, and the [count] mask."""
    pixels = torch.zeros(2, count, 2, dtype=torch.int64)
    pixels[0, : len(first)] = first
    pixels[1, : len(second)] = second
    mask = torch.zeros(count, dtype=torch.bool)
    mask[: len(first)] = True
    return pixels, mask


def crop_keypoints(
    volume: UnlabeledVolume, slice_index: int, geometries: Sequence[ViewGeometry]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slice's SIFT keypoints transported into each view, padded to the volume's keypoint cap."""
    coords = volume.keypoints(slice_index).coords
    per_view = [view_keypoints(coords, volume.slice_shape, g, volume.max_keypoints)[:2] for g in geometries]
    return torch.stack([p for p, _ in per_view]), torch.stack([m for _, m in per_view])


# --- local appearance augmentations (Models Genesis style, D.2) ---------------------------------------------


def local_augmentations(clean: torch.Tensor, config: DenseConfig, generator: torch.Generator) -> torch.Tensor:
    """The augmented view [1, S, S] of a clean crop: local shuffling, Bezier mapping, in-painting, each
    with its probability, in this order [code]. `clean` is left untouched."""
    image = clean[0]
    low, high = float(image.min()), float(image.max())
    if _chance(config.shuffle_rate, generator):
        block = max(1, image.shape[0] // config.shuffle_block_divisor)
        image = local_pixel_shuffle(image, config.shuffle_blocks, block, generator)
    if _chance(config.bezier_rate, generator):
        image = bezier_intensity_mapping(image, generator)
    if _chance(config.inpaint_rate, generator):
        image = in_paint(image, config.inpaint_max_blocks, config.inpaint_continue, (low, high), generator)
    return image[None]


def _chance(probability: float, generator: torch.Generator) -> bool:
    return float(torch.rand((), generator=generator)) < probability


def local_pixel_shuffle(
    image: torch.Tensor, blocks: int, block: int, generator: torch.Generator
) -> torch.Tensor:
    """`blocks` random `block` x `block` windows, each filled with its own pixels of `image` permuted.
    As in the reference, windows read the unshuffled image and later windows overwrite earlier ones;
    each window gets its own permutation (the reference shares one across windows)."""
    height, width = image.shape
    rows = torch.randint(0, height - block + 1, (blocks, 1), generator=generator)
    cols = torch.randint(0, width - block + 1, (blocks, 1), generator=generator)
    offsets = torch.arange(block)
    within = (offsets[:, None] * width + offsets[None, :]).flatten()  # [block^2] flat window offsets
    targets = rows * width + cols + within  # [blocks, block^2]
    order = torch.rand(targets.shape, generator=generator).argsort(dim=1)
    sources = targets.gather(1, order)
    # The last window that writes a pixel decides it, without a Python loop over windows.
    last_writer = torch.full((height * width,), -1, dtype=torch.int64)
    last_writer.scatter_reduce_(0, targets.flatten(), torch.arange(targets.numel()), reduce="amax")
    written = last_writer >= 0
    flat = image.flatten()
    shuffled = flat.clone()
    shuffled[written] = flat[sources.flatten()[last_writer[written]]]
    return shuffled.view(height, width)


def bezier_intensity_mapping(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A monotone non-linear intensity curve: a cubic Bezier from (0, 0) to (1, 1) with two random
    control points, its x and y samples sorted [code], applied to the image rescaled to [0, 1] by its
    min and max and mapped back, so the range is kept."""
    low, high = image.min(), image.max()
    if high - low < FLAT_RANGE:
        return image
    controls = torch.cat([torch.zeros(1, 2), torch.rand(2, 2, generator=generator), torch.ones(1, 2)])
    t = torch.linspace(0.0, 1.0, BEZIER_SAMPLES)[:, None]
    bernstein = torch.cat([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], dim=1)
    curve = bernstein @ controls  # [samples, 2]
    xs, ys = curve[:, 0].sort().values, curve[:, 1].sort().values
    unit = ((image - low) / (high - low)).clamp(0, 1)
    return low + (high - low) * interpolate(unit, xs, ys)


def interpolate(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear y(x) through the points (xs, ys), xs ascending and spanning x."""
    right = torch.searchsorted(xs, x.flatten()).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[right - 1], xs[right], ys[right - 1], ys[right]
    weight = ((x.flatten() - x0) / (x1 - x0).clamp(min=1e-12)).clamp(0, 1)
    return (y0 + weight * (y1 - y0)).view_as(x)


def in_paint(
    image: torch.Tensor,
    max_blocks: int,
    continue_probability: float,
    noise_range: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """Up to `max_blocks` blocks with sides in [side/10, side/5), each added while a draw with
    `continue_probability` succeeds, filled with uniform noise over `noise_range` (the clean crop's)."""
    painted = image.clone()
    height, width = image.shape
    low, high = noise_range
    for _ in range(max_blocks):
        if not _chance(continue_probability, generator):
            break
        block_h, block_w = (
            _randint(side // 10, max(side // 5, side // 10 + 1), generator) for side in (height, width)
        )
        top = _randint(INPAINT_MARGIN, height - block_h - INPAINT_MARGIN, generator)
        left = _randint(INPAINT_MARGIN, width - block_w - INPAINT_MARGIN, generator)
        noise = torch.rand(block_h, block_w, generator=generator)
        painted[top : top + block_h, left : left + block_w] = low + (high - low) * noise
    return painted


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=generator))


# --- embedding and loss ------------------------------------------------------------------------------------


class PointwiseProjection(nn.Module):
    """A 1x1 conv evaluated at sampled pixels only (it is pointwise, so it commutes with reading the
    pixels: a Linear on their feature vectors, with nn.Conv2d's init). When not trainable, the weights
    are buffers at their random init, which nothing can train (the released code's behaviour)."""

    def __init__(self, in_channels: int, out_channels: int, trainable: bool) -> None:
        super().__init__()
        init = nn.Linear(in_channels, out_channels)
        if trainable:
            self.weight, self.bias = init.weight, init.bias
        else:
            self.register_buffer("weight", init.weight.detach().clone())
            self.register_buffer("bias", init.bias.detach().clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)


def embedding_mlp(width: int, out_dim: int) -> nn.Sequential:
    """[code] width -> width -> width -> out_dim: Linear-BN-ReLU twice, then Linear."""
    return nn.Sequential(
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, out_dim),
    )


def read_levels(levels: Sequence[torch.Tensor], pixels: torch.Tensor) -> list[torch.Tensor]:
    """Level i [V, C_i, S / s_i, S / s_i] read at floor(pixel / s_i), s = LEVEL_STRIDES, for pixels
    [V, P, 2] (row, col) of a full-resolution view: [V, P, C_i] per level."""
    read = []
    for features, stride in zip(levels, LEVEL_STRIDES, strict=True):
        width = features.shape[-1]
        index = (pixels[..., 0] // stride) * width + pixels[..., 1] // stride  # [V, P]
        flat = features.flatten(2)  # [V, C, h * w]
        gathered = flat.gather(2, index[:, None, :].expand(-1, flat.shape[1], -1))
        read.append(gathered.transpose(1, 2))
    return read


def pixel_embeddings(
    heads: nn.ModuleDict, levels: Sequence[torch.Tensor], pixels: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The hierarchically balanced embedding (D.3) of pixels [V, P, 2] (row, col): each level through
    its own 1x1 conv to 32 channels, concatenated, MLP, L2-normalised. [V, P, D], zero where `mask`
    [V, P] is False; the MLP's BatchNorm sees the real pixels only."""
    read = read_levels(levels, pixels)
    projected = [
        projection(r.float()) for projection, r in zip(heads["scale_projections"], read, strict=True)
    ]
    concatenated = torch.cat(projected, dim=-1)
    embedded = F.normalize(heads["embedding"](concatenated[mask]), dim=1)
    out = embedded.new_zeros(*mask.shape, embedded.shape[1])
    out[mask] = embedded
    return out


def pair_nce(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """D.4's L_NCE = (L_1->2 + L_2->1) / 2 for embeddings [K, D] of the K paired pixels in each view:
    anchor k of one view, its partner k of the other as the positive, and every other pixel of both
    views (the partner included) in the denominator."""
    count = len(first)
    embeddings = torch.cat([first, second]).float()
    logits = embeddings @ embeddings.T / temperature
    partner = torch.arange(2 * count, device=logits.device).roll(count)
    positives = torch.zeros_like(logits, dtype=torch.bool)
    positives[torch.arange(2 * count, device=logits.device), partner] = True
    return info_nce(logits, positives, not_self(2 * count, logits.device))
