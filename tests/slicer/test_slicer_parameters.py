"""Tier 2: the module's parameter node on real MRML classes: defaults, validation, and a scene saved to an
.mrml file and loaded into a new scene restores every parameter, node references included.
`slicer.parameterNodeWrapper` is the stand-in of fake_parameter_node_wrapper.py (slicer-core lacks it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kafsegment_testing import (
    add_volume,
    load_scene,
    module_parameter_node,
    oblique_affine,
    save_scene,
    save_volume_data,
)

pytestmark = pytest.mark.slicer_core


@pytest.fixture
def parameters(mrml_scene):
    from KAFSegmentLib.parameters import KAFSegmentParameterNode

    return KAFSegmentParameterNode(module_parameter_node(mrml_scene))


def test_defaults_are_written_into_the_node(parameters):
    node = parameters.parameterNode
    assert (parameters.preset, parameters.device, parameters.steps) == ("interactive", "auto", 150)
    assert parameters.inputVolume is None and parameters.model == Path()
    # the strings Slicer's serializers write
    assert node.GetParameter("steps") == "150" and node.GetParameter("predictAfterFinetune") == "True"
    assert node.GetParameter("timeBudget") == "0.0" and node.GetParameter("modelsFolder") == "."


def test_bad_values_are_rejected(parameters):
    with pytest.raises(ValueError, match="huge"):
        parameters.preset = "huge"
    with pytest.raises(ValueError):
        parameters.steps = 0
    with pytest.raises(TypeError):
        parameters.inputVolume = parameters.parameterNode.GetScene().AddNewNodeByClass(
            "vtkMRMLSegmentationNode"
        )
    assert parameters.preset == "interactive" and parameters.steps == 150


def test_parameters_survive_saving_and_loading_the_scene(mrml_scene, parameters, tmp_path):
    voxels = np.random.default_rng(0).random((6, 8, 9)).astype(np.float32)
    volume = add_volume(mrml_scene, voxels, oblique_affine(), "scan")
    annotation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "prediction")
    values = {
        "inputVolume": volume,
        "annotation": annotation,
        "annotationSegment": "Segment_2",
        "onlySelectedSegment": True,
        "startCheckpoint": tmp_path / "start from.safetensors",
        "preset": "paper-chd",
        "device": "cpu",
        "steps": 42,
        "timeBudget": 12.5,
        "predictAfterFinetune": False,
        "modelsFolder": Path("models"),
        "model": tmp_path / "models" / "scan-1.safetensors",
        "outputSegmentation": output,
        "explainSlice": 3,
        "keypoint": 2,
        "attentionLevel": 4,
        "attentionHead": 3,
    }
    assert set(values) == set(parameters.allParameters)  # every parameter is checked
    for name, value in values.items():
        setattr(parameters, name, value)
    save_volume_data(volume, tmp_path / "scene" / "scan.nrrd")
    save_scene(mrml_scene, tmp_path / "scene" / "scene.mrml")

    from KAFSegmentLib.parameters import KAFSegmentParameterNode

    loaded = load_scene(tmp_path / "scene" / "scene.mrml")
    restored = KAFSegmentParameterNode(module_parameter_node(loaded))
    assert restored.parameterNode.GetScene() is loaded
    for name, value in values.items():
        if name in ("inputVolume", "annotation", "outputSegmentation"):
            node = getattr(restored, name)
            assert node.GetScene() is loaded and (node.GetID(), node.GetName()) == (
                value.GetID(),
                value.GetName(),
            )
        else:
            assert getattr(restored, name) == value, name
    import slicer

    np.testing.assert_array_equal(slicer.util.arrayFromVolume(restored.inputVolume), voxels)
    assert Path(loaded.GetRootDirectory()) == tmp_path / "scene"


def test_a_loaded_scene_without_the_module_node_gets_the_defaults(mrml_scene, tmp_path):
    from KAFSegmentLib.parameters import KAFSegmentParameterNode

    add_volume(mrml_scene, np.zeros((2, 3, 4), np.float32), np.eye(4))
    save_scene(mrml_scene, tmp_path / "scene.mrml")
    loaded = load_scene(tmp_path / "scene.mrml")
    restored = KAFSegmentParameterNode(module_parameter_node(loaded))
    assert restored.steps == 150 and restored.inputVolume is None
