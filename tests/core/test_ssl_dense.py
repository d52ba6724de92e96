"""Dense hierarchical SSL (METHODS.md D), 2D adaptation: views, pairs, augmentations, embedding, loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ssl_support import hippocampus_data, losses_over_steps, set_trainable, tiny_model

from kaf.runtime.errors import KafError
from kaf.ssl import make_method
from kaf.ssl.base import Communicator, item_generators
from kaf.ssl.data import volumes_from_arrays
from kaf.ssl.dense import (
    LEVEL_STRIDES,
    DenseConfig,
    DensePairs,
    DensePretraining,
    bezier_intensity_mapping,
    body_mask,
    in_paint,
    local_pixel_shuffle,
    pair_nce,
    pixel_embeddings,
    read_levels,
)

HEIGHT, WIDTH = 40, 56


def coordinate_data(slices: int = 3, height: int = HEIGHT, width: int = WIDTH):
    """Slices whose pixel value encodes its source position: 1000 * slice + row * width + col + 1."""
    rows, cols = np.mgrid[:height, :width]
    stack = np.stack([1000 * k + rows * width + cols + 1.0 for k in range(slices)]).astype(np.float32)
    return volumes_from_arrays([stack])


def source_crop(data, item, view: int, size: int) -> np.ndarray:
    """The crop of the item's source slice at its recorded origin, overhang filled with the slice min."""
    volume, slice_index = item.source.tolist()
    image = data.volumes[volume].slices[slice_index]
    x, y = item.origins[view].tolist()
    out = np.full((size, size), image.min(), np.float32)
    rows, cols = np.mgrid[y : y + size, x : x + size]
    inside = (rows >= 0) & (rows < image.shape[0]) & (cols >= 0) & (cols < image.shape[1])
    out[inside] = image[rows[inside], cols[inside]]
    return out


def item_of(batch, index: int) -> DensePairs:
    return DensePairs(**{name: None if v is None else v[index] for name, v in vars(batch).items()})


@pytest.mark.parametrize("view_size", [32, 64])  # 64 overhangs the 40-row slices
def test_pairs_index_the_same_source_pixel_by_geometry_and_by_warped_values(view_size):
    method = DensePretraining(DenseConfig(view_size=view_size, pairs=200))
    data = coordinate_data()
    batch = method.make_batch(data, item_generators(1, 0, 0, 4), "pretrain", False)
    assert batch.pixels.shape == (4, 2, 200, 2) and batch.pair_mask.shape == (4, 200)
    for b in range(4):
        mask = batch.pair_mask[b]
        assert 0 < int(mask.sum()) <= 200 and not mask[int(mask.sum()) :].any()  # real pairs first
        first, second = batch.pixels[b, 0][mask], batch.pixels[b, 1][mask]
        # Geometry: a pure integer shift, source (x, y) = origin + view (col, row) in both views.
        origin_1, origin_2 = batch.origins[b]
        assert torch.equal(origin_1 + first.flip(1), origin_2 + second.flip(1))
        # Values: the coordinate-encoded clean crops hold the same source pixel at both ends of a pair.
        value_1 = batch.targets[b, 0, 0][first[:, 0], first[:, 1]]
        value_2 = batch.targets[b, 1, 0][second[:, 0], second[:, 1]]
        assert torch.equal(value_1, value_2)
        source_xy = origin_1 + first.flip(1)
        volume, slice_index = batch.source[b].tolist()
        expected = data.volumes[volume].slices[slice_index][source_xy[:, 1], source_xy[:, 0]]
        assert np.array_equal(value_1.numpy(), expected)
        # Every pair lies inside the source slice and its body mask.
        body = body_mask(
            torch.from_numpy(data.volumes[volume].slices[slice_index]), method.config.body_threshold
        )
        assert body[source_xy[:, 1], source_xy[:, 0]].all()


def test_both_crops_contain_a_common_body_pixel_and_stay_inside_the_slice_when_it_is_large_enough():
    method = DensePretraining(DenseConfig(view_size=32, pairs=50))
    batch = method.make_batch(coordinate_data(), item_generators(2, 0, 0, 6), "pretrain", False)
    x, y = batch.origins[..., 0], batch.origins[..., 1]
    assert (x >= 0).all() and (x <= WIDTH - 32).all() and (y >= 0).all() and (y <= HEIGHT - 32).all()
    # Crops both containing an anchor overlap by at least one pixel in each axis.
    assert ((x[:, 0] - x[:, 1]).abs() < 32).all() and ((y[:, 0] - y[:, 1]).abs() < 32).all()


