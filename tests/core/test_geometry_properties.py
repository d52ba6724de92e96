"""Property tests (hypothesis) for the geometry every job relies on: resizing with its point mapping,
augmentation crops, and volume orientation through the file formats."""

from __future__ import annotations

import tempfile
from itertools import permutations
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kaf.data.augment import AugmentationSettings, augment_batch
from kaf.data.slices import SliceLayout
from kaf.data.volume_io import read_volume, write_volume

sides = st.integers(min_value=8, max_value=90)
scales = st.floats(min_value=0.3, max_value=1.0)


@settings(max_examples=60, deadline=None)
@given(height=sides, width=sides, scale=scales)
def test_resize_and_back_restores_the_shape_and_keeps_constants(height, width, scale):
    layout = SliceLayout((height, width), scale=scale)
    constant = torch.full((1, 1, height, width), 3.0)

    for mode in ("bilinear", "nearest"):
        on_model = layout.to_model(constant, mode)
        assert on_model.shape[-2:] == layout.padded_shape
        back = layout.from_model(on_model, mode)
        assert back.shape == constant.shape and torch.allclose(back, constant)


@settings(max_examples=60, deadline=None)
@given(height=sides, width=sides, scale=scales)
def test_a_model_pixel_maps_back_to_the_slice_position_it_was_resized_from(height, width, scale):
    """On ramps (value = column, value = row) bilinear resizing is exact, so the value a model pixel
    holds is the slice position it came from; `points_from_model` must give that position."""
    layout = SliceLayout((height, width), scale=scale)
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    on_model = layout.to_model(torch.stack([rows, cols])[None])[0]
    top, left = layout.offset
    resized_h, resized_w = layout.resized_shape
    model_points = np.stack(np.meshgrid(np.arange(resized_h), np.arange(resized_w), indexing="ij"), -1)
    model_points = model_points.reshape(-1, 2) + np.array([top, left])
    mapped = layout.points_from_model(model_points)
    held = on_model[:, model_points[:, 0], model_points[:, 1]].T.numpy()
    # Bilinear sampling clamps at the border, so compare where the mapped position is inside the slice.
    inside = (mapped >= 0).all(1) & (mapped <= (height - 1, width - 1)).all(1)
    np.testing.assert_allclose(held[inside], mapped[inside], atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(
    height=sides,
    width=sides,
    crop_height=st.integers(3, 40).map(lambda n: 2 * n + 1),
    crop_width=st.integers(3, 40).map(lambda n: 2 * n + 1),
    seed=st.integers(0, 2**31),
)
def test_a_crop_without_warping_is_the_image_window_with_its_keypoints_moved_by_the_same_shift(
    height, width, crop_height, crop_width, seed
):
    """Odd crops with no rotation or scale sit on whole pixels: image, labels and keypoints of the crop
    must be exactly the input's window around the crop centre (zeros outside the image)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 1, height, width, generator=generator)
    labels = torch.randint(0, 3, (2, height, width), generator=generator)
    # A keypoint on every pixel: the crop centre is a pixel of the image, so some always stay inside.
    every_pixel = torch.cartesian_prod(torch.arange(height), torch.arange(width))
    keypoints = every_pixel.expand(2, -1, -1)
    mask = torch.ones(2, len(every_pixel), dtype=torch.bool)
    crop_only = AugmentationSettings(
        spatial_probability=0.0, contrast_range=(1.0, 1.0), brightness=0.0, noise_std=0.0
    )
    crop = (crop_height, crop_width)
    out = augment_batch(images, labels, keypoints, mask, crop, crop_only, generator)

    margin = (crop_width, crop_width, crop_height, crop_height)
    for b in range(2):
        shifts = (keypoints[b] - out.keypoints[b])[out.keypoint_mask[b]]
        assert (shifts == shifts[0]).all()  # one translation for every kept keypoint
        top, left = shifts[0].tolist()  # the window's top-left corner in the input
        window = (
            slice(top + crop_height, top + 2 * crop_height),
            slice(left + crop_width, left + 2 * crop_width),
        )
        torch.testing.assert_close(out.images[b, 0], F.pad(images[b, 0], margin)[window])
        assert torch.equal(out.labels[b], F.pad(labels[b], margin)[window])
        corner = torch.tensor([top, left])
        inside = ((keypoints[b] >= corner) & (keypoints[b] < corner + torch.tensor(crop))).all(1)
        assert torch.equal(out.keypoint_mask[b], inside)  # exactly the pixels of the window are kept


AXIS_ORDERS = list(permutations(range(3)))


@st.composite
def oriented_affines(draw) -> np.ndarray:
    """Any of the 48 axis orders and flips, with its own spacing and origin."""
    order = draw(st.sampled_from(AXIS_ORDERS))
    signs = draw(st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3))
    spacing = draw(st.tuples(*[st.floats(0.2, 5.0)] * 3))
    origin = draw(st.tuples(*[st.floats(-200, 200)] * 3))
    affine = np.eye(4)
    affine[:3, :3] = 0
    for voxel_axis, world_axis in enumerate(order):
        affine[world_axis, voxel_axis] = signs[voxel_axis] * spacing[voxel_axis]
    affine[:3, 3] = origin
    return affine


def world_positions_by_value(path: Path) -> np.ndarray:
    """World (RAS mm) position of every voxel, ordered by the voxel's (unique) value."""
    volume = read_volume(path)
    z, y, x = np.indices(volume.array.shape).reshape(3, -1)
    world = (volume.affine @ np.stack([x, y, z, np.ones_like(x)]))[:3].T
    return world[np.argsort(volume.array.reshape(-1), kind="stable")]


@settings(max_examples=40, deadline=None)
@given(affine=oriented_affines(), suffix=st.sampled_from([".nii.gz", ".nrrd"]))
def test_every_orientation_round_trips_through_the_file_formats(affine, suffix):
    array = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    with tempfile.TemporaryDirectory() as folder:
        path = write_volume(array, affine, Path(folder) / f"volume{suffix}")
        volume = read_volume(path)

    assert np.array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(affine=oriented_affines(), order=st.sampled_from(AXIS_ORDERS), flips=st.tuples(*[st.booleans()] * 3))
def test_a_reoriented_copy_puts_every_voxel_at_the_same_world_position(affine, order, flips):
    """The same scan stored with its axes permuted and flipped (as scanners and converters do) must read
    as the same anatomy: each voxel value at the same RAS position."""
    data_xyz = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = nib.Nifti1Image(data_xyz, affine)
    orientation = np.array([[axis, -1.0 if flip else 1.0] for axis, flip in zip(order, flips, strict=True)])
    with tempfile.TemporaryDirectory() as folder:
        original, reoriented = Path(folder) / "original.nii.gz", Path(folder) / "reoriented.nii.gz"
        nib.save(image, original)
        nib.save(image.as_reoriented(orientation), reoriented)
        np.testing.assert_allclose(
            world_positions_by_value(reoriented), world_positions_by_value(original), atol=1e-3
        )
