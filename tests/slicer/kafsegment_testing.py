"""Shared data of the Slicer module tests: an oblique geometry, a small two-class annotation, a way to add a
volume node, the module's parameter node, and saving and loading a scene the way Slicer does.
(A plain module, not a conftest: tests/ has two conftest files.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NAMES = ["background", "anterior", "posterior"]


def oblique_affine() -> np.ndarray:
    """Spacing (0.7, 0.8, 3) mm, rotated about two axes, shifted: like an oblique MRI acquisition."""
    a, b = np.radians(25), np.radians(-10)
    about_s = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_r = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = about_s @ about_r @ np.diag([0.7, 0.8, 3.0])
    affine[:3, 3] = [-31.5, 12.25, 40.0]
    return affine


def two_class_labels(shape=(6, 8, 9)) -> np.ndarray:
    """Label 1 painted on slices 1 and 4, label 2 on slice 4."""
    labels = np.zeros(shape, np.uint8)
    labels[1, 2:5, 3:7] = 1
    labels[4, 4:7, 1:4] = 2
    labels[4, 1, 1] = 1
    return labels


def add_volume(scene, array: np.ndarray, affine: np.ndarray, name: str = "volume"):
    import slicer

    assert slicer.mrmlScene is scene
    return slicer.util.addVolumeFromArray(array, affine, name)


def module_parameter_node(scene, module_name: str = "KAFSegment"):
    """What ScriptedLoadableModuleLogic.getParameterNode returns: the scene's vtkMRMLScriptedModuleNode whose
    singleton tag is the module's name, added on first use."""
    node = scene.GetSingletonNode(module_name, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # CreateNodeByClass returns a new reference; the scene keeps its own
        node.SetSingletonTag(module_name)
        node.SetName(module_name)
        node.SetAttribute("ModuleName", module_name)
        scene.AddNode(node)
    return node


def save_volume_data(volume, path: Path) -> None:
    """Write a volume's voxels and point its storage node at the file, as saving data in Slicer does."""
    storage = volume.CreateDefaultStorageNode()
    volume.GetScene().AddNode(storage)
    volume.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.WriteData(volume)


def save_scene(scene, path: Path) -> None:
    """Write the scene's .mrml file; its folder becomes the scene's root directory, as in Slicer."""
    scene.SetRootDirectory(str(path.parent))
    scene.SetURL(str(path))
    assert scene.Commit()


def load_scene(path: Path):
    """A new scene read from a .mrml file (with the data its storage nodes name)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    scene.SetURL(str(path))
    assert scene.Connect()
    return scene