def test_restoration_target_is_the_unaugmented_crop_and_augmentations_change_the_view():
    config = DenseConfig(view_size=64, pairs=32, shuffle_rate=1.0, bezier_rate=1.0, inpaint_rate=1.0)
    method = DensePretraining(config)
    data = coordinate_data()
    batch = method.make_batch(data, item_generators(3, 0, 0, 3), "pretrain", False)
    for b in range(3):
        item = item_of(batch, b)
        for view in range(2):
            target = item.targets[view, 0].numpy()
            assert np.array_equal(target, source_crop(data, item, view, 64))
            assert not np.array_equal(item.views[view, 0].numpy(), target)


def test_without_local_augmentations_the_view_is_the_clean_crop():
    config = DenseConfig(view_size=32, pairs=16, shuffle_rate=0.0, bezier_rate=0.0, inpaint_rate=0.0)
    batch = DensePretraining(config).make_batch(
        coordinate_data(), item_generators(4, 0, 0, 2), "pretrain", False
    )
    assert torch.equal(batch.views, batch.targets)


def test_items_depend_only_on_their_own_generator():
    method = DensePretraining(DenseConfig(view_size=32, pairs=64))
    data = coordinate_data()
    both = method.make_batch(data, item_generators(5, 7, 0, 2), "pretrain", False)
    second = method.make_batch(data, item_generators(5, 7, 1, 1), "pretrain", False)
    for name, value in vars(second).items():
        if value is not None:
            assert torch.equal(getattr(both, name)[1], value[0]), name


