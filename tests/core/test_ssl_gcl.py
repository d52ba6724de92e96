"""GCL (METHODS.md B): batch composition, G^D / G^D- / G^R masks, pairwise NCE, local regions, stages."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from kaf.runtime.errors import KafError
from kaf.ssl import make_method
from kaf.ssl.base import Communicator, item_generators
from kaf.ssl.data import volumes_from_arrays
from kaf.ssl.gcl import (
    GclConfig,
    GclPretraining,
    RegionHead,
    frame_origin,
    global_loss,
    global_masks,
    local_masks,
    nearest_regions,
    random_crop_geometry,
    region_corners,
)
from kaf.ssl.losses import info_nce, not_self
from tests.core.ssl_support import acdc_data, hippocampus_data, losses_over_steps, tiny_model


def synthetic_data(volumes: int, slice_counts: tuple[int, ...] = (9, 12, 7)):
    rng = np.random.default_rng(0)
    return volumes_from_arrays(
        [rng.normal(size=(slice_counts[i % len(slice_counts)], 40, 48)) for i in range(volumes)],
        max_keypoints=16,
    )


def gcl(**overrides) -> GclPretraining:
    return make_method("gcl", view_size=32, **overrides)


# --- batch composition ----------------------------------------------------------------------------------


def test_global_item_is_two_disjoint_sets_of_distinct_volumes_by_partition():
    data = synthetic_data(7)
    batch = gcl().make_batch(data, item_generators(0, 0, 0, 2), "global", with_keypoints=False)
    assert batch.images.shape == (2 * GclPretraining.slices_per_item, 2, 1, 32, 32)
    counts = torch.tensor([v.slice_count for v in data.volumes])[batch.volumes]
    assert torch.equal(batch.partitions, batch.slices * 4 // counts)
    for item in batch.volumes.reshape(2, 2, 3, 4):  # item, set, volume, partition
        assert (item == item[..., :1]).all()  # one volume per row of four partitions
        assert len(set(item[..., 0].flatten().tolist())) == 6  # 6 distinct volumes: disjoint sets
    assert (batch.partitions.reshape(-1, 4) == torch.arange(4)).all()


def test_few_volumes_repeat_across_sets_only():
    batch = gcl().make_batch(synthetic_data(4), item_generators(1, 0, 0, 2), "global", with_keypoints=False)
    for item in batch.volumes.reshape(2, 2, 3, 4):
        for volume_set in item[..., 0]:
            assert len(set(volume_set.tolist())) == 3


def test_items_depend_only_on_their_own_generator():
    method, data = gcl(), synthetic_data(7)
    together = method.make_batch(data, item_generators(5, 2, 0, 2), "global", with_keypoints=False)
    alone = method.make_batch(data, item_generators(5, 2, 1, 1), "global", with_keypoints=False)
    half = GclPretraining.slices_per_item
    assert torch.equal(together.images[half:], alone.images)
    assert torch.equal(together.volumes[half:], alone.volumes)


def test_views_original_and_crop_at_scaled_paper_fractions():
    data = synthetic_data(7)
    volume = data.volumes[0]
    (x0, y0), side = frame_origin(volume)
    config = GclConfig(view_size=32)
    for seed in range(20):
        geometry = random_crop_geometry(volume, config, torch.Generator().manual_seed(seed))
        corner = geometry.to_source @ torch.tensor([-0.5, -0.5, 1.0], dtype=torch.float64) + 0.5
        far = geometry.to_source @ torch.tensor([31.5, 31.5, 1.0], dtype=torch.float64) + 0.5
        offsets = (corner[:2] - torch.tensor([x0, y0], dtype=torch.float64)) / side
        assert ((offsets >= 10 / 192) & (offsets < 70 / 192)).all()
        assert torch.allclose((far - corner)[:2] / side, torch.full((2,), 100 / 192, dtype=torch.float64))
    # The original view (G^D's x) is the slice itself, un-augmented: exact for a square view-size slice.
    square = volumes_from_arrays([np.random.default_rng(1).normal(size=(8, 32, 32))] * 7)
    batch = gcl().make_batch(square, item_generators(0, 0, 0, 1), "global", with_keypoints=False)
    sources = torch.from_numpy(square.volumes[0].slices[batch.slices])
    assert torch.allclose(batch.images[:, 0, 0], sources, atol=1e-5)
    assert not torch.allclose(batch.images[:, 1, 0], sources, atol=1e-2)


# --- global masks and loss ------------------------------------------------------------------------------


def images_metadata(batch, views):
    return batch.volumes.repeat_interleave(views), batch.partitions.repeat_interleave(views)


def test_gd_positives_are_the_slice_views_and_same_partition_of_other_volumes():
    batch = gcl().make_batch(synthetic_data(4), item_generators(0, 0, 0, 2), "global", with_keypoints=False)
    volumes, partitions = images_metadata(batch, 2)
    positives, candidates = global_masks(volumes, partitions, 2, "gd")
    slot = torch.arange(len(volumes)) // 2
    same_slice = (slot[:, None] == slot[None]) & not_self(len(slot))
    same_partition = partitions[:, None] == partitions[None]
    other_volume = volumes[:, None] != volumes[None]
    assert torch.equal(positives, same_slice | (same_partition & other_volume))
    assert not (positives & ~same_partition).any()  # never another partition
    negatives = candidates & ~positives
    assert not (negatives & same_partition).any()
    assert torch.equal(negatives, ~same_partition)
    assert not candidates.diagonal().any()


def test_gd_minus_and_gr_masks():
    batch = gcl(strategy="gd-").make_batch(
        synthetic_data(7), item_generators(0, 0, 0, 1), "global", with_keypoints=False
    )
    assert batch.images.shape[1] == 3  # x, x~, x^
    volumes, partitions = images_metadata(batch, 3)
    same_partition = partitions[:, None] == partitions[None]
    slot = torch.arange(len(volumes)) // 3
    same_slice = (slot[:, None] == slot[None]) & not_self(len(slot))
    positives, candidates = global_masks(volumes, partitions, 3, "gd-")
    assert torch.equal(positives, same_slice)
    assert not (candidates & ~positives & same_partition).any()
    assert torch.equal(candidates & ~positives, ~same_partition)
    positives, candidates = global_masks(volumes[::3], partitions[::3], 2, "gr")
    assert torch.equal(candidates, not_self(len(candidates)))
    assert positives.sum(1).eq(1).all()


def test_pairwise_denominator_matches_a_hand_computation():
    # Four slices x two views: A (vol 0, part 0), B (vol 1, part 0), C (vol 0, part 1), D (vol 0, part 0).
    volumes = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0])
    partitions = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0])
    # G^D by hand: A, B and D share partition 0; D is of A's volume, so A-D pairs are neither positive nor
    # negative; C (partition 1) is everyone else's negative.
    positives = {
        0: [1, 2, 3],
        1: [0, 2, 3],
        2: [3, 0, 1, 6, 7],
        3: [2, 0, 1, 6, 7],
        4: [5],
        5: [4],
        6: [7, 2, 3],
        7: [6, 2, 3],
    }
    negatives = {a: [4, 5] for a in (0, 1, 2, 3, 6, 7)} | {a: [0, 1, 2, 3, 6, 7] for a in (4, 5)}
    z = torch.nn.functional.normalize(torch.randn(8, 5, generator=torch.Generator().manual_seed(3)), dim=1)
    tau = 0.1
    s = (z @ z.T / tau).tolist()
    expected = 0.0
    for a, pos in positives.items():
        terms = []
        for p in pos:
            denominator = math.exp(s[a][p]) + sum(math.exp(s[a][n]) for n in negatives[a])
            terms.append(-math.log(math.exp(s[a][p]) / denominator))
        expected += sum(terms) / len(terms)
    expected /= 8
    value = global_loss(z, z, 0, volumes, partitions, 2, "gd", tau)
    assert float(value) == pytest.approx(expected, rel=1e-5)
    # Had the other positives entered the denominator (SupCon), the value would differ.
    mask, candidates = global_masks(volumes, partitions, 2, "gd")
    supcon = info_nce(z @ z.T / tau, mask, candidates, pairwise=False)
    assert float(supcon) != pytest.approx(expected, rel=1e-3)


def test_global_loss_split_over_ranks_averages_to_the_whole():
    batch = gcl().make_batch(synthetic_data(7), item_generators(0, 0, 0, 2), "global", with_keypoints=False)
    volumes, partitions = images_metadata(batch, 2)
    z = torch.randn(len(volumes), 8, generator=torch.Generator().manual_seed(0))
    whole = global_loss(z, z, 0, volumes, partitions, 2, "gd", 0.1)
    half = len(z) // 2
    parts = [global_loss(z[i : i + half], z, i, volumes, partitions, 2, "gd", 0.1) for i in (0, half)]
    assert float(sum(parts) / 2) == pytest.approx(float(whole), rel=1e-5)


# --- local regions and masks ----------------------------------------------------------------------------


def test_thirteen_region_windows_on_the_quarter_resolution_map():
    corners = region_corners(32)  # a 128 px view: 32 x 32 map, W' = 28
    assert corners[:9] == [(r, c) for r in (0, 14, 28) for c in (0, 14, 28)]
    assert corners[9:] == [(r, c) for r in (7, 21) for c in (7, 21)]
    assert len(set(corners)) == 13
    assert min(map(min, corners)) == 0 and max(map(max, corners)) + 3 <= 32  # windows inside the map
    neighbours = nearest_regions(corners, 5)
    points = torch.tensor(corners, dtype=torch.float64)
    distance = torch.cdist(points, points)
    for region, chosen in enumerate(neighbours.tolist()):
        assert region not in chosen and len(set(chosen)) == 5
        others = [r for r in range(13) if r != region and r not in chosen]
        assert max(distance[region, chosen]) <= min(distance[region, others])
    assert sorted(neighbours[0].tolist()) == [1, 3, 4, 9, 10]  # corner: quarter point, 2 midpoints, ...


def test_lr_positive_is_the_same_region_in_the_other_view():
    neighbours = nearest_regions(region_corners(16), 5)
    positives, candidates = local_masks(
        torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long), 2, neighbours, False
    )
    assert positives.shape == (3, 26, 26)
    for anchor in range(26):
        view, region = divmod(anchor, 13)
        assert positives[0, anchor].nonzero().flatten().tolist() == [(1 - view) * 13 + region]
        negatives = (candidates[0, anchor] & ~positives[0, anchor]).nonzero().flatten()
        assert sorted((negatives % 13).tolist()) == sorted(neighbours[region].tolist() * 2)
        assert not candidates[0, anchor, anchor]


def test_ld_positives_add_the_same_region_of_same_partition_slices_of_other_volumes():
    neighbours = nearest_regions(region_corners(16), 4)
    volumes = torch.tensor([[0, 0, 1, 1, 2, 2]])
    partitions = torch.tensor([[0, 1, 0, 1, 0, 1]])
    positives, candidates = local_masks(volumes, partitions, 2, neighbours, True)
    slot = torch.arange(6).repeat_interleave(26)
    region = torch.arange(13).repeat(12)
    for anchor in (0, 13 + 5, 26 * 3 + 7):
        chosen = positives[0, anchor].nonzero().flatten()
        assert (region[chosen] == region[anchor]).all()
        assert set(partitions[0, slot[chosen]].tolist()) == {partitions[0, slot[anchor]].item()}
        assert len(chosen) == 1 + 2 * 2  # the other view + both views of two other volumes
        negatives = candidates[0, anchor] & ~positives[0, anchor]
        assert (slot[negatives] == slot[anchor]).all() and negatives.sum() == 8


# --- stages ---------------------------------------------------------------------------------------------


def test_stage_groups_and_config():
    method = gcl()
    assert method.stages == ("global", "local")
    assert method.trainable_groups("global") == ("encoder", "bottleneck")
    assert method.trainable_groups("local") == ("decoder.0", "decoder.1")
    assert method.transfer_groups() == ("encoder", "bottleneck", "decoder.0", "decoder.1")
    optimiser = method.optimiser()
    assert (optimiser.kind, optimiser.learning_rate, optimiser.schedule) == ("adam", 1e-3, "constant")
    with pytest.raises(KafError):
        GclConfig(strategy="supcon")
    with pytest.raises(KafError):
        GclConfig(view_size=100)


def test_local_stage_leaves_the_encoder_unchanged():
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses_over_steps(gcl(), synthetic_data(4), model, steps=3, batch_size=2, stage="local")
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert changed and all(name.startswith(("decoder.0.", "decoder.1.")) for name in changed)
    assert any(name.startswith("decoder.1.") for name in changed)


def test_kaf_backbone_gets_keypoints_for_every_view():
    method, model = gcl(local_strategy="ld", volumes_per_set=2), tiny_model(kaf=True)
    heads = method.build_heads(model)
    for stage in method.stages:
        batch = method.make_batch(synthetic_data(3), item_generators(0, 0, 0, 1), stage, True)
        assert batch.keypoints.shape[:2] == batch.images.shape[:2]
        loss, logs = method.loss(model, heads, batch, stage, Communicator())
        loss.backward()
        assert torch.isfinite(loss) and stage in logs


@pytest.mark.parametrize("stage", ["global", "local"])
def test_loss_falls_on_real_slices(shared_data, stage):
    data = (
        hippocampus_data(shared_data, volumes=6, input_size=64)
        if stage == "global"
        else acdc_data(shared_data)
    )
    losses = losses_over_steps(
        gcl(), data, tiny_model(), steps=24, batch_size=1 if stage == "global" else 2, stage=stage
    )
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


# --- shifted local views (our choice: local_shift) ------------------------------------------------------


def test_shifted_local_views_show_each_region_at_its_transported_place():
    """Without intensity changes, a region's 3 x 3 window (12 x 12 px) in one view is the same pixels as
    its window in the other view, although the two views are translated differently."""
    square = volumes_from_arrays([np.random.default_rng(2).normal(size=(6, 64, 64))] * 2)
    method = make_method(
        "gcl", view_size=64, local_shift=0.125, brightness=0.0, contrast_range=(1.0, 1.0), clip_high=1e6
    )
    cells = method.config.local_shift_cells
    assert cells == 2
    batch = method.make_batch(square, item_generators(3, 0, 0, 40), "local", with_keypoints=False)
    offsets = batch.offsets.reshape(-1, 2)
    assert offsets.abs().max() == cells and (offsets[:, 0] != offsets[:, 1]).any()
    assert (batch.offsets[:, 0] != batch.offsets[:, 1]).any(dim=1).float().mean() > 0.8
    corners = torch.tensor(region_corners(16, cells))
    for slot in range(len(batch.images)):
        windows = []
        for view in range(2):
            image = batch.images[slot, view, 0]
            pixels = (corners - batch.offsets[slot, view]) * 4
            assert (pixels >= 0).all() and (pixels + 12 <= 64).all()
            windows.append(torch.stack([image[r : r + 12, c : c + 12] for r, c in pixels.tolist()]))
        assert torch.allclose(windows[0], windows[1], atol=1e-4)


def test_region_head_takes_each_images_own_windows():
    head = RegionHead(channels=3, region_dim=5).eval()
    features = torch.randn(2, 3, 10, 10)
    corners = torch.tensor([[[0, 0], [4, 7]], [[7, 7], [2, 5]]])
    mapped = head.convs(features)
    expected = torch.stack(
        [
            torch.stack([mapped[b, :, r : r + 3, c : c + 3].flatten() for r, c in corners[b].tolist()])
            for b in range(2)
        ]
    )
    assert torch.allclose(head(features, corners), head.embed(expected), atol=1e-6)


def test_local_shift_is_validated_and_zero_keeps_the_paper_views():
    with pytest.raises(KafError, match="local_shift"):
        GclConfig(local_shift=0.3)
    with pytest.raises(KafError, match="no room"):
        GclConfig(view_size=32, local_shift=0.25)
    assert region_corners(32, 0) == region_corners(32)
    assert region_corners(32, 4) == [(r + 4, c + 4) for r, c in region_corners(24)]
    batch = gcl().make_batch(synthetic_data(3), item_generators(0, 0, 0, 2), "local", with_keypoints=False)
    assert not batch.offsets.any()


def test_shifted_local_loss_runs_on_a_kaf_backbone():
    method, model = make_method("gcl", view_size=64, local_shift=0.25), tiny_model(kaf=True)
    heads = method.build_heads(model)
    batch = method.make_batch(synthetic_data(3), item_generators(0, 0, 0, 2), "local", True)
    loss, _ = method.loss(model, heads, batch, "local", Communicator())
    loss.backward()
    assert torch.isfinite(loss)


def test_gcl_shifted_is_the_paper_configuration_with_translated_local_views():
    shifted, paper = make_method("gcl-shifted").config, GclConfig()
    assert shifted.local_shift == 0.25 and paper.local_shift == 0.0
    assert dataclasses.asdict(shifted) == dataclasses.asdict(replace(paper, local_shift=0.25))
    assert make_method("gcl-shifted", view_size=128).config.local_shift_cells == 8
