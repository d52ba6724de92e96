"""Tier 2: MRML nodes ↔ files and arrays, on the real MRML classes of the slicer-core wheel."""

from __future__ import annotations

import numpy as np
import pytest
from kafsegment_testing import NAMES, add_volume, oblique_affine, two_class_labels

from kaf.data.volume_io import read_volume

pytestmark = pytest.mark.slicer_core


@pytest.fixture
def mrml():
    from KAFSegmentLib import mrml

    return mrml


def test_volume_node_to_nifti_and_back_keeps_voxels_and_oblique_geometry(mrml_scene, mrml, tmp_path):
    import slicer

    array = np.random.default_rng(0).integers(-1000, 3000, (6, 8, 9)).astype(np.int16)
    volume = add_volume(mrml_scene, array, oblique_affine())
    np.testing.assert_allclose(mrml.ijk_to_ras(volume), oblique_affine(), atol=1e-12)

    path = mrml.export_volume(volume, tmp_path / "volume.nii")
    core_view = read_volume(path)  # what the CLI will see
    np.testing.assert_array_equal(core_view.array, array)
    np.testing.assert_allclose(core_view.affine, oblique_affine(), atol=1e-5)

    back = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "back")
    slicer.util.updateVolumeFromArray(back, core_view.array)
    mrml.set_ijk_to_ras(back, core_view.affine)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(back), array)
    np.testing.assert_allclose(mrml.ijk_to_ras(back), oblique_affine(), atol=1e-5)
    spacing = np.linalg.norm(oblique_affine()[:3, :3], axis=0)
    np.testing.assert_allclose(back.GetSpacing(), spacing, atol=1e-5)


def test_labels_become_named_segments_on_the_volume_grid(mrml_scene, mrml):
    import slicer
    import vtk

    affine = oblique_affine()
    volume = add_volume(mrml_scene, np.zeros((6, 8, 9), np.float32), affine)
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labels = two_class_labels()
    ids = mrml.import_labels(segmentation, labels, affine, volume, NAMES, {"posterior": (0.1, 0.2, 0.3)})

    assert mrml.segment_names(segmentation, ids) == ["anterior", "posterior"]
    np.testing.assert_allclose(mrml.segment_colors(segmentation)["posterior"], (0.1, 0.2, 0.3), atol=1 / 255)
    np.testing.assert_array_equal(mrml.segments_to_labels(segmentation, ids, volume), labels)
    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    for segment_id in ids:
        image = segmentation.GetSegmentation().GetSegment(segment_id).GetRepresentation(name)
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), affine, atol=1e-9)

    reversed_ids = mrml.import_labels(segmentation, (labels == 1).astype(np.uint8), affine, volume, NAMES[:2])
    assert mrml.segment_names(segmentation, reversed_ids) == ["anterior"]  # a new import replaces segments


def test_labels_off_the_volume_grid_are_refused(mrml_scene, mrml):
    volume = add_volume(mrml_scene, np.zeros((6, 8, 9), np.float32), oblique_affine())
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    shifted = oblique_affine()
    shifted[0, 3] += 1.0
    with pytest.raises(ValueError, match="not on the volume's grid"):
        mrml.import_labels(segmentation, two_class_labels(), shifted, volume, NAMES)
    with pytest.raises(ValueError, match="not on the volume's grid"):
        mrml.import_labels(segmentation, two_class_labels((6, 8, 8)), oblique_affine(), volume, NAMES)


def test_annotation_export_writes_one_label_per_segment(mrml_scene, mrml, tmp_path):
    affine = oblique_affine()
    volume = add_volume(mrml_scene, np.zeros((6, 8, 9), np.float32), affine)
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    anterior, posterior = mrml.import_labels(segmentation, two_class_labels(), affine, volume, NAMES)

    assert mrml.export_annotation(segmentation, [posterior, anterior], volume, tmp_path / "l.nii") == [1, 4]
    written = read_volume(tmp_path / "l.nii")
    expected = two_class_labels()
    np.testing.assert_array_equal(written.array, np.choose(expected, [0, 2, 1]))  # order of ids = labels
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)


