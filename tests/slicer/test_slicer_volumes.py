"""Tier 1: NIfTI files and geometry exchanged with the CLI, checked against the core's own reader."""

from __future__ import annotations

import numpy as np
import pytest
from kafsegment_testing import oblique_affine
from KAFSegmentLib.volumes import (
    Keypoint,
    annotated_slices,
    keypoints_to_ras,
    nearest_keypoint,
    read_attention,
    read_keypoints,
    read_nifti,
    slice_center_ras,
    slice_under,
    write_nifti,
)

from kaf.data.volume_io import read_volume, write_class_maps


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64])
def test_nifti_round_trip_keeps_voxels_and_geometry(tmp_path, dtype):
    array = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 97).astype(dtype)
    affine = oblique_affine()
    read, read_affine = read_nifti(write_nifti(array, affine, tmp_path / "v.nii"))
    assert read.dtype == dtype
    np.testing.assert_array_equal(read, array)
    np.testing.assert_allclose(read_affine, affine, atol=1e-5)  # the header stores float32


def test_the_core_reads_what_the_module_writes(tmp_path):
    array = np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)
    volume = read_volume(write_nifti(array, oblique_affine(), tmp_path / "v.nii.gz"))
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, oblique_affine(), atol=1e-5)


def test_types_nifti_handles_badly_are_converted(tmp_path):
    read, _ = read_nifti(write_nifti(np.ones((2, 2, 2), bool), np.eye(4), tmp_path / "b.nii"))
    assert read.dtype == np.uint8
    read, _ = read_nifti(write_nifti(np.full((2, 2, 2), 7, np.int64), np.eye(4), tmp_path / "i.nii"))
    assert read.dtype == np.float64 and read[0, 0, 0] == 7


def test_read_nifti_rejects_4d(tmp_path):
    write_class_maps(np.zeros((2, 3, 4, 5), np.float32), np.eye(4), tmp_path / "maps.nii.gz")
    with pytest.raises(ValueError, match="expected a 3D volume"):
        read_nifti(tmp_path / "maps.nii.gz")


def test_keypoint_slice_row_col_maps_to_ras_through_ijk():
    affine = oblique_affine()
    keypoints = [Keypoint(0, 2.0, 3.5, 0.9), Keypoint(1, 10.25, 0.0, 0.1)]
    ras = keypoints_to_ras(keypoints, slice_index=7, ijk_to_ras=affine)
    expected = [affine @ [3.5, 2.0, 7, 1], affine @ [0.0, 10.25, 7, 1]]  # i = col, j = row, k = slice
    np.testing.assert_allclose(ras, np.array(expected)[:, :3])
    coronal = keypoints_to_ras(keypoints[:1], slice_index=7, ijk_to_ras=affine, slice_axis=1)
    np.testing.assert_allclose(coronal[0], (affine @ [3.5, 7, 2.0, 1])[:3])  # (z, y, x) = (row, slice, col)
    assert keypoints_to_ras([], 0, affine).shape == (0, 3)


def test_slice_center():
    np.testing.assert_allclose(
        slice_center_ras((9, 5, 7), 4, np.diag([2.0, 3.0, 4.0, 1.0])), [6.0, 6.0, 16.0]
    )


def test_read_keypoints_csv(tmp_path):
    path = tmp_path / "keypoints.csv"
    path.write_text("index,row,col,score\n0,20.00,20.50,0.06019\n1,30.00,6.00,0.05839\n")
    assert read_keypoints(path) == [Keypoint(0, 20.0, 20.5, 0.06019), Keypoint(1, 30.0, 6.0, 0.05839)]


def test_read_attention_picks_one_head_of_the_one_slice_volume(tmp_path):
    maps = np.random.default_rng(0).random((4, 1, 5, 6)).astype(np.float32)  # heads, z = 1 slice, y, x
    affine = oblique_affine()
    write_class_maps(maps, affine, tmp_path / "attention_level2.nii.gz")
    head, read_affine = read_attention(tmp_path / "attention_level2.nii.gz", 3)
    np.testing.assert_array_equal(head, maps[3])
    np.testing.assert_allclose(read_affine, affine, atol=1e-5)
    with pytest.raises(ValueError, match="heads 0 to 3"):
        read_attention(tmp_path / "attention_level2.nii.gz", 4)


def test_annotated_slices():
    labels = np.zeros((6, 3, 3), np.uint8)
    labels[1, 0, 0] = labels[4, 2, 2] = 2
    assert annotated_slices(labels) == [1, 4]


def test_the_slice_under_a_voxel_position_and_the_volume_edges():
    shape = (4, 5, 6)  # slices, rows, columns
    assert [slice_under((2.0, 2.0, k), shape) for k in (-0.5, -0.49, 0.49, 0.5, 3.49)] == [0, 0, 0, 1, 3]
    for outside in ((2.0, 2.0, -0.51), (2.0, 2.0, 3.5), (-0.6, 2.0, 1.0), (5.5, 2.0, 1.0), (2.0, 4.5, 1.0)):
        assert slice_under(outside, shape) is None


def test_the_nearest_keypoint_is_nearest_in_millimetres_not_voxels():
    affine = np.diag([0.5, 3.0, 2.0, 1.0])  # columns 0.5 mm apart, rows 3 mm
    keypoints = [Keypoint(0, 11.0, 10.0, 0.9), Keypoint(1, 10.0, 14.0, 0.1)]  # 1 row or 4 columns away
    click = (10.0, 10.0, 2.2)  # (i, j, k): on slice 2, off its centre plane
    assert nearest_keypoint(keypoints, 2, affine, click, radius_mm=5.0) == (1, pytest.approx(2.0))
    assert nearest_keypoint(keypoints, 2, affine, click, radius_mm=1.5) == (None, pytest.approx(2.0))
    assert nearest_keypoint([], 2, affine, click, radius_mm=5.0) == (None, None)