def test_local_pixel_shuffle_permutes_pixels_within_their_blocks():
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    image = (rows * 64 + cols).float()
    shuffled = local_pixel_shuffle(image, blocks=250, block=3, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(shuffled, image)
    source_rows, source_cols = shuffled.long() // 64, shuffled.long() % 64
    # Each pixel takes a value from its own 3 x 3 block: never more than 2 pixels away.
    assert ((source_rows - rows).abs() <= 2).all() and ((source_cols - cols).abs() <= 2).all()
    assert (shuffled != image).float().mean() > 0.1


def test_bezier_mapping_is_monotone_keeps_the_range_and_is_non_linear():
    image = torch.linspace(-1.5, 3.0, 64 * 64).view(64, 64)
    mapped = bezier_intensity_mapping(image, torch.Generator().manual_seed(1))
    flat = mapped.flatten()
    assert (flat[1:] >= flat[:-1] - 1e-5).all()
    assert math.isclose(float(flat[0]), -1.5, abs_tol=1e-5) and math.isclose(
        float(flat[-1]), 3.0, abs_tol=1e-5
    )
    assert (mapped - image).abs().max() > 0.05


def test_in_painting_fills_blocks_with_noise_in_the_crop_range():
    image = torch.zeros(64, 64)
    painted = in_paint(image, 30, 0.95, (-1.0, 2.0), torch.Generator().manual_seed(2))
    changed = painted != 0
    assert changed.any() and torch.equal(image, torch.zeros(64, 64))  # the input stays untouched
    assert painted.min() >= -1.0 and painted.max() <= 2.0
    # Blocks keep a 3-pixel margin and are at most 64 // 5 - 1 = 11 pixels wide.
    assert not changed[:3].any() and not changed[:, :3].any() and not changed[-3:].any()
    assert not in_paint(image, 0, 0.95, (-1.0, 2.0), torch.Generator()).ne(0).any()


def test_body_mask_thresholds_the_slice_range_and_falls_back_to_all_pixels():
    image = torch.zeros(8, 8)
    image[2:6, 2:6] = 1.0
    assert torch.equal(body_mask(image, 0.05), image > 0)
    assert body_mask(torch.full((8, 8), 3.0), 0.05).all()


def test_embedding_reads_each_level_at_floor_of_pixel_over_stride():
    size, views, count = 64, 2, 50
    levels = []
    for stride in LEVEL_STRIDES:
        side = size // stride
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        levels.append(torch.stack([rows, cols]).float()[None].expand(views, -1, -1, -1))
    pixels = torch.randint(0, size, (views, count, 2), generator=torch.Generator().manual_seed(3))
    for stride, read in zip(LEVEL_STRIDES, read_levels(levels, pixels), strict=True):
        assert torch.equal(read.long(), pixels // stride)


def test_pixel_embeddings_are_unit_vectors_at_real_pairs_and_zero_at_padding():
    method = DensePretraining(DenseConfig(view_size=32, pairs=40))
    model = tiny_model()
    batch = method.make_batch(coordinate_data(), item_generators(8, 0, 0, 2), "pretrain", False)
    output = model(batch.views.flatten(0, 1))
    mask = batch.pair_mask[:, None].expand(-1, 2, -1).flatten(0, 1)
    heads = method.build_heads(model)
    embeddings = pixel_embeddings(
        heads, [output.bottleneck, *output.decoder], batch.pixels.flatten(0, 1), mask
    )
    assert embeddings.shape == (4, 40, 128)
    norms = embeddings.norm(dim=-1)
    assert torch.allclose(norms[mask], torch.ones(int(mask.sum()))) and (norms[~mask] == 0).all()


def test_unet_pyramid_has_the_strides_the_embedding_assumes_and_heads_have_the_paper_widths():
    model = tiny_model()
    output = model(torch.zeros(1, 1, 64, 64))
    sides = [output.bottleneck.shape[-1], *(d.shape[-1] for d in output.decoder)]
    assert [64 // side for side in sides] == list(LEVEL_STRIDES)
    heads = DensePretraining(DenseConfig()).build_heads(model)
    widths = [layer.out_features for layer in heads["embedding"] if isinstance(layer, torch.nn.Linear)]
    assert widths == [160, 160, 128]
    assert all(p.weight.shape[0] == 32 for p in heads["scale_projections"])


def test_pair_nce_equals_the_formula_of_d4():
    generator = torch.Generator().manual_seed(4)
    e1 = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=1)
    e2 = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=1)
    tau = 0.1

    def direction(a, b):
        total = 0.0
        for k in range(len(a)):
            same = sum(math.exp(float(a[k] @ a[j]) / tau) for j in range(len(a)) if j != k)
            other = sum(math.exp(float(a[k] @ b[j]) / tau) for j in range(len(b)))
            total += -float(a[k] @ b[k]) / tau + math.log(same + other)
        return total / len(a)

    expected = 0.5 * (direction(e1, e2) + direction(e2, e1))
    assert math.isclose(float(pair_nce(e1, e2, tau)), expected, rel_tol=1e-5)


def test_loss_terms_and_frozen_scale_projections():
    data = coordinate_data()
    for frozen in (False, True):
        method = DensePretraining(DenseConfig(view_size=32, pairs=40, freeze_scale_projections=frozen))
        model = tiny_model()
        heads = method.build_heads(model)
        before = [p.weight.clone() for p in heads["scale_projections"]]
        batch = method.make_batch(data, item_generators(6, 0, 0, 2), "pretrain", False)
        loss, terms = method.loss(model, heads, batch, "pretrain", Communicator())
        assert set(terms) == {"nce", "restoration"}
        assert math.isclose(float(loss.detach()), float(terms["nce"] + terms["restoration"]), rel_tol=1e-6)
        loss.backward()
        trainable = [p for p in heads["scale_projections"].parameters()]
        assert (len(trainable) == 0) == frozen
        assert all(p.grad is not None for p in trainable)
        assert all(torch.equal(b, p.weight) for b, p in zip(before, heads["scale_projections"], strict=True))


def test_kaf_backbone_gets_keypoints_per_view(shared_data):
    data = hippocampus_data(shared_data, volumes=1)
    method = DensePretraining(DenseConfig(view_size=32, pairs=32))
    model = tiny_model(kaf=True)
    batch = method.make_batch(data, item_generators(7, 0, 0, 2), "pretrain", True)
    length = batch.keypoint_mask.shape[-1]  # the columns some view uses, at most the cap of 32
    assert batch.keypoints.shape == (2, 2, length, 2) and length <= 32 and batch.keypoint_mask[:, :, 0].all()
    loss, _ = method.loss(model, method.build_heads(model), batch, "pretrain", Communicator())
    assert torch.isfinite(loss)


def test_method_registration_config_defaults_and_groups():
    method = make_method("dense")
    assert isinstance(method, DensePretraining) and method.name == "dense"
    config = method.config
    defaults = (
        config.view_size,
        config.pairs,
        config.batch_size,
        config.temperature,
        config.restoration_weight,
    )
    assert defaults == (128, 1024, 10, 0.1, 10.0)
    settings = method.optimiser()
    optimiser = (settings.kind, settings.learning_rate, settings.schedule, settings.gradient_clip)
    assert optimiser == ("adam", 3e-4, "constant", 1.0)
    groups = ("encoder", "bottleneck", "decoder.0", "decoder.1", "decoder.2", "decoder.3")
    assert method.trainable_groups("pretrain") == groups and method.transfer_groups() == groups
    model = tiny_model()
    set_trainable(model, groups)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["head.weight"]
    with pytest.raises(KafError):
        DenseConfig(view_size=40)


def test_loss_falls_on_real_slices(shared_data):
    data = hippocampus_data(shared_data, volumes=2)
    method = DensePretraining(DenseConfig(view_size=32, pairs=128))
    losses = losses_over_steps(method, data, tiny_model(), steps=24, batch_size=3)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
