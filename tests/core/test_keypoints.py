"""Tests for kaf.data.keypoints: SIFT detection, fallback lattice, batch padding, coordinate transport."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kaf.data.keypoints import (
    DESCRIPTOR_SIZE,
    KeypointBatch,
    KeypointConfig,
    SiftDetector,
    SliceKeypoints,
    detect_volume,
    fallback_lattice,
    make_detector,
    pad_keypoints,
    sift_keypoints,
    to_uint8,
    transform_keypoint_coords,
    transform_slice_keypoints,
)
from kaf.runtime.errors import InputDataError, KafError

UNCAPPED = 100_000


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    """A 256x256 natural image with plenty of corners and blobs, as floats like a normalised slice."""
    small = cv2.resize(skimage.data.camera(), (256, 256), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) / 255.0 * 3.0 - 1.0


def gaussian_blob(size: int = 64, sigma: float = 2.0) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    centre = size // 2
    return np.exp(-((rows - centre) ** 2 + (cols - centre) ** 2) / (2 * sigma**2))


def assert_same_keypoints(a: SliceKeypoints, b: SliceKeypoints) -> None:
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.is_fallback == b.is_fallback


def test_sift_keypoints_are_sorted_unique_inside_and_repeatable(camera: np.ndarray) -> None:
    keypoints = sift_keypoints(camera, max_keypoints=256)

    assert not keypoints.is_fallback
    assert 50 <= len(keypoints) <= 256
    assert keypoints.coords.dtype == np.int64 and keypoints.coords.shape == (len(keypoints), 2)
    assert keypoints.scores.dtype == np.float32 and np.all(keypoints.scores > 0)
    assert keypoints.descriptors is None
    assert np.all(np.diff(keypoints.scores) <= 0), "not strongest first"
    assert len(np.unique(keypoints.coords, axis=0)) == len(keypoints), "a pixel appears twice"
    assert np.all(keypoints.coords >= 0) and np.all(keypoints.coords < camera.shape)
    assert_same_keypoints(keypoints, sift_keypoints(camera, max_keypoints=256))


def test_each_keypoint_is_the_strongest_opencv_keypoint_rounding_to_its_pixel(camera: np.ndarray) -> None:
    raw, raw_descriptors = cv2.SIFT_create().detectAndCompute(to_uint8(camera), None)
    raw_rows = np.array([kp.pt[1] for kp in raw])
    raw_cols = np.array([kp.pt[0] for kp in raw])
    raw_scores = np.array([kp.response for kp in raw], dtype=np.float32)

    keypoints = sift_keypoints(camera, max_keypoints=UNCAPPED, with_descriptors=True)
    assert keypoints.descriptors is not None
    for (row, col), score, descriptor in zip(
        keypoints.coords, keypoints.scores, keypoints.descriptors, strict=True
    ):
        at_pixel = (np.abs(raw_rows - row) <= 0.5) & (np.abs(raw_cols - col) <= 0.5)
        assert at_pixel.any(), f"({row}, {col}) is not the rounded position of any SIFT keypoint"
        assert score == raw_scores[at_pixel].max()
        strongest = at_pixel & (raw_scores == score)
        assert np.any(np.all(raw_descriptors[strongest] == descriptor, axis=1))


def test_equal_scores_are_ordered_by_row_then_col(camera: np.ndarray) -> None:
    keypoints = sift_keypoints(camera, max_keypoints=UNCAPPED)
    order = np.lexsort((keypoints.coords[:, 1], keypoints.coords[:, 0], -keypoints.scores))
    np.testing.assert_array_equal(order, np.arange(len(keypoints)))


def test_result_does_not_depend_on_opencv_thread_count(camera: np.ndarray) -> None:
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)
        single = sift_keypoints(camera, max_keypoints=UNCAPPED, with_descriptors=True)
    finally:
        cv2.setNumThreads(threads)
    multi = sift_keypoints(camera, max_keypoints=UNCAPPED, with_descriptors=True)
    assert_same_keypoints(single, multi)
    np.testing.assert_array_equal(single.descriptors, multi.descriptors)


def test_cap_keeps_the_strongest_of_the_uncapped_detection(camera: np.ndarray) -> None:
    uncapped = sift_keypoints(camera, max_keypoints=UNCAPPED)
    capped = sift_keypoints(camera, max_keypoints=10)
    assert len(uncapped) > 10
    np.testing.assert_array_equal(capped.coords, uncapped.coords[:10])
    np.testing.assert_array_equal(capped.scores, uncapped.scores[:10])


def test_descriptors_belong_to_the_returned_keypoints(camera: np.ndarray) -> None:
    plain = sift_keypoints(camera, max_keypoints=64)
    described = sift_keypoints(camera, max_keypoints=64, with_descriptors=True)
    assert_same_keypoints(plain, described)
    assert described.descriptors is not None
    assert described.descriptors.shape == (64, DESCRIPTOR_SIZE)
    assert described.descriptors.dtype == np.float32
    assert len(np.unique(described.descriptors, axis=0)) == 64


def test_detection_is_invariant_to_intensity_scale_and_shift(camera: np.ndarray) -> None:
    assert_same_keypoints(sift_keypoints(camera, 128), sift_keypoints(camera * 250.0 + 40.0, 128))


@pytest.mark.parametrize("value", [0.0, 7.5])
def test_constant_image_uses_the_fallback_lattice(value: float) -> None:
    image = np.full((96, 128), value)
    keypoints = sift_keypoints(image, max_keypoints=50, with_descriptors=True)

    assert keypoints.is_fallback
    assert keypoints.descriptors is None
    assert 0 < len(keypoints) <= 50
    assert np.all(keypoints.scores == 0)
    assert np.all(keypoints.coords > 0) and np.all(keypoints.coords < np.array(image.shape) - 1)
    np.testing.assert_array_equal(keypoints.coords, fallback_lattice(image.shape, 50))
    assert_same_keypoints(keypoints, sift_keypoints(image, max_keypoints=50))


def test_single_blob_counts_as_one_pixel_and_falls_back() -> None:
    blob = gaussian_blob()
    raw = cv2.SIFT_create().detect(to_uint8(blob), None)
    assert len(raw) >= 4, "SIFT reports the blob several times; deduplication must come before the check"
    assert sift_keypoints(blob, max_keypoints=32).is_fallback


def test_fallback_lattice_on_a_square_slice_is_the_centred_regular_grid() -> None:
    lattice = fallback_lattice((256, 256), 256)
    centres = np.arange(8, 256, 16)
    expected = np.stack(np.meshgrid(centres, centres, indexing="ij"), axis=-1).reshape(-1, 2)
    np.testing.assert_array_equal(lattice, expected)
    assert lattice.dtype == np.int64


@settings(max_examples=150, deadline=None)
@given(
    height=st.integers(1, 600),
    width=st.integers(1, 600),
    max_keypoints=st.integers(1, 600),
)
def test_fallback_lattice_properties(height: int, width: int, max_keypoints: int) -> None:
    lattice = fallback_lattice((height, width), max_keypoints)

    assert 1 <= len(lattice) <= max_keypoints
    assert np.all(lattice >= 0) and np.all(lattice < (height, width))
    assert len(np.unique(lattice, axis=0)) == len(lattice)
    rows, cols = np.unique(lattice[:, 0]), np.unique(lattice[:, 1])
    assert len(rows) * len(cols) == len(lattice), "not a full grid"
    # Centred: the grid's margins on opposite sides differ by at most a pixel.
    assert abs(rows[0] - (height - 1 - rows[-1])) <= 1
    assert abs(cols[0] - (width - 1 - cols[-1])) <= 1
    # Unless the slice is too thin for one cell of the ideal size or has fewer pixels than the cap, the
    # floor(H / cell) x floor(W / cell) grid has >= cap / 4 points and cells at most 2:1, so it scores
    # >= cap / 8; the chosen grid scores at least that, which bounds both its count and its cell shape.
    ideal_cell = np.sqrt(height * width / max_keypoints)
    if ideal_cell <= min(height, width) and max_keypoints <= height * width:
        assert len(lattice) >= max_keypoints / 8
        assert 1 / 8 <= (height / len(rows)) / (width / len(cols)) <= 8


@pytest.mark.parametrize(
    ("shape", "max_keypoints", "grid"),
    [
        ((256, 256), 512, (22, 22)),
        ((200, 400), 128, (8, 16)),
        ((7, 232), 127, (2, 63)),
        ((1, 500), 20, (1, 20)),
    ],
)
def test_fallback_lattice_prefers_square_cells(
    shape: tuple[int, int], max_keypoints: int, grid: tuple[int, int]
) -> None:
    lattice = fallback_lattice(shape, max_keypoints)
    assert (len(np.unique(lattice[:, 0])), len(np.unique(lattice[:, 1]))) == grid


def test_to_uint8_scales_min_to_0_and_max_to_255() -> None:
    image = np.array([[-2.0, 0.0], [1.0, 2.0]])
    np.testing.assert_array_equal(to_uint8(image), [[0, 128], [191, 255]])
    assert to_uint8(image).dtype == np.uint8
    np.testing.assert_array_equal(to_uint8(np.full((3, 4), 5.0)), np.zeros((3, 4), np.uint8))


def test_non_finite_or_non_2d_input_is_rejected() -> None:
    with pytest.raises(InputDataError, match="NaN"):
        sift_keypoints(np.array([[0.0, np.nan], [1.0, 2.0]]), 8)
    with pytest.raises(InputDataError, match="2D"):
        sift_keypoints(np.zeros((2, 8, 8)), 8)


def make_slice(coords: list[list[int]]) -> SliceKeypoints:
    array = np.array(coords, dtype=np.int64).reshape(-1, 2)
    scores = np.linspace(1.0, 0.5, len(array), dtype=np.float32)
    return SliceKeypoints(coords=array, scores=scores, descriptors=None, is_fallback=False)


def test_pad_keypoints_pads_with_zeros_and_masks_real_points() -> None:
    slices = [make_slice([[10, 20], [31, 7], [100, 65]]), make_slice([]), make_slice([[255, 129]])]
    batch = pad_keypoints(slices, max_keypoints=5)

    assert batch.coords.shape == (3, 5, 2) and batch.coords.dtype == torch.int64
    assert batch.mask.shape == (3, 5) and batch.mask.dtype == torch.bool
    assert batch.scores.shape == (3, 5) and batch.scores.dtype == torch.float32
    assert batch.mask.sum(dim=1).tolist() == [3, 0, 1]
    assert torch.all(batch.coords[~batch.mask] == 0)
    assert torch.all(batch.scores[~batch.mask] == 0)
    for i, keypoints in enumerate(slices):
        count = len(keypoints)
        np.testing.assert_array_equal(batch.coords[i, :count].numpy(), keypoints.coords)
        np.testing.assert_array_equal(batch.scores[i, :count].numpy(), keypoints.scores)


def test_at_level_divides_by_the_level_stride() -> None:
    batch = pad_keypoints([make_slice([[10, 21], [255, 7]]), make_slice([[3, 129]])], max_keypoints=4)
    for level in range(1, 5):
        expected = batch.coords // 2 ** (level - 1)
        assert torch.equal(batch.at_level(level), expected)
    assert batch.at_level(4)[0, 0].tolist() == [1, 2]
    assert batch.at_level(3)[0, 1].tolist() == [63, 1]
    with pytest.raises(ValueError, match="level"):
        batch.at_level(5)


def test_pad_keypoints_rejects_slices_over_the_cap() -> None:
    with pytest.raises(ValueError, match="max_keypoints"):
        pad_keypoints([make_slice([[1, 1], [2, 2], [3, 3]])], max_keypoints=2)


def test_index_select_and_to_keep_the_batch_consistent() -> None:
    slices = [make_slice([[1, 2]]), make_slice([[3, 4], [5, 6]]), make_slice([])]
    batch = pad_keypoints(slices, max_keypoints=3)

    picked = batch.index_select(torch.tensor([2, 0]))
    assert picked.mask.sum(dim=1).tolist() == [0, 1]
    assert picked.coords[1, 0].tolist() == [1, 2]
    moved = batch.to("cpu")
    assert isinstance(moved, KeypointBatch)
    assert torch.equal(moved.coords, batch.coords) and torch.equal(moved.mask, batch.mask)


def test_keypoint_batch_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="Inconsistent"):
        KeypointBatch(
            coords=torch.zeros((2, 4, 2), dtype=torch.int64),
            mask=torch.zeros((2, 3), dtype=torch.bool),
            scores=torch.zeros((2, 3)),
        )


def test_transform_with_half_scale_and_offset_lands_on_expected_pixels() -> None:
    coords = np.array([[0, 0], [5, 9], [100, 200], [63, 1], [200, 300]])
    new, valid = transform_keypoint_coords(coords, scale=(0.5, 0.5), offset=(3.0, -1.0), shape=(64, 128))

    np.testing.assert_array_equal(new, [[3, -1], [5, 3], [53, 99], [34, -1], [103, 149]])
    np.testing.assert_array_equal(valid, [False, True, True, False, False])
    assert new.dtype == np.int64


def test_transform_floors_fractional_positions_per_axis() -> None:
    new, valid = transform_keypoint_coords(
        np.array([[3, 3]]), scale=(1.5, 0.25), offset=(0.4, 0.0), shape=(10, 10)
    )
    np.testing.assert_array_equal(new, [[4, 0]])
    assert valid.all()


def test_padding_transport_matches_detection_on_the_padded_slice(camera: np.ndarray) -> None:
    row_pad, col_pad = (16, 21), (24, 7)
    padded = np.pad(camera, (row_pad, col_pad), constant_values=camera.min())
    offset = (row_pad[0], col_pad[0])

    original = sift_keypoints(camera, max_keypoints=256)
    moved, valid = transform_keypoint_coords(original.coords, (1.0, 1.0), offset, padded.shape)
    # Padding may add border points; detect uncapped so they cannot push real points out.
    on_padded = sift_keypoints(padded, max_keypoints=UNCAPPED)

    assert valid.all()
    rows, cols = original.coords.T
    np.testing.assert_array_equal(camera[rows, cols], padded[moved[:, 0], moved[:, 1]])
    chebyshev = np.abs(moved[:, None, :] - on_padded.coords[None, :, :]).max(axis=2).min(axis=1)
    assert np.mean(chebyshev <= 1) >= 0.9


def test_transform_slice_keypoints_drops_outside_and_duplicate_pixels() -> None:
    keypoints = make_slice([[10, 10], [11, 11], [40, 2], [2, 2]])
    moved = transform_slice_keypoints(keypoints, scale=(0.5, 0.5), offset=(0.0, 0.0), shape=(16, 16))

    np.testing.assert_array_equal(moved.coords, [[5, 5], [1, 1]])
    np.testing.assert_array_equal(moved.scores, keypoints.scores[[0, 3]])
    assert not moved.is_fallback


def test_transform_slice_keypoints_falls_back_when_nothing_survives() -> None:
    keypoints = make_slice([[10, 10], [11, 11]])
    moved = transform_slice_keypoints(keypoints, scale=(1.0, 1.0), offset=(100.0, 0.0), shape=(32, 32))
    assert moved.is_fallback
    np.testing.assert_array_equal(moved.coords, fallback_lattice((32, 32), 2))


def test_detect_volume_reports_progress_after_each_slice(camera: np.ndarray) -> None:
    volume = np.stack([camera[:128, :128], np.zeros((128, 128)), camera[128:, 128:]])
    calls: list[tuple[int, int]] = []

    results = detect_volume(
        volume, KeypointConfig(max_keypoints=32), progress=lambda d, t: calls.append((d, t))
    )

    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert len(results) == 3
    assert [r.is_fallback for r in results] == [False, True, False]
    assert all(len(r) <= 32 for r in results)
    assert_same_keypoints(results[0], sift_keypoints(volume[0], 32))


def test_detector_from_config_is_a_callable_provider(camera: np.ndarray) -> None:
    detector = make_detector(KeypointConfig(max_keypoints=16))
    assert detector == SiftDetector(max_keypoints=16)
    assert_same_keypoints(detector(camera), sift_keypoints(camera, 16))


def test_keypoint_config_round_trips_and_validates() -> None:
    config = KeypointConfig(max_keypoints=512)
    assert config.to_dict() == {"max_keypoints": 512, "detector": "sift"}
    assert KeypointConfig.from_dict(config.to_dict()) == config
    assert KeypointConfig.from_dict({}) == KeypointConfig()
    with pytest.raises(KafError, match="orb"):
        KeypointConfig(detector="orb")
    with pytest.raises(KafError, match="max_keypoints"):
        KeypointConfig(max_keypoints=0)
    with pytest.raises(KafError, match="colour"):
        KeypointConfig.from_dict({"max_keypoints": 8, "colour": "red"})