def test_annotation_export_refuses_empty_annotations(mrml_scene, mrml, tmp_path):
    affine = oblique_affine()
    volume = add_volume(mrml_scene, np.zeros((6, 8, 9), np.float32), affine)
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(mrml.AnnotationError, match="no segment"):
        mrml.export_annotation(segmentation, [], volume, tmp_path / "l.nii")
    empty = segmentation.GetSegmentation().AddEmptySegment("", "posterior")
    with pytest.raises(mrml.AnnotationError, match=r"Nothing is painted in segment\(s\) posterior"):
        mrml.export_annotation(segmentation, [empty], volume, tmp_path / "l.nii")

    (anterior,) = mrml.import_labels(
        segmentation, (two_class_labels() == 1).astype(np.uint8), affine, volume, NAMES
    )
    empty = segmentation.GetSegmentation().AddEmptySegment("", "posterior")
    with pytest.raises(mrml.AnnotationError, match=r"Nothing is painted in segment\(s\) posterior"):
        mrml.export_annotation(segmentation, [anterior, empty], volume, tmp_path / "l.nii")
    assert not (tmp_path / "l.nii").exists()


def test_keypoints_become_locked_control_points_at_their_ras_position(mrml_scene, mrml):
    from KAFSegmentLib.volumes import Keypoint

    affine = oblique_affine()
    volume = add_volume(mrml_scene, np.zeros((6, 8, 9), np.float32), affine)
    markups = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    keypoints = [Keypoint(0, 2.0, 3.5, 0.9), Keypoint(1, 7.25, 0.5, 0.4), Keypoint(2, 0.0, 8.0, 0.1)]
    mrml.update_keypoints(markups, keypoints, 4, volume)

    positions = np.array([markups.GetNthControlPointPositionVector(i) for i in range(3)])
    expected = np.array([affine @ [k.col, k.row, 4, 1] for k in keypoints])[:, :3]
    np.testing.assert_allclose(positions, expected, atol=1e-9)
    assert [markups.GetNthControlPointLabel(i) for i in range(3)] == ["0", "1", "2"]
    assert markups.GetNthControlPointDescription(0) == "score 0.9000"
    assert markups.GetLocked()

    mrml.select_keypoint(markups, 1)
    assert [markups.GetNthControlPointSelected(i) for i in range(3)] == [False, True, False]
    mrml.update_keypoints(markups, keypoints[:1], 4, volume)  # updated in place
    assert markups.GetNumberOfControlPoints() == 1


def test_attention_volume_uses_inferno_over_zero_to_one(mrml_scene, mrml):
    import slicer

    affine = oblique_affine()
    volume = add_volume(mrml_scene, np.zeros((6, 8, 9), np.float32), affine)
    slice_affine = affine.copy()
    slice_affine[:3, 3] += 4 * affine[:3, 2]
    attention = np.random.default_rng(0).random((1, 8, 9)).astype(np.float32)
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    mrml.update_attention_volume(node, attention, slice_affine, volume)
    mrml.show_as_foreground(node)  # no slice views in this scene: must simply do nothing

    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), attention)
    np.testing.assert_allclose(mrml.ijk_to_ras(node), slice_affine, atol=1e-12)
    display = node.GetDisplayNode()
    assert display.GetColorNodeID() == mrml.INFERNO_COLOR_ID
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    assert not display.GetAutoWindowLevel()


def test_derived_nodes_follow_the_volume_transform(mrml_scene, mrml):
    volume = add_volume(mrml_scene, np.zeros((2, 3, 4), np.float32), np.eye(4))
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    markups = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    mrml.follow_transform(markups, volume)
    assert markups.GetTransformNodeID() == transform.GetID()
    mrml.jump_to_slice(volume, 1)  # no slice nodes here either
