"""PGL (METHODS.md C) on 2D slices: views and their geometry, the prior-guided aligner, the EMA target and
the symmetric local regression loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ssl_support import hippocampus_data, losses_over_steps, set_trainable, tiny_model

from kaf.models import KafUNet
from kaf.runtime.errors import KafError
from kaf.ssl import make_method
from kaf.ssl.base import Communicator, item_generators
from kaf.ssl.data import volumes_from_arrays
from kaf.ssl.losses import cosine_schedule, normalised_regression
from kaf.ssl.pgl import (
    TARGET,
    IntensityAugmentation,
    PglBatch,
    PglConfig,
    PglPretraining,
    align,
    augment_intensity,
    draw_view_pair,
    projector_key,
)
from kaf.ssl.views import ViewGeometry, crop_geometry, overlap_boxes, warp

NO_INTENSITY = IntensityAugmentation(0.0, (0.0, 0.1), 0.0, (0.5, 1.0), 0.0, (0.75, 1.25), 0.0, (0.7, 1.5))


def synthetic_data(slices: int = 3, height: int = 64, width: int = 48):
    rng = np.random.default_rng(0)
    return volumes_from_arrays(
        [rng.normal(size=(slices, height, width)).astype(np.float32)], max_keypoints=32
    )


# Narrow heads where their width does not matter: the tests share 2 CPU cores.
NARROW = {"projector_hidden": 64, "predictor_hidden": 64, "projection_dim": 32}


def method(**overrides) -> PglPretraining:
    return make_method("pgl", **{"view_size": 32, **overrides})


def batch_for(pgl: PglPretraining, data, count: int = 3, with_keypoints: bool = False) -> PglBatch:
    return pgl.make_batch(data, item_generators(0, 0, 0, count), "pretrain", with_keypoints)


def test_defaults_follow_c3():
    pgl = make_method("pgl")
    config = pgl.config
    assert isinstance(pgl, PglPretraining) and pgl.name == "pgl" and isinstance(config, PglConfig)
    assert (
        config.batch_size == 16
        and config.view_size == 128
        and config.crop_scale == (1.1, 1.4)
        and config.min_overlap == 0.1
    )
    assert config.flip_probability == 0.5 and config.levels == (16,)
    assert (config.grid_size, config.sampling_ratio) == (4, 2)
    assert (config.projector_hidden, config.projection_dim, config.predictor_hidden) == (1024, 256, 1024)
    assert (config.ema_start, config.ema_end, config.global_weight) == (0.996, 1.0, 0.0)
    optimiser = pgl.optimiser()
    assert (optimiser.kind, optimiser.learning_rate, optimiser.weight_decay) == ("adam", 3e-4, 1e-6)
    assert optimiser.schedule == "cosine" and optimiser.warmup_fraction > 0
    assert pgl.trainable_groups("pretrain") == ("encoder", "bottleneck") == pgl.transfer_groups()
    assert pgl.decode_until == 0 and pgl.slices_per_item == 1
    with pytest.raises(KafError):
        PglConfig(view_size=40)
    with pytest.raises(KafError):
        PglConfig(levels=(32,))


def test_heads_are_1x1_projector_predictor_and_a_target_copy():
    model = tiny_model()
    heads = method().build_heads(model)
    projector, predictor = heads[projector_key(16)], heads["predictor_16"]
    convs = [m for m in [*projector, *predictor] if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.kernel_size == (1, 1) for conv in convs)
    shapes = [(c.in_channels, c.out_channels) for c in convs]
    assert shapes == [(model.bottleneck_channels, 1024), (1024, 256), (256, 1024), (1024, 256)]
    assert isinstance(projector[1], torch.nn.BatchNorm2d) and isinstance(projector[2], torch.nn.ReLU)
    target = heads[TARGET]
    assert isinstance(target["backbone"], KafUNet) and target["backbone"] is not model
    for name, value in model.state_dict().items():
        assert torch.equal(target["backbone"].state_dict()[name], value)
    for a, b in zip(target[projector_key(16)].parameters(), projector.parameters(), strict=True):
        assert torch.equal(a, b) and a is not b
    assert not any(p.requires_grad for p in target.parameters())
    assert any(key.startswith("target.backbone.encoder.") for key in heads.state_dict())


def test_views_have_scaled_overlapping_crops_and_their_geometry():
    data = synthetic_data()
    pgl = method(intensity=NO_INTENSITY)
    batch = batch_for(pgl, data, count=6)
    assert batch.views.shape == (6, 2, 1, 32, 32) and batch.boxes.shape == (6, 2, 4)
    assert batch.flips.shape == (6, 2, 2) and batch.keypoints is None
    again = batch_for(pgl, data, count=6)
    assert torch.equal(again.views, batch.views)  # seeded per item
    alone = pgl.make_batch(data, item_generators(0, 0, 2, 1), "pretrain", False)
    assert torch.equal(alone.views[0], batch.views[2])  # item i depends on its own generator only
    source = torch.from_numpy(data.volumes[0].slices)
    for item in range(6):
        for view in range(2):
            to_source = batch.to_source[item, view]
            scale = abs(float(to_source[0, 0]))
            assert 1.1 - 1e-6 <= scale <= 1.4 + 1e-6 and abs(float(to_source[1, 1])) == pytest.approx(scale)
            assert bool(batch.flips[item, view, 0]) == (float(to_source[0, 0]) < 0)
            box = batch.boxes[item, view]
            assert float((box[2] - box[0]) * (box[3] - box[1])) >= 0.1 * 32 * 32 - 1e-3
            # The recorded geometry reproduces the view from one of the volume's slices.
            geometry = ViewGeometry(to_source, (32, 32))
            warped = torch.stack([warp(s[None], geometry) for s in source])
            errors = (warped - batch.views[item, view]).abs().flatten(1).max(1).values
            assert float(errors.min()) < 1e-5


def test_pairs_without_enough_overlap_are_redrawn():
    # A slice three times the crops: most first draws overlap by less than 60 %.
    strict = PglConfig(view_size=16, min_overlap=0.6, intensity=NO_INTENSITY)
    loose = PglConfig(view_size=16, min_overlap=0.0, intensity=NO_INTENSITY)
    redrawn = 0
    for seed in range(20):
        pair = draw_view_pair((60, 60), strict, torch.Generator().manual_seed(seed))
        areas = [float((b[2] - b[0]) * (b[3] - b[1])) for b in pair.boxes]
        assert min(areas) >= 0.6 * 16 * 16 - 1e-3
        first_draw = draw_view_pair((60, 60), loose, torch.Generator().manual_seed(seed))
        redrawn += not torch.equal(first_draw.geometries[0].to_source, pair.geometries[0].to_source)
    assert redrawn > 10
    with pytest.raises(KafError):
        draw_view_pair((60, 60), PglConfig(view_size=16, min_overlap=1.0, max_draws=5), torch.Generator())


def coordinate_features(geometry, stride: int) -> torch.Tensor:
    """[2, P/stride, P/stride]: the source (x, y) of each view pixel, averaged over stride-size cells
    (exact: the mean of a linear map is its value at the cell centre)."""
    points = geometry.source_points().permute(2, 0, 1).to(torch.float32)
    return F.avg_pool2d(points[None], stride)[0]


def expected_source_grid(first, second, size: int, m: int) -> torch.Tensor:
    """[2, m, m]: source (x, y) pixel-centre coordinates of the bin centres of the shared source box."""
    corners = []
    for geometry in (first, second):
        edges = torch.tensor([[-0.5, -0.5, 1.0], [size - 0.5, size - 0.5, 1.0]], dtype=torch.float64)
        xy = (edges @ geometry.to_source.T)[:, :2]
        corners.append((xy.min(0).values, xy.max(0).values))
    low = torch.maximum(corners[0][0], corners[1][0]) + 0.5
    high = torch.minimum(corners[0][1], corners[1][1]) + 0.5
    centres = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    xs = low[0] + centres * (high[0] - low[0]) - 0.5
    ys = low[1] + centres * (high[1] - low[1]) - 0.5
    return torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None])).to(torch.float32)


@pytest.mark.parametrize("stride", [1, 16])
def test_aligner_samples_the_same_source_place_in_both_views(stride):
    size, m = 64, 4
    config = PglConfig(view_size=size, intensity=NO_INTENSITY)
    seen_flips = set()
    for seed in range(16):
        pair = draw_view_pair((80, 90), config, torch.Generator().manual_seed(seed))
        seen_flips |= {flip for flip in pair.flips}
        features = torch.stack([coordinate_features(g, stride) for g in pair.geometries])
        aligned = align(features, torch.stack(pair.boxes), torch.tensor(pair.flips), size, config)
        expected = expected_source_grid(*pair.geometries, size, m)
        # Bilinear samples of a linear map are exact, but for those in the border half cell, which read
        # the border cell: off by at most half a cell (stride / 2 view pixels, times the crop scale).
        tolerance = stride / 2 * 1.4 + 1e-3
        for view in range(2):
            assert torch.allclose(aligned[view], expected, atol=tolerance)
        assert torch.allclose(aligned[0], aligned[1], atol=2 * tolerance)
    assert seen_flips == {(False, False), (False, True), (True, False), (True, True)}


def test_aligner_un_flips_a_mirrored_view_exactly():
    # Two views of one crop, the second mirrored on both axes: the aligned grids must be equal.
    size = 32
    config = PglConfig(view_size=size)
    coordinates = torch.stack(torch.meshgrid(torch.arange(40.0), torch.arange(50.0), indexing="xy"))
    image = coordinates[0] * 0.3 + torch.sin(coordinates[1])  # not symmetric
    for flips in [(True, False), (False, True), (True, True)]:
        plain = crop_geometry((5.0, 4.0), (36.0, 36.0), (size, size))
        mirrored = crop_geometry((5.0, 4.0), (36.0, 36.0), (size, size), flips)
        views = torch.stack([warp(image[None], plain), warp(image[None], mirrored)])
        assert not torch.allclose(views[0], views[1])
        boxes = overlap_boxes(plain, mirrored, (50, 40))
        aligned = align(
            views,
            torch.tensor(np.stack(boxes), dtype=torch.float32),
            torch.tensor([(False, False), flips]),
            size,
            config,
        )
        assert torch.allclose(aligned[0], aligned[1], atol=1e-5)


def test_aligned_features_of_identical_views_agree():
    # Both views of each item show identical content: the model's aligned maps and projections agree.
    data = synthetic_data()
    pgl = method(intensity=NO_INTENSITY)
    batch = batch_for(pgl, data, count=2)
    twin = PglBatch(
        views=batch.views[:, :1].expand(-1, 2, -1, -1, -1).clone(),
        boxes=batch.boxes[:, :1].expand(-1, 2, -1).clone(),
        flips=batch.flips[:, :1].expand(-1, 2, -1).clone(),
        to_source=batch.to_source[:, :1].expand(-1, 2, -1, -1).clone(),
    )
    model = tiny_model()
    heads = pgl.build_heads(model)
    model.eval()
    heads.eval()
    with torch.no_grad():
        images = torch.cat([twin.views[:, 0], twin.views[:, 1]])
        features = model(images, decode_until=0).bottleneck
        boxes, flips = (
            torch.cat([twin.boxes[:, 0], twin.boxes[:, 1]]),
            torch.cat([twin.flips[:, 0], twin.flips[:, 1]]),
        )
        aligned = align(features, boxes, flips, 32, pgl.config)
        assert aligned.shape == (4, model.bottleneck_channels, 4, 4)
        assert torch.allclose(aligned[:2], aligned[2:], atol=1e-6)
        projected = heads[projector_key(16)](aligned)
        assert torch.allclose(projected[:2], projected[2:], atol=1e-5)
        # Target = online at the start, so its projection of view 1 matches the online one of view 2.
        target = heads[TARGET][projector_key(16)](
            align(heads[TARGET]["backbone"](images, decode_until=0).bottleneck, boxes, flips, 32, pgl.config)
        )
        assert torch.allclose(target[:2], projected[2:], atol=1e-5)


def test_loss_is_the_symmetric_normalised_regression_on_the_aligned_grid():
    data = synthetic_data()
    pgl = method()
    batch = batch_for(pgl, data, count=3)
    model = tiny_model()
    heads = pgl.build_heads(model)
    torch.manual_seed(0)
    total, terms = pgl.loss(model, heads, batch, "pretrain", Communicator())
    assert set(terms) == {"local_16"} and torch.equal(total, terms["local_16"])
    # Recompute by hand, with the same BN batch statistics (the BN running stats are not read in training).
    images = torch.cat([batch.views[:, 0], batch.views[:, 1]])
    boxes, flips = (
        torch.cat([batch.boxes[:, 0], batch.boxes[:, 1]]),
        torch.cat([batch.flips[:, 0], batch.flips[:, 1]]),
    )
    with torch.no_grad():
        q = heads["predictor_16"](
            heads[projector_key(16)](
                align(model(images, decode_until=0).bottleneck, boxes, flips, 32, pgl.config)
            )
        )
        target = heads[TARGET]
        z = target[projector_key(16)](
            align(target["backbone"](images, decode_until=0).bottleneck, boxes, flips, 32, pgl.config)
        )
    per_item = [
        (
            (2 - 2 * F.cosine_similarity(q[i], z[3 + i], dim=0))
            + (2 - 2 * F.cosine_similarity(q[3 + i], z[i], dim=0))
        ).mean()
        for i in range(3)
    ]
    assert float(total) == pytest.approx(float(torch.stack(per_item).mean()), rel=1e-4)
    assert 0 < float(total) < 8
    assert torch.allclose(normalised_regression(q, q), torch.zeros(6, 4, 4), atol=1e-5)


def test_target_gets_no_gradients():
    data = synthetic_data()
    pgl = method(**NARROW)
    model = tiny_model()
    heads = pgl.build_heads(model)
    set_trainable(model, pgl.trainable_groups("pretrain"))
    loss, _ = pgl.loss(model, heads, batch_for(pgl, data), "pretrain", Communicator())
    loss.backward()
    target = heads[TARGET]
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    assert all(p.grad is not None for p in heads["predictor_16"].parameters())
    assert all(p.grad is not None for p in heads[projector_key(16)].parameters())
    assert model.encoder[0].convs[0][0].weight.grad is not None
    assert all(p.grad is None for name, p in model.named_parameters() if name.startswith("decoder"))


def test_target_follows_the_ema_formula_after_a_step():
    data = synthetic_data()
    pgl = method(**NARROW)
    model = tiny_model()
    heads = pgl.build_heads(model)
    set_trainable(model, pgl.trainable_groups("pretrain"))
    parameters = [p for p in [*model.parameters(), *heads.parameters()] if p.requires_grad]
    optimiser = torch.optim.SGD(parameters, lr=0.5)
    loss, _ = pgl.loss(model, heads, batch_for(pgl, data), "pretrain", Communicator())
    loss.backward()
    optimiser.step()
    pairs = list(pgl.ema_pairs(heads, model))
    backbone_count = sum(1 for n, _ in model.named_parameters() if n.startswith(("encoder", "bottleneck")))
    assert len(pairs) == backbone_count + len(list(heads[projector_key(16)].parameters()))
    before = [target.clone() for target, _ in pairs]
    assert any(not torch.equal(b, online) for b, (_, online) in zip(before, pairs, strict=True))
    progress = 0.3
    pgl.on_after_step(heads, model, progress)
    tau = cosine_schedule(progress, 0.996, 1.0)
    assert 0.996 < tau < 1
    for old, (target, online) in zip(before, pairs, strict=True):
        torch.testing.assert_close(target, tau * old + (1 - tau) * online, rtol=0, atol=1e-7)
    frozen = [target.clone() for target, _ in pairs]
    pgl.on_after_step(heads, model, 1.0)  # tau = 1 at the end: the target stops moving
    assert all(torch.equal(a, target) for a, (target, _) in zip(frozen, pairs, strict=True))


def test_decoder_levels_and_global_term():
    data = synthetic_data()
    pgl = method(levels=(16, 8), global_weight=0.5, **NARROW)
    assert pgl.decode_until == 1
    assert pgl.trainable_groups("pretrain") == ("encoder", "bottleneck", "decoder.0") == pgl.transfer_groups()
    model = tiny_model()
    heads = pgl.build_heads(model)
    assert heads[projector_key(8)][0].in_channels == model.decoder_channels[0]
    total, terms = pgl.loss(model, heads, batch_for(pgl, data), "pretrain", Communicator())
    assert set(terms) == {"local_16", "global_16", "local_8", "global_8"}
    assert float(total) == pytest.approx(float(sum(terms.values())), rel=1e-5)


def test_intensity_augmentations():
    image = torch.linspace(-1, 2, 32 * 32).view(1, 32, 32)
    assert torch.equal(augment_intensity(image, NO_INTENSITY, torch.Generator()), image)
    always = IntensityAugmentation(1.0, (0.0, 0.1), 1.0, (0.5, 1.0), 1.0, (0.75, 1.25), 1.0, (0.7, 1.5))
    out = augment_intensity(image, always, torch.Generator().manual_seed(1))
    assert out.shape == image.shape and torch.isfinite(out).all() and not torch.allclose(out, image)
    contrast_gamma = IntensityAugmentation(
        0.0, (0.0, 0.1), 0.0, (0.5, 1.0), 1.0, (0.75, 1.25), 1.0, (0.7, 1.5)
    )
    for seed in range(5):
        out = augment_intensity(image, contrast_gamma, torch.Generator().manual_seed(seed))
        assert float(out.min()) >= -1 - 1e-5 and float(out.max()) <= 2 + 1e-5  # clipped, then rescaled


def test_kaf_backbone_gets_transported_keypoints_per_view():
    data = synthetic_data()
    pgl = method(**NARROW)
    batch = batch_for(pgl, data, count=2, with_keypoints=True)
    length = batch.keypoint_mask.shape[-1]  # the columns some view uses, at most the cap of 32
    assert (
        batch.keypoints.shape == (2, 2, length, 2)
        and batch.keypoint_mask.shape == (2, 2, length)
        and length <= 32
    )
    assert batch.keypoint_mask.any(-1).all()
    assert int(batch.keypoints.min()) >= 0 and int(batch.keypoints.max()) < 32
    model = tiny_model(kaf=True)
    loss, _ = pgl.loss(model, pgl.build_heads(model), batch, "pretrain", Communicator())
    assert torch.isfinite(loss)


def test_loss_falls_on_real_slices(shared_data):
    data = hippocampus_data(shared_data, volumes=3)
    pgl = method(**NARROW)
    losses = losses_over_steps(pgl, data, tiny_model(), steps=30, batch_size=4, learning_rate=1e-3)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
