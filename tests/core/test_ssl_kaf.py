"""KAF pretraining (METHODS.md A.4-A.5): keypoint transport, matches, losses, and that it learns."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from ssl_support import hippocampus_data, losses_over_steps, tiny_model
from volume_factory import synthetic_volume

from kaf.ssl import make_method
from kaf.ssl.base import item_generators
from kaf.ssl.data import UnlabeledVolume, volumes_from_arrays
from kaf.ssl.kaf_method import ground_truth_matches, neighbour_slice, random_view_geometry
from kaf.ssl.losses import info_nce, log_optimal_transport, matching_loss, not_self, supcon_by_position
from kaf.ssl.views import transport_keypoints, warp


def _coordinate_image(height: int, width: int) -> torch.Tensor:
    """[2, H, W]: channel 0 holds each pixel's x, channel 1 its y."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([xs, ys]).float()


@pytest.mark.parametrize("seed", range(6))
def test_transported_keypoints_land_on_the_same_anatomy(seed):
    """Through mirror + elastic + rotation + scaling, a keypoint's raster-transported position in the
    view shows the source pixel the keypoint was on (within one view pixel), and agrees with the
    analytic transport through the inverse sampling map within 1 px."""
    method = make_method("kaf", view_size=64)
    shape = (50, 40)
    generator = torch.Generator().manual_seed(seed)
    geometry = random_view_geometry(shape, method.config, generator)
    rng = np.random.default_rng(seed)
    keypoints = np.stack([rng.integers(5, shape[0] - 5, 30), rng.integers(5, shape[1] - 5, 30)], 1)
    keypoints = np.unique(keypoints, axis=0)
    coords, alive = transport_keypoints(keypoints, shape, geometry)
    assert alive.sum() >= len(keypoints) // 3

    coordinates = warp(_coordinate_image(*shape), geometry, mode="nearest")
    source = geometry.source_points()
    for (row, col), (view_row, view_col) in zip(keypoints[alive], coords[alive], strict=True):
        shown_x, shown_y = coordinates[:, view_row, view_col].tolist()
        # one view pixel spans this many source pixels here (zoom and elastic stretch)
        step = max(
            float((source[view_row, view_col] - source[view_row + dr, view_col + dc]).norm())
            for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
            if 0 <= view_row + dr < 64 and 0 <= view_col + dc < 64
        )
        assert math.hypot(shown_x - col, shown_y - row) <= step + 0.75
        distance = (source - torch.tensor([col, row], dtype=torch.float64)).norm(dim=-1)
        analytic = np.unravel_index(int(distance.argmin()), distance.shape)
        assert abs(analytic[0] - view_row) <= 1 and abs(analytic[1] - view_col) <= 1


def test_keypoint_zero_is_not_confused_with_the_border():
    """Defect E.1: id 0 must not collect the padded border (background is -1)."""
    method = make_method("kaf", view_size=64)
    generator = torch.Generator().manual_seed(3)
    geometry = random_view_geometry((30, 30), method.config, generator)  # a 30 px slice in a 64 px view
    coords, alive = transport_keypoints(np.array([[15, 15]]), (30, 30), geometry)
    assert alive[0]
    source = geometry.source_points()[coords[0, 0], coords[0, 1]]
    assert torch.allclose(source, torch.tensor([15.0, 15.0], dtype=torch.float64), atol=1.5)


def test_sinkhorn_rows_and_columns_sum_to_their_marginals():
    scores = torch.randn(2, 6, 5)
    rows = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    columns = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    plan = log_optimal_transport(scores, torch.tensor(1.0), rows, columns, 100).exp()
    for b in range(2):
        m, n = int(rows[b].sum()), int(columns[b].sum())
        row_sums, column_sums = plan[b].sum(1), plan[b].sum(0)
        torch.testing.assert_close(row_sums[:m], torch.ones(m), atol=1e-4, rtol=0)
        torch.testing.assert_close(row_sums[-1], torch.tensor(float(n)), atol=1e-3, rtol=0)
        torch.testing.assert_close(column_sums[:n], torch.ones(n), atol=1e-4, rtol=0)
        torch.testing.assert_close(column_sums[-1], torch.tensor(float(m)), atol=1e-3, rtol=0)
        assert plan[b, m:-1].abs().sum() == 0 and plan[b, :, n:-1].abs().sum() == 0


