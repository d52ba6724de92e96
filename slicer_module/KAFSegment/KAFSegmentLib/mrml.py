"""MRML nodes ↔ the arrays and files of `volumes`.

Uses only what both Slicer and the Qt-free `slicer-core` wheel provide (MRML classes, `slicer.util`
array helpers, the static methods of vtkSlicerSegmentationsModuleLogic), so the tests run it on real
MRML classes without Slicer. Nodes are created in the scene of the node they derive from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import slicer
import vtk

from .volumes import (
    Keypoint,
    annotated_slices,
    keypoints_to_ras,
    same_grid,
    slice_center_ras,
    write_nifti,
)

INFERNO_COLOR_ID = "vtkMRMLColorTableNodeFileInferno.txt"  # colour table shipped with Slicer
ATTENTION_OPACITY = 0.5
# The core's palette (kaf.data.volume_io.label_table.PALETTE: class k has colour k-1, repeating), which
# `kaf predict` also writes into its colour table; here for a CLI that wrote no table.
PALETTE_HEX = (
    "e6194b 3cb44b 0082c8 ffe119 f58230 911eb4 46f0f0 f032e6 d2f53c fabed4 "
    "008080 dcbeff aa6e28 fffac8 800000 aaffc3 808000 ffd7b4 000080 808080"
)
PALETTE = tuple(tuple(int(code[i : i + 2], 16) / 255 for i in (0, 2, 4)) for code in PALETTE_HEX.split())


class AnnotationError(ValueError):
    """The annotation cannot be used: no segment, or nothing painted."""


def ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def ras_to_ijk(volume_node, ras) -> np.ndarray:
    """The continuous voxel position (i, j, k) of a world RAS position: through the transforms above the
    volume (to its own RAS), then its RASToIJK matrix."""
    to_volume = vtk.vtkGeneralTransform()
    parent = volume_node.GetParentTransformNode()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, parent, to_volume)
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(matrix)
    return np.array(matrix.MultiplyPoint([*to_volume.TransformPoint([float(x) for x in ras]), 1.0])[:3])


def volume_shape(volume_node) -> tuple[int, int, int]:
    """(slices, rows, columns): the [z, y, x] shape of the volume's voxels."""
    columns, rows, slices = volume_node.GetImageData().GetDimensions()
    return slices, rows, columns


def set_ijk_to_ras(volume_node, affine: np.ndarray) -> None:
    volume_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(affine, dtype=float)))


def export_volume(volume_node, path: Path) -> Path:
    """Write a volume node as NIfTI with its voxels and IJK-to-RAS geometry unchanged."""
    return write_nifti(slicer.util.arrayFromVolume(volume_node), ijk_to_ras(volume_node), path)


def segment_ids(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def segment_names(segmentation_node, ids: Sequence[str]) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetSegment(segment_id).GetName() for segment_id in ids]


def segments_to_labels(segmentation_node, ids: Sequence[str], reference_volume) -> np.ndarray:
    """The segments as one [z, y, x] label array on the reference volume's grid: segment n has label n."""
    if not ids:
        raise AnnotationError("The segmentation has no segment: add one and paint a few slices.")
    scene = reference_volume.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "KAF annotation export")
    try:
        id_array = vtk.vtkStringArray()
        for segment_id in ids:
            id_array.InsertNextValue(segment_id)
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, id_array, labelmap, reference_volume
        )
        if not exported or labelmap.GetImageData() is None:
            raise AnnotationError("Slicer could not export the annotation onto the volume's grid.")
        labels = np.array(slicer.util.arrayFromVolume(labelmap))
    finally:
        scene.RemoveNode(labelmap)
    return labels.astype(np.uint8 if len(ids) < 256 else np.uint16)


def export_annotation(segmentation_node, ids: Sequence[str], reference_volume, path: Path) -> list[int]:
    """Write the segments as a label volume on the reference grid; returns the annotated slices."""
    labels = segments_to_labels(segmentation_node, ids, reference_volume)
    present = set(np.unique(labels).tolist())
    empty = [
        name for value, name in enumerate(segment_names(segmentation_node, ids), 1) if value not in present
    ]
    if empty:  # the model needs examples of every class it is asked to learn
        raise AnnotationError(
            f"Nothing is painted in segment(s) {', '.join(empty)}: paint them on a few slices, "
            "or fine-tune on one segment only."
        )
    write_nifti(labels, ijk_to_ras(reference_volume), path)
    return annotated_slices(labels)


