"""GCL: global and local contrastive pretraining (METHODS.md B; Chaitanya et al. 2020).

Stage "global" trains the encoder and bottleneck with the head g1 on cropped, intensity-augmented views.
A volume's slices are cut into S = 4 contiguous partitions along the slice axis; slices of the same
partition show similar anatomy across volumes, so G^D takes them as positives and every other partition's
images as negatives (G^D- keeps only the views of the same slice as positives; G^R is SimCLR-like).

Stage "local" freezes the encoder and trains the first decoder blocks with the head g2 to tell 13 fixed
3 x 3 regions of the 1/4-resolution decoder map apart between two intensity-only views of a slice (L^R),
or, with L^D, to also match the same region of same-partition slices of other volumes. With identical
geometry in both views a zero-padded CNN solves that by position alone (BENCHMARKS.md, "GCL's local term
reads 0.000"); `local_shift` (our choice) translates each view by whole cells of that map, so a region's
windows sit at different places in its two views and only their content can match them.

Decoder depth: the paper's decoder has five blocks and transfers the first l = 3, whose output is at 1/4
of the input resolution. Our 4-level UNet reaches 1/4 resolution after two blocks (decoder.0 at 1/8,
decoder.1 at 1/4), so l = 2 here: the same feature resolution and the same regions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kaf.data.keypoints import drop_padding
from kaf.models import KafOutput, KafUNet
from kaf.runtime.errors import KafError
from kaf.ssl.base import Communicator, OptimiserSettings, PretrainMethod
from kaf.ssl.data import PretrainData, UnlabeledVolume
from kaf.ssl.losses import info_nce, not_self
from kaf.ssl.views import ViewGeometry, crop_geometry, view_keypoints, warp

GLOBAL_STRATEGIES = ("gd", "gd-", "gr")
LOCAL_STRATEGIES = ("lr", "ld")
LOCAL_BLOCKS = 2  # decoder blocks up to the 1/4-resolution map (the paper's l = 3 of five blocks)
LOCAL_GROUPS = tuple(f"decoder.{block}" for block in range(LOCAL_BLOCKS))
LOCAL_STRIDE = 4  # view pixels per cell of the decoder.1 map (1/4 resolution)
REGION_SIZE = 3  # [code] 3 x 3 windows (local_reg_size = 1)
REGION_MARGIN = 4  # [code] W' = W/4 - 4: the grid of window corners stays clear of the border
SETS = 2  # our choice, faithful to the paper: two disjoint sets of volumes per group (METHODS.md B.2)
# Which views each slice gets in the global stage: False = the original slice, True = a crop with intensity
# augmentation. G^D: x and x̂ (METHODS.md B.2 batch); G^D-: x, x̃, x̂ [code]; G^R: x̃, x̂ [paper].
GLOBAL_VIEWS = {"gd": (False, True), "gd-": (False, True, True), "gr": (True, True)}
LOCAL_VIEWS = 2  # two intensity-only views of the uncropped slice [paper]


def _adam() -> OptimiserSettings:
    return OptimiserSettings(kind="adam", learning_rate=1e-3, schedule="constant")  # [code]


@dataclass(frozen=True)
class GclConfig:
    strategy: str = "gd"  # [paper] global stage: "gd" (G^D, proposed), "gd-" (G^D-) or "gr" (G^R)
    local_strategy: str = "lr"  # [paper] local stage: "lr" (L^R, proposed) or "ld" (L^D)
    temperature: float = 0.1  # [paper]
    partitions: int = 4  # [paper] S
    volumes_per_set: int = 3  # [code] m
    view_size: int = 128  # our choice (the paper's slices are 192 or 160 px); a multiple of 16
    # [code] a 100 x 100 crop of a 192 x 192 slice with its top-left corner in [10, 70)^2, as fractions of
    # the slice's square frame so that they hold at any size.
    crop_fraction: float = 100 / 192
    crop_corner_range: tuple[float, float] = (10 / 192, 70 / 192)
    # [code] intensities, drawn per image (our choice; the code draws once per batch). The paper's slices are
    # min-max normalised between their volume's 1st and 99th percentiles, ours are z-scored, so brightness
    # and the clip are in units of the source slice's p1-p99 range (our choice): the clip to [0, 1.5]
    # becomes [p1, p1 + 1.5 (p99 - p1)].
    brightness: float = 0.3
    contrast_range: tuple[float, float] = (0.7, 1.3)
    clip_high: float = 1.5
    g1_widths: tuple[int, int] = (1024, 128)  # [code] dense layers on the flattened bottleneck, no biases
    region_dim: int = 128  # [code] g2's embedding of a 3 x 3 window
    local_negatives: int = 5  # [code] neighbouring regions per region (L^R)
    local_negatives_ld: int = 4  # [code] reduced for memory (L^D)
    # Largest translation of each local view, as a fraction of the view side, taken in whole map cells.
    # [paper] 0: identity correspondence, which position alone solves; gcl-shifted: 0.25.
    local_shift: float = 0.0
    optimiser: OptimiserSettings = field(default_factory=_adam)

    def __post_init__(self) -> None:
        if self.strategy not in GLOBAL_STRATEGIES:
            raise KafError(f"GCL strategy must be one of {GLOBAL_STRATEGIES}, got '{self.strategy}'")
        if self.local_strategy not in LOCAL_STRATEGIES:
            raise KafError(
                f"GCL local strategy must be one of {LOCAL_STRATEGIES}, got '{self.local_strategy}'"
            )
        if self.view_size % 16 or self.view_size < 32:
            raise KafError(f"GCL view_size must be a multiple of 16 and at least 32, got {self.view_size}")
        if self.partitions < 1 or self.volumes_per_set < 1:
            raise KafError("GCL needs at least one partition and one volume per set")
        if not 0 <= self.local_shift <= 0.25:
            raise KafError(f"GCL local_shift must be between 0 and 0.25 of the view, got {self.local_shift}")
        corners = region_corners(self.view_size // LOCAL_STRIDE, self.local_shift_cells)
        if len(set(corners)) < len(corners):
            raise KafError(
                f"GCL local_shift {self.local_shift} leaves no room for 13 distinct regions on a "
                f"{self.view_size} px view: use a smaller shift or a larger view"
            )

    @property
    def local_shift_cells(self) -> int:
        """m: each local view moves by up to m map cells along each axis."""
        return int(self.local_shift * self.view_size / LOCAL_STRIDE)


@dataclass(frozen=True)
class GclShiftedConfig(GclConfig):
    """GCL with translated local views (our choice, BENCHMARKS.md "GCL's local term with translated views"):
    `--method gcl-shifted`. At a quarter of the view, position alone no longer finds a region's other
    window (blank images stay at chance); at an eighth it still half does."""

    local_shift: float = 0.25


@dataclass
class GclBatch:
    """N slices with V views each; slices of one item are contiguous and items have equal sizes."""

    images: torch.Tensor  # [N, V, 1, s, s]
    volumes: torch.Tensor  # [N] int64: index of the slice's volume in the data
    slices: torch.Tensor  # [N] int64: slice index within the volume
    partitions: torch.Tensor  # [N] int64: floor(slice * S / slice count)
    offsets: torch.Tensor  # [N, V, 2] int64: (row, col) map cells each view is translated by (local views)
    keypoints: torch.Tensor | None = None  # [N, V, K, 2] (row, col) int64, KAF backbones only
    keypoint_mask: torch.Tensor | None = None  # [N, V, K] bool


# --- sampling -----------------------------------------------------------------------------------------------


def partition_of(index: int, slice_count: int, partitions: int) -> int:
    return index * partitions // slice_count


def partition_slice(slice_count: int, partition: int, partitions: int, generator: torch.Generator) -> int:
    """A random slice k with floor(k * S / slice_count) = partition. A volume with fewer slices than
    partitions has empty partitions: the first slice at or after the partition's start stands in (its own
    partition index is reported with it, so labels stay true)."""
    low = -(-partition * slice_count // partitions)
    high = -(-(partition + 1) * slice_count // partitions)
    offset = int(torch.randint(max(high - low, 1), (1,), generator=generator))
    return min(low + offset, slice_count - 1)


def spread_volumes(count: int, volume_count: int, generator: torch.Generator) -> list[int]:
    """`count` volumes, distinct when the data has enough, otherwise each repeated as evenly as possible."""
    draws = [torch.randperm(volume_count, generator=generator) for _ in range(-(-count // volume_count))]
    return torch.cat(draws)[:count].tolist()


def group_volumes(sets: int, per_set: int, volume_count: int, generator: torch.Generator) -> list[list[int]]:
    """Volumes of one group: `sets` disjoint sets of `per_set` distinct volumes. With fewer volumes than
    sets x per_set the sets cannot be disjoint, so each set is drawn on its own (volumes repeat across
    sets), still distinct within a set while the data has per_set volumes."""
    if volume_count >= sets * per_set:
        chosen = torch.randperm(volume_count, generator=generator)[: sets * per_set].tolist()
        return [chosen[i * per_set : (i + 1) * per_set] for i in range(sets)]
    return [spread_volumes(per_set, volume_count, generator) for _ in range(sets)]


# --- views --------------------------------------------------------------------------------------------------


def frame_origin(volume: UnlabeledVolume) -> tuple[tuple[float, float], float]:
    """The slice's square frame (side = the longer side, centred, the short side padded): its top-left
    corner (x, y) in source edge coordinates and its side. The paper pads/crops slices to a square too."""
    height, width = volume.slice_shape
    side = float(max(height, width))
    return ((width - side) / 2, (height - side) / 2), side


def frame_geometry(volume: UnlabeledVolume, size: int, offset: tuple[int, int] = (0, 0)) -> ViewGeometry:
    """The slice's square frame at `size` px, translated by `offset` (row, col) map cells: view map cell p
    shows frame cell p + offset. Outside the slice is padding, as in the global crops."""
    (x0, y0), side = frame_origin(volume)
    cell = LOCAL_STRIDE * side / size  # source pixels per map cell
    return crop_geometry((x0 + offset[1] * cell, y0 + offset[0] * cell), (side, side), (size, size))


def random_offset(cells: int, generator: torch.Generator) -> tuple[int, int]:
    """A translation uniform in [-cells, cells]^2 map cells; no draw at all when cells = 0, so that the
    paper's setting keeps its random stream."""
    if cells == 0:
        return (0, 0)
    row, col = torch.randint(-cells, cells + 1, (2,), generator=generator).tolist()
    return (row, col)