def test_matching_loss_is_the_reference_form():
    log_plan = torch.log(torch.tensor([[[0.5, 0.1, 0.2], [0.1, 0.3, 0.4], [0.2, 0.6, 0.0]]]))
    matches = torch.tensor([[0, -1]])  # view-1 keypoint 0 matches view-2 keypoint 0; keypoint 1 unmatched
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = matching_loss(log_plan, matches, mask, mask)
    # matched: -log 0.5; unmatched: row 1 to the dustbin column (-log 0.4), column 1 to the dustbin row
    expected = 0.45 * -math.log(0.5) + 1.0 * (-math.log(0.4) - math.log(0.6)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_supcon_positives_are_slices_within_the_position_threshold():
    z = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    positions = torch.tensor([0.1, 0.2, 0.9, 0.1, 0.2, 0.9])
    loss = supcon_by_position(z, positions, threshold=0.15, temperature=0.1, base_temperature=0.07)
    logits = z @ z.T / 0.1
    expected = 0.0
    for i in range(6):
        positives = [p for p in range(6) if p != i and abs(positions[i] - positions[p]) < 0.15]
        denominator = torch.logsumexp(torch.cat([logits[i, :i], logits[i, i + 1 :]]), 0)
        expected += -sum(float(logits[i, p] - denominator) for p in positives) / len(positives)
    assert float(loss) == pytest.approx(0.1 / 0.07 * expected / 6, rel=1e-5)


def test_pairwise_info_nce_leaves_other_positives_out_of_the_denominator():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    positives = torch.tensor([[False, True, True, False]])
    candidates = torch.tensor([[False, True, True, True]])
    loss = info_nce(logits, positives, candidates, pairwise=True)
    expected = np.mean(
        [-(1.0 - np.log(np.exp(1.0) + np.exp(0.5))), -(2.0 - np.log(np.exp(2.0) + np.exp(0.5)))]
    )
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert not_self(3).diagonal().any().item() is False


def test_ground_truth_matches_are_mutual_nearest_descriptors_within_the_gate():
    blobs = gaussian_filter(np.random.default_rng(0).normal(size=(64, 64)), 2.0).astype(np.float32)
    image = np.stack([np.roll(blobs, shift, axis=1) for shift in (0, 2, 40)])
    volume = UnlabeledVolume("noise", image, max_keypoints=64)
    alive = [np.ones(len(volume.keypoints(k)), bool) for k in range(3)]
    same = ground_truth_matches(volume, 0, 0, alive[0], alive[0], gate=20)
    assert np.array_equal(same, np.arange(len(same)))  # a slice matched with itself: the identity
    shifted = ground_truth_matches(volume, 0, 1, alive[0], alive[1], gate=20)
    a, b = volume.keypoints(0), volume.keypoints(1)
    matched = shifted >= 0
    assert matched.mean() > 0.5
    offsets = b.coords[shifted[matched]] - a.coords[matched]
    assert np.median(offsets[:, 1]) == 2 and np.median(offsets[:, 0]) == 0
    assert (np.abs(offsets).sum(1) < 20).all()
    far = ground_truth_matches(volume, 0, 2, alive[0], alive[2], gate=20)  # 40 px apart: beyond the gate
    a2 = volume.keypoints(2)
    assert all(np.abs(a2.coords[j] - a.coords[i]).sum() < 20 for i, j in enumerate(far) if j >= 0)
    assert len(set(far[far >= 0])) == (far >= 0).sum()  # one-to-one


def test_a_view_that_lost_every_keypoint_has_no_ground_truth_matches():
    """Either view may lose all its keypoints to the warp (it then carries the fallback lattice); the
    other view's keypoints all go unmatched, in either order. (A 1000-step hippocampus run once hit the
    first view empty.)"""
    blobs = gaussian_filter(np.random.default_rng(0).normal(size=(64, 64)), 2.0).astype(np.float32)
    volume = UnlabeledVolume("noise", np.stack([blobs, np.roll(blobs, 2, axis=1)]), max_keypoints=64)
    alive = [np.ones(len(volume.keypoints(k)), bool) for k in range(2)]
    lost = [np.zeros_like(a) for a in alive]
    assert ground_truth_matches(volume, 0, 1, lost[0], alive[1], gate=20).shape == (0,)
    none_found = ground_truth_matches(volume, 0, 1, alive[0], lost[1], gate=20)
    assert none_found.shape == (len(alive[0]),) and (none_found == -1).all()


def test_neighbour_slices_are_near_distinct_and_inside_the_volume():
    generator = torch.Generator().manual_seed(0)
    for count in (3, 10):
        for index in range(count):
            for _ in range(20):
                neighbour = neighbour_slice(index, count, (-2, -1, 1, 2), generator)
                assert 0 <= neighbour < count and neighbour != index and abs(neighbour - index) <= 2


def test_batch_items_depend_only_on_their_own_generator():
    data = volumes_from_arrays([np.random.default_rng(1).normal(size=(6, 40, 40)).astype(np.float32)], 32)
    method = make_method("kaf", view_size=32)
    whole = method.make_batch(data, item_generators(0, 5, 0, 4), "pretrain", True)
    second_half = method.make_batch(data, item_generators(0, 5, 2, 2), "pretrain", True)
    torch.testing.assert_close(whole.images[2:4], second_half.images[:2])
    torch.testing.assert_close(whole.matches[2:], second_half.matches)


def test_kaf_pretraining_loss_falls_on_real_slices(shared_data):
    data = hippocampus_data(shared_data, volumes=4)
    method = make_method("kaf", view_size=64)
    losses = losses_over_steps(method, data, tiny_model(kaf=True), steps=40, batch_size=8, learning_rate=1e-3)
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.1


def test_kaf_paper_keeps_the_papers_values_where_the_default_departs_from_them():
    default, paper = make_method("kaf"), make_method("kaf-paper")
    differing = {
        field.name
        for field in fields(default.config)
        if getattr(default.config, field.name) != getattr(paper.config, field.name)
    }

    assert differing == {"position_threshold", "pcl_head_norm", "optimiser"}
    assert paper.name == "kaf-paper"
    assert (paper.config.position_threshold, paper.config.pcl_head_norm) == (0.35, False)
    optimiser = paper.config.optimiser
    assert (optimiser.kind, optimiser.learning_rate, optimiser.momentum) == ("sgd", 0.002, 0.9)
    assert (default.config.optimiser.kind, default.config.optimiser.learning_rate) == ("adam", 1e-3)
    assert paper.transfer_groups() == default.transfer_groups()


def _mean_off_diagonal_cosine(embeddings: torch.Tensor) -> float:
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    similarity = unit @ unit.T
    count = len(similarity)
    return float((similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1)))


