"""Slice layout, annotation rules, augmentation with keypoint transport, and the scores."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kaf.data.annotation import sparse_annotation
from kaf.data.augment import AugmentationSettings, augment_batch
from kaf.data.metrics import copy_nearest_annotated, dice_on_unannotated, dice_per_class, spread_slices
from kaf.data.slices import SliceLayout, put_slices, take_slices
from kaf.runtime.errors import InputDataError

sides = st.integers(min_value=5, max_value=70)


@settings(max_examples=40, deadline=None)
@given(height=sides, width=sides)
def test_padding_to_the_model_grid_and_back_is_exact(height, width):
    layout = SliceLayout((height, width))
    stack = torch.randn(2, 3, height, width)
    padded = layout.to_model(stack)
    assert padded.shape[-2] % 16 == 0 and padded.shape[-1] % 16 == 0
    assert torch.equal(layout.from_model(padded), stack)


@settings(max_examples=40, deadline=None)
@given(
    height=sides, width=sides, row=st.floats(0, 1, exclude_max=True), col=st.floats(0, 1, exclude_max=True)
)
def test_a_pixel_keeps_its_value_through_the_layout(height, width, row, col):
    layout = SliceLayout((height, width))
    image = torch.arange(height * width, dtype=torch.float32).view(1, 1, height, width)
    point = np.array([[int(row * height), int(col * width)]])
    top, left = layout.offset
    on_model = layout.to_model(image)[0, 0, point[0, 0] + top, point[0, 1] + left]
    assert on_model == image[0, 0, point[0, 0], point[0, 1]]
    assert np.allclose(layout.points_from_model(point + np.array(layout.offset)), point)


def test_resized_layout_maps_back_to_the_original_shape():
    layout = SliceLayout((200, 256), scale=0.5)
    assert layout.resized_shape == (100, 128) and layout.padded_shape == (112, 128)
    back = layout.from_model(layout.to_model(torch.ones(1, 1, 200, 256)))
    assert back.shape == (1, 1, 200, 256) and torch.allclose(back, torch.ones_like(back))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_take_and_put_slices_are_inverse_for_every_axis(axis):
    volume = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    stack = take_slices(volume, axis)
    assert stack.shape[0] == volume.shape[axis]
    assert np.array_equal(put_slices(stack, axis), volume)
    with_classes = np.stack([stack, stack + 1])
    assert np.array_equal(put_slices(with_classes, axis)[1], volume + 1)


def test_annotated_slices_are_painted_ones_plus_explicit_background_ones():
    labels = np.zeros((6, 4, 4), dtype=np.int64)
    labels[1, 0, 0] = 2
    annotation = sparse_annotation(labels, explicit_slices=[4])
    assert annotation.annotated == (1, 4) and annotation.classes == 3
    on_axis_two = sparse_annotation(labels, slice_axis=2)
    assert on_axis_two.annotated == (0,)


def test_annotation_errors_name_the_problem():
    empty = np.zeros((4, 4, 4), dtype=np.int64)
    with pytest.raises(InputDataError, match="no slice is annotated"):
        sparse_annotation(empty, source="my_labels.nii.gz")
    labels = empty.copy()
    labels[0, 0, 0] = 5
    with pytest.raises(InputDataError, match="only 3 classes"):
        sparse_annotation(labels, classes=3)
    with pytest.raises(InputDataError, match="do not exist"):
        sparse_annotation(labels, explicit_slices=[9])


def test_augmentation_moves_keypoints_onto_the_same_anatomy():
    """Each keypoint sits on a bright dot; after crop + rotation + scale the moved keypoint must be on
    the warped dot (within 1 pixel)."""
    generator = torch.Generator().manual_seed(3)
    batch, height, width = 6, 64, 80
    keypoints = torch.stack(
        [torch.randint(8, height - 8, (batch, 5)), torch.randint(8, width - 8, (batch, 5))], -1
    )
    images = torch.zeros(batch, 1, height, width)
    for b in range(batch):
        for r, c in keypoints[b].tolist():
            images[b, 0, r - 1 : r + 2, c - 1 : c + 2] = 1.0
    quiet = AugmentationSettings(
        rotation_degrees=30,
        scale_range=(0.8, 1.2),
        spatial_probability=1.0,
        contrast_range=(1.0, 1.0),
        brightness=0.0,
        noise_std=0.0,
    )
    mask = torch.ones(batch, 5, dtype=torch.bool)
    labels = torch.zeros(batch, height, width, dtype=torch.long)
    out = augment_batch(images, labels, keypoints, mask, (48, 48), quiet, generator)
    checked = 0
    for b in range(batch):
        for (r, c), valid in zip(out.keypoints[b].tolist(), out.keypoint_mask[b].tolist(), strict=True):
            if valid and 1 <= r < 47 and 1 <= c < 47:
                assert out.images[b, 0, r - 1 : r + 2, c - 1 : c + 2].max() > 0.5
                checked += 1
    assert checked >= 5


def test_copy_baseline_and_dice():
    reference = np.zeros((5, 4, 4), dtype=np.int64)
    for z in range(5):
        reference[z, : z + 1] = 1
    copied = copy_nearest_annotated(reference, [0, 4])
    assert np.array_equal(copied[1], reference[0]) and np.array_equal(copied[3], reference[4])
    assert np.array_equal(copied[2], reference[0])  # a tie goes to the lower slice
    assert dice_per_class(reference, reference, 2)[0] == pytest.approx(1.0)
    score, _ = dice_on_unannotated(copied, reference, [0, 4], 2)
    # Slices hold 4, 8, 12, 16, 16 pixels; slices 1, 2, 3 get copies of 4, 4, 16 pixels.
    inter = 4 + 4 + 16
    assert score == pytest.approx(2 * inter / ((4 + 4 + 16) + (8 + 12 + 16)))


def test_spread_slices_prefers_slices_with_more_classes_and_keeps_them_apart():
    reference = np.zeros((8, 4, 4), dtype=np.int64)
    reference[3, 0, 0], reference[3, 1, 1] = 1, 2
    reference[4, 0, 0], reference[4, 1, 1] = 1, 2
    reference[6, :2] = 1
    assert spread_slices(reference, 2, min_gap=2) == [3, 6]