def random_crop_geometry(
    volume: UnlabeledVolume, config: GclConfig, generator: torch.Generator
) -> ViewGeometry:
    (x0, y0), side = frame_origin(volume)
    low, high = config.crop_corner_range
    corner = low + (high - low) * torch.rand(2, generator=generator, dtype=torch.float64)
    crop = config.crop_fraction * side
    origin = (x0 + float(corner[0]) * side, y0 + float(corner[1]) * side)
    return crop_geometry(origin, (crop, crop), (config.view_size, config.view_size))


def adjust_intensity(
    image: torch.Tensor, low: float, span: float, config: GclConfig, generator: torch.Generator
) -> torch.Tensor:
    """Random brightness, then contrast about the image mean, then clip, as TF's image ops do [code]."""
    delta = (2 * torch.rand(1, generator=generator) - 1) * config.brightness * span
    first, last = config.contrast_range
    factor = first + (last - first) * torch.rand(1, generator=generator)
    image = image + delta
    mean = image.mean()
    return ((image - mean) * factor + mean).clamp(low, low + config.clip_high * span)


@dataclass
class _View:
    image: torch.Tensor  # [1, s, s]
    keypoints: torch.Tensor | None
    keypoint_mask: torch.Tensor | None
    offset: torch.Tensor  # [2] int64 map cells (shifted local views; zero otherwise)