def test_the_default_pcl_head_spreads_the_pooled_features_that_the_papers_head_leaves_collapsed():
    """The measured cause of the paper settings' chance-level L_PCL (BENCHMARKS.md): at initialisation
    the pooled bottleneck features of different slices are nearly parallel, and only a head with a
    BatchNorm separates them."""
    image, _ = synthetic_volume(slices=8)
    data = volumes_from_arrays([image], max_keypoints=32)
    model = tiny_model(kaf=True)
    embeddings = {}
    for name in ("kaf", "kaf-paper"):
        method = make_method(name, view_size=32)
        torch.manual_seed(0)
        heads = method.build_heads(model)
        batch = method.make_batch(data, item_generators(0, 0, 0, 8), "pretrain", True)
        with torch.no_grad():
            pooled = model(batch.images, batch.keypoints, batch.keypoint_mask, decode_until=0).bottleneck
            embeddings[name] = heads["pcl"](pooled.mean(dim=(2, 3)))

    assert _mean_off_diagonal_cosine(pooled.mean(dim=(2, 3))) > 0.9  # 0.92 here, 0.997 on ACDC slices
    assert _mean_off_diagonal_cosine(embeddings["kaf-paper"]) > 0.9
    assert _mean_off_diagonal_cosine(embeddings["kaf"]) < 0.5