def import_labels(
    segmentation_node,
    labels_zyx: np.ndarray,
    affine: np.ndarray,
    reference_volume,
    names: Sequence[str],
    colors: dict[str, tuple[float, float, float]] | None = None,
    value_colors: dict[int, tuple[float, float, float]] | None = None,
) -> list[str]:
    """Replace the segments of `segmentation_node` by one segment per label value present in
    `labels_zyx` (0 is background), named `names[value]`, on the reference volume's grid. A segment's
    colour: that of the same-named entry of `colors` (an annotated segment), else `value_colors[value]`
    (the CLI's colour table), else the palette's."""
    reference = ijk_to_ras(reference_volume)
    shape = slicer.util.arrayFromVolume(reference_volume).shape
    if labels_zyx.shape != shape or not same_grid(affine, reference):
        raise ValueError("The labels are not on the volume's grid (shape or IJK-to-RAS differ).")
    scene = reference_volume.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "KAF labels import")
    color_table = _color_table(scene, names, colors or {}, value_colors or {})
    try:
        slicer.util.updateVolumeFromArray(labelmap, labels_zyx)
        set_ijk_to_ras(labelmap, reference)
        labelmap.CreateDefaultDisplayNodes()
        labelmap.GetDisplayNode().SetAndObserveColorNodeID(color_table.GetID())  # segment names and colours
        segmentation_node.GetSegmentation().RemoveAllSegments()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap, segmentation_node
        ):
            raise RuntimeError("Slicer could not import the labels into the segmentation.")
    finally:
        scene.RemoveNode(labelmap)
        scene.RemoveNode(color_table)
    segmentation_node.CreateDefaultDisplayNodes()
    follow_transform(segmentation_node, reference_volume)
    return segment_ids(segmentation_node)


def segment_colors(segmentation_node) -> dict[str, tuple[float, float, float]]:
    """Colour of each segment by name, to give predicted segments their annotated segment's colour."""
    segmentation = segmentation_node.GetSegmentation()
    return {
        segmentation.GetNthSegment(i).GetName(): tuple(segmentation.GetNthSegment(i).GetColor())
        for i in range(segmentation.GetNumberOfSegments())
    }


def palette_color(value: int) -> tuple[float, float, float]:
    return PALETTE[(value - 1) % len(PALETTE)]


def _color_table(scene, names: Sequence[str], colors: dict, value_colors: dict):
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "KAF label names")
    table.SetTypeToUser()
    table.SetNumberOfColors(len(names))
    for value, name in enumerate(names):
        red, green, blue = colors.get(name) or value_colors.get(value) or palette_color(value)
        table.SetColor(value, name, red, green, blue, 0.0 if value == 0 else 1.0)
    return table


def update_keypoints(markups_node, keypoints: list[Keypoint], slice_index: int, volume_node) -> None:
    """Show the keypoints of a slice as the control points of `markups_node`, labelled by index."""
    positions = keypoints_to_ras(keypoints, slice_index, ijk_to_ras(volume_node))
    was_modifying = markups_node.StartModify()
    markups_node.RemoveAllControlPoints()
    for keypoint, position in zip(keypoints, positions, strict=True):
        index = markups_node.AddControlPoint(*position, str(keypoint.index))
        markups_node.SetNthControlPointDescription(index, f"score {keypoint.score:.4f}")
    markups_node.SetLocked(True)  # keypoints are the model's output: dragging them would mean nothing
    markups_node.EndModify(was_modifying)
    follow_transform(markups_node, volume_node)


def select_keypoint(markups_node, index: int) -> None:
    """Mark one control point as selected (drawn in the selection colour) and the others not."""
    for point in range(markups_node.GetNumberOfControlPoints()):
        markups_node.SetNthControlPointSelected(point, point == index)


def update_attention_volume(volume_node, attention_zyx: np.ndarray, affine: np.ndarray, reference_volume):
    """Put an attention map into a scalar volume node shown with the Inferno colours over [0, 1]."""
    slicer.util.updateVolumeFromArray(volume_node, attention_zyx.astype(np.float32, copy=False))
    set_ijk_to_ras(volume_node, affine)
    if volume_node.GetDisplayNode() is None:
        volume_node.CreateDefaultDisplayNodes()
    display = volume_node.GetDisplayNode()
    display.SetAndObserveColorNodeID(INFERNO_COLOR_ID)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    follow_transform(volume_node, reference_volume)
    return volume_node


def show_as_foreground(volume_node) -> None:
    slicer.util.setSliceViewerLayers(foreground=volume_node, foregroundOpacity=ATTENTION_OPACITY)


def jump_to_slice(volume_node, slice_index: int) -> None:
    """Move the slice views to the centre of axial slice `slice_index` of the volume."""
    center = slice_center_ras(volume_shape(volume_node), slice_index, ijk_to_ras(volume_node))
    slicer.vtkMRMLSliceNode.JumpAllSlices(volume_node.GetScene(), *center)


def follow_transform(node, volume_node) -> None:
    """Place a derived node under the volume's parent transform, so both move together."""
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