@dataclass
class _Slot:
    volume: int
    index: int  # slice index
    partition: int
    views: list[_View]


def render_view(
    volume: UnlabeledVolume,
    index: int,
    geometry: ViewGeometry,
    augment: bool,
    config: GclConfig,
    generator: torch.Generator,
    with_keypoints: bool,
    offset: tuple[int, int] = (0, 0),
) -> _View:
    """`offset`: the map cells `geometry` translates the frame by (recorded for the local regions)."""
    source = volume.slice_tensor(index)
    low, high = torch.quantile(source, torch.tensor([0.01, 0.99])).tolist()
    # Padding outside the slice takes its 1st percentile, the paper's zero after min-max normalisation.
    image = warp(source - low, geometry) + low
    if augment:
        image = adjust_intensity(image, low, high - low, config, generator)
    offset = torch.tensor(offset, dtype=torch.long)
    if not with_keypoints:
        return _View(image, None, None, offset)
    coords = volume.keypoints(index).coords
    keypoints, mask, _ = view_keypoints(coords, volume.slice_shape, geometry, volume.max_keypoints)
    return _View(image, keypoints, mask, offset)


# --- masks and losses ---------------------------------------------------------------------------------------


def global_masks(
    volumes: torch.Tensor, partitions: torch.Tensor, views: int, strategy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives and candidates [A, A] over A images laid out slice-major (image a shows slice a // views);
    `volumes`, `partitions` [A] per image (METHODS.md B.2 tables).

    - G^R: positives = the other views of the same slice; negatives = every other image.
    - G^D-: positives = the other views of the same slice; negatives = images of other partitions.
    - G^D: G^D- positives plus every image of a same-partition slice of another volume; negatives as G^D-.
    Same-partition images that are not positives (G^D-: all of them; G^D: those of the anchor's volume)
    stay out of the denominator: the tables never make a same-partition image a negative.
    """
    count = len(volumes)
    slot = torch.arange(count, device=volumes.device) // views
    others = not_self(count, volumes.device)
    positives = (slot[:, None] == slot[None]) & others
    if strategy == "gr":
        return positives, others
    same_partition = partitions[:, None] == partitions[None]
    if strategy == "gd":
        positives |= same_partition & (volumes[:, None] != volumes[None])
    return positives, positives | ~same_partition


def global_loss(
    anchors: torch.Tensor,
    everything: torch.Tensor,
    first_anchor: int,
    volumes: torch.Tensor,
    partitions: torch.Tensor,
    views: int,
    strategy: str,
    temperature: float,
) -> torch.Tensor:
    """Pairwise NCE [paper] of the anchors (rows [first_anchor, first_anchor + len(anchors)) of the
    gathered batch) against every image of it; embeddings are L2-normalised here (cosine similarity).
    Each positive pair's denominator holds that pair and the anchor's negatives, never its other positives."""
    anchors = F.normalize(anchors.float(), dim=1)
    everything = F.normalize(everything.float(), dim=1)
    positives, candidates = global_masks(volumes, partitions, views, strategy)
    rows = slice(first_anchor, first_anchor + len(anchors))
    logits = anchors @ everything.T / temperature
    return info_nce(logits, positives[rows], candidates[rows], pairwise=True)


def region_corners(map_side: int, margin: int = 0) -> list[tuple[int, int]]:
    """The 13 top-left corners (row, col) of the 3 x 3 regions on a map_side^2 map [code]: with
    W' = map_side - 4, the grid {0, W'/2, W'}^2 (corners, edge midpoints, centre), then {W'/4, 3W'/4}^2.
    With `margin` m the grid is that of the inner (map_side - 2m)^2 map, moved by m: windows that stay in
    view under any translation of up to m cells."""
    last = map_side - 2 * margin - REGION_MARGIN
    grid = [margin, margin + last // 2, margin + last]
    quarters = [margin + last // 4, margin + 3 * last // 4]
    return [(r, c) for r in grid for c in grid] + [(r, c) for r in quarters for c in quarters]


def nearest_regions(corners: Sequence[tuple[int, int]], count: int) -> torch.Tensor:
    """[R, count]: each region's `count` nearest other regions by centre distance, ties to the lower index.
    Our choice: the fallback of METHODS.md B.3 for the released hand-picked 13 x 5 table."""
    points = torch.tensor(corners, dtype=torch.float64)
    distance = torch.cdist(points, points)
    distance.fill_diagonal_(float("inf"))
    order = torch.sort(distance, dim=1, stable=True).indices
    return order[:, :count]


def local_masks(
    volumes: torch.Tensor,
    partitions: torch.Tensor,
    views: int,
    neighbours: torch.Tensor,
    across_volumes: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives and candidates [I, E, E] for I items of n slices (volumes, partitions [I, n]); an item's
    E = n x views x R region embeddings are ordered (slice, view, region).

    Positives: the same region in the slice's other views; with `across_volumes` (L^D) also the same region
    in every view of same-partition slices of other volumes. Negatives: the anchor's neighbouring regions
    (`neighbours` [R, k]) in every view of its own slice [code].
    """
    items, n = volumes.shape
    regions = len(neighbours)
    device = volumes.device
    slot = torch.arange(n, device=device).repeat_interleave(views * regions)
    view = torch.arange(views, device=device).repeat_interleave(regions).repeat(n)
    region = torch.arange(regions, device=device).repeat(n * views)
    near = torch.zeros(regions, regions, dtype=torch.bool, device=device)
    near[torch.arange(regions, device=device)[:, None], neighbours.to(device)] = True
    same_slot = slot[:, None] == slot[None]
    same_region = region[:, None] == region[None]
    positives = (same_slot & same_region & (view[:, None] != view[None])).expand(items, -1, -1)
    negatives = same_slot & near[region][:, region]
    if across_volumes:
        volume, partition = volumes[:, slot], partitions[:, slot]  # [I, E]
        other_volume = (partition[:, :, None] == partition[:, None]) & (volume[:, :, None] != volume[:, None])
        positives = positives | (other_volume & same_region)
    return positives, positives | negatives


def local_loss(
    embeddings: torch.Tensor, positives: torch.Tensor, candidates: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Pairwise NCE over each item's region embeddings [I, E, D] with masks [I, E, E]; both views act as
    anchors (the code's symmetrised form), averaged over anchors."""
    embeddings = F.normalize(embeddings.float(), dim=2)
    logits = embeddings @ embeddings.transpose(1, 2) / temperature
    size = logits.shape[-1]
    return info_nce(
        logits.reshape(-1, size), positives.reshape(-1, size), candidates.reshape(-1, size), pairwise=True
    )


# --- heads --------------------------------------------------------------------------------------------------


class RegionHead(nn.Module):
    """g2 [code]: 1x1 conv + BN + ReLU, a linear 1x1 conv (channels unchanged), then each 3 x 3 window
    flattened and embedded by one shared bias-free dense layer."""

    def __init__(self, channels: int, region_dim: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(channels, channels, 1),
            nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01),  # [code] TF momentum 0.99
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )
        self.embed = nn.Linear(channels * REGION_SIZE**2, region_dim, bias=False)

    def forward(self, features: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        """features [B, C, h, w], each image's window corners [B, R, 2] (row, col) -> region embeddings
        [B, R, region_dim]; a window is flattened channel-major (C, 3, 3)."""
        mapped = self.convs(features).permute(0, 2, 3, 1)  # [B, h, w, C]
        steps = torch.arange(REGION_SIZE, device=corners.device)
        rows = corners[..., 0, None, None] + steps[:, None]  # [B, R, 3, 1]
        cols = corners[..., 1, None, None] + steps[None, :]  # [B, R, 1, 3]
        images = torch.arange(len(corners), device=corners.device)[:, None, None, None]
        windows = mapped[images, rows, cols]  # [B, R, 3, 3, C]
        return self.embed(windows.permute(0, 1, 4, 2, 3).flatten(2))


# --- the method ---------------------------------------------------------------------------------------------


class GclPretraining(PretrainMethod):
    """Global then local contrastive pretraining. A global batch item is one group: 2 sets x m volumes x
    S partitions, one slice each, with its views; a local item is one slice with two intensity views
    (L^R) or a group of m volumes x S partitions (L^D)."""

    name = "gcl"
    config_class = GclConfig
    stages = ("global", "local")
    slices_per_item = SETS * 3 * 4  # slices of one global item at the default m = 3, S = 4

    config: GclConfig

    def batch_size(self, stage: str) -> int:
        """[code] one group (48 images) per global step; 10 slices per L^R step, one group per L^D step."""
        self._check_stage(stage)
        return 10 if stage == "local" and self.config.local_strategy == "lr" else 1

    def build_heads(self, model: KafUNet) -> nn.ModuleDict:
        """g1 on the flattened bottleneck of a view_size view [code], built for that size; g2 on the
        decoder.1 output."""
        side = self.config.view_size // 16
        hidden, out = self.config.g1_widths
        g1 = nn.Sequential(
            nn.Flatten(),
            nn.Linear(model.bottleneck_channels * side * side, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, out, bias=False),
        )
        g2 = RegionHead(model.decoder_channels[LOCAL_BLOCKS - 1], self.config.region_dim)
        return nn.ModuleDict({"g1": g1, "g2": g2})

    def make_batch(
        self, data: PretrainData, generators: Sequence[torch.Generator], stage: str, with_keypoints: bool
    ) -> GclBatch:
        self._check_stage(stage)
        items = [self._item(data, generator, stage, with_keypoints) for generator in generators]
        slots = [slot for item in items for slot in item]

        def stacked(attribute: str) -> torch.Tensor:
            return torch.stack([torch.stack([getattr(v, attribute) for v in slot.views]) for slot in slots])

        batch = GclBatch(
            images=stacked("image"),
            volumes=torch.tensor([slot.volume for slot in slots]),
            slices=torch.tensor([slot.index for slot in slots]),
            partitions=torch.tensor([slot.partition for slot in slots]),
            offsets=stacked("offset"),
        )
        if with_keypoints:
            keypoints, mask = stacked("keypoints"), stacked("keypoint_mask")
            batch.keypoints, batch.keypoint_mask = drop_padding(keypoints, mask)
        return batch

    def loss(
        self, model: KafUNet, heads: nn.ModuleDict, batch: GclBatch, stage: str, comm: Communicator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check_stage(stage)
        value = (
            self._global_loss(model, heads, batch, comm)
            if stage == "global"
            else self._local_loss(model, heads, batch)
        )
        return value, {stage: value.detach()}

    def trainable_groups(self, stage: str) -> tuple[str, ...]:
        self._check_stage(stage)
        return ("encoder", "bottleneck") if stage == "global" else LOCAL_GROUPS

    def transfer_groups(self) -> tuple[str, ...]:
        return ("encoder", "bottleneck", *LOCAL_GROUPS)

    # --- helpers --------------------------------------------------------------------------------------------

    def _check_stage(self, stage: str) -> None:
        if stage not in self.stages:
            raise KafError(f"GCL has stages {self.stages}, got '{stage}'")

    def _global_loss(
        self, model: KafUNet, heads: nn.ModuleDict, batch: GclBatch, comm: Communicator
    ) -> torch.Tensor:
        """Anchors are this rank's images; positives and negatives come from every rank's images."""
        views = batch.images.shape[1]
        anchors = heads["g1"](self._encode(model, batch, decode_until=0).bottleneck)
        return global_loss(
            anchors,
            comm.gather(anchors),
            comm.rank * len(anchors),
            comm.gather_constant(batch.volumes).repeat_interleave(views),
            comm.gather_constant(batch.partitions).repeat_interleave(views),
            views,
            self.config.strategy,
            self.config.temperature,
        )

    def _local_loss(self, model: KafUNet, heads: nn.ModuleDict, batch: GclBatch) -> torch.Tensor:
        """Regions are compared within one item only, so the term stays on this rank."""
        config = self.config
        views = batch.images.shape[1]
        features = self._encode(model, batch, decode_until=LOCAL_BLOCKS).decoder[-1]
        # Regions sit at fixed cells q of the slice's frame; a view translated by o cells shows q at q - o.
        corners = region_corners(features.shape[-1], config.local_shift_cells)
        in_views = torch.tensor(corners, device=features.device) - batch.offsets.flatten(0, 1)[:, None]
        embeddings = heads["g2"](features, in_views)  # [N * V, R, D]
        per_item = self._local_slices_per_item()
        embeddings = embeddings.reshape(-1, per_item * views * len(corners), embeddings.shape[-1])
        negatives = config.local_negatives if config.local_strategy == "lr" else config.local_negatives_ld
        positives, candidates = local_masks(
            batch.volumes.reshape(-1, per_item),
            batch.partitions.reshape(-1, per_item),
            views,
            nearest_regions(corners, negatives),
            across_volumes=config.local_strategy == "ld",
        )
        return local_loss(embeddings, positives, candidates, config.temperature)

    def _local_slices_per_item(self) -> int:
        if self.config.local_strategy == "lr":
            return 1
        return self.config.volumes_per_set * self.config.partitions

    def _item(
        self, data: PretrainData, generator: torch.Generator, stage: str, with_keypoints: bool
    ) -> list[_Slot]:
        """Every slice of one item with its views, drawn from `generator` only."""
        flags = GLOBAL_VIEWS[self.config.strategy] if stage == "global" else (None,) * LOCAL_VIEWS
        slots = []
        for volume_index, index in self._picks(data, generator, stage):
            volume = data.volumes[volume_index]
            views = [self._view(volume, index, flag, generator, with_keypoints) for flag in flags]
            partition = partition_of(index, volume.slice_count, self.config.partitions)
            slots.append(_Slot(volume_index, index, partition, views))
        return slots

    def _picks(self, data: PretrainData, generator: torch.Generator, stage: str) -> list[tuple[int, int]]:
        """(volume, slice) of every slice of one item: one random slice (L^R), or one slice per partition
        of each volume of the group, volume-major (global stage: 2 sets; L^D: 1 set)."""
        config = self.config
        if stage == "local" and config.local_strategy == "lr":
            volume = data.random_volume(generator)
            return [(volume, data.random_slice(volume, generator))]
        sets = SETS if stage == "global" else 1
        groups = group_volumes(sets, config.volumes_per_set, len(data.volumes), generator)
        return [
            (volume, partition_slice(data.volumes[volume].slice_count, part, config.partitions, generator))
            for group in groups
            for volume in group
            for part in range(config.partitions)
        ]

    def _view(
        self,
        volume: UnlabeledVolume,
        index: int,
        cropped: bool | None,
        generator: torch.Generator,
        with_keypoints: bool,
    ) -> _View:
        """cropped: True = global augmented view, False = the original, None = a local view (intensity
        augmentation, translated by up to local_shift)."""
        config = self.config
        offset = random_offset(config.local_shift_cells, generator) if cropped is None else (0, 0)
        if cropped:
            geometry = random_crop_geometry(volume, config, generator)
        else:
            geometry = frame_geometry(volume, config.view_size, offset)
        augment = cropped is not False
        return render_view(volume, index, geometry, augment, config, generator, with_keypoints, offset)

    @staticmethod
    def _encode(model: KafUNet, batch: GclBatch, decode_until: int) -> KafOutput:
        images = batch.images.flatten(0, 1)
        if batch.keypoints is None:
            return model(images, decode_until=decode_until)
        return model(
            images,
            batch.keypoints.flatten(0, 1),
            batch.keypoint_mask.flatten(0, 1),
            decode_until=decode_until,
        )


class GclShiftedPretraining(GclPretraining):
    """GCL whose local views are translated, so that the local term must match regions by content."""

    name = "gcl-shifted"
    config_class = GclShiftedConfig
