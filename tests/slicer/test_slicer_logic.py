"""Tier 2: the logic on real MRML classes, first with a fake process (the test plays the CLI), then
end to end with the real `kaf` CLI on an MSD Hippocampus volume."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from kafsegment_testing import NAMES, add_volume, oblique_affine, two_class_labels

from kaf.data.volume_io import read_volume, write_class_maps, write_volume
from kaf.models import preset_config

pytestmark = pytest.mark.slicer_core

JOB_TIMEOUT_S = 240


class FakeRunner:
    """A `ProcessRunner` that records what it was asked to run; the test plays the CLI's part."""

    def __init__(self) -> None:
        self.args: list[str] = []
        self.environment = None
        self.killed = False
        self.on_stdout_line: Callable[[str], None]  # set by the logic
        self.on_stderr_line: Callable[[str], None]
        self.on_finished: Callable[[int], None]

    @property
    def running(self) -> bool:
        return bool(self.args)

    def start(self, args: Sequence[str], environment=None) -> None:
        self.args = list(args)
        self.environment = environment

    def kill(self) -> None:
        self.killed = True

    def option(self, name: str) -> Path:
        """The path given for a command-line option."""
        return Path(self.args[self.args.index(name) + 1])

    def say(self, event: dict) -> None:
        self.on_stdout_line(json.dumps(event))

    def finish(self, exit_code: int = 0, result: dict | None = None, stderr: Sequence[str] = ()) -> None:
        for line in stderr:
            self.on_stderr_line(line)
        if result is not None:
            self.say({"event": "result", **result})
        self.on_finished(exit_code)


class Recorder:
    """Everything the logic tells the widget."""

    def __init__(self, logic) -> None:
        self.progress, self.messages, self.warnings, self.outcomes = [], [], [], []
        logic.progress.connect(self.progress.append)
        logic.message.connect(self.messages.append)
        logic.warning.connect(self.warnings.append)
        logic.finished.connect(self.outcomes.append)


@pytest.fixture
def case(mrml_scene, tmp_path):
    """A volume with an oblique geometry and an annotation of two classes painted on slices 1 and 4, in a
    scene whose folder (where it was saved) is tmp_path/scene."""
    from KAFSegmentLib import mrml

    mrml_scene.SetRootDirectory(str(tmp_path / "scene"))
    volume = add_volume(
        mrml_scene, np.random.default_rng(0).random((6, 8, 9)).astype(np.float32), oblique_affine()
    )
    annotation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "annotation")
    mrml.import_labels(annotation, two_class_labels(), oblique_affine(), volume, NAMES)
    return volume, annotation


@pytest.fixture
def fake(case, tmp_path):
    """(logic, runners, recorder) with fake runners, one per job."""
    from KAFSegmentLib.command import KafCommand
    from KAFSegmentLib.logic import KafLogic

    runners: list[FakeRunner] = []

    def new_runner() -> FakeRunner:
        runners.append(FakeRunner())
        return runners[-1]

    logic = KafLogic(KafCommand(("kaf",)), new_runner, tmp_path / "work", {"OMP_NUM_THREADS": "1"})
    return logic, runners, Recorder(logic)


def test_finetune_exports_the_inputs_reports_progress_and_keeps_the_model(case, fake, tmp_path):
    from KAFSegmentLib.command import FinetuneOptions
    from KAFSegmentLib.progress import JobStatus

    volume, annotation = case
    logic, runners, recorder = fake
    logic.finetune(volume, annotation, None, FinetuneOptions(steps=5, device="cpu"))
    runner = runners[-1]

    assert logic.busy and runner.environment == {"OMP_NUM_THREADS": "1"}
    assert runner.args[:2] == ["kaf", "finetune"] and ",".join(NAMES) in runner.args
    assert recorder.messages == ["Fine-tuning on 2 annotated slice(s): 1, 4"]
    image, labels = read_volume(runner.option("--image")), read_volume(runner.option("--labels"))
    np.testing.assert_array_equal(labels.array, two_class_labels())
    np.testing.assert_allclose(image.affine, oblique_affine(), atol=1e-5)

    runner.say({"event": "progress", "stage": "finetune", "step": 1, "total": 5, "loss": 0.9})
    runner.on_stderr_line("kaf: Running on the CPU: fine-tuning takes about a minute")
    checkpoint = runner.option("--out")
    checkpoint.write_bytes(b"weights")
    runner.finish(0, {"checkpoint": str(checkpoint), "steps": 5})

    assert [update.step for update in recorder.progress] == [1]
    assert recorder.warnings == ["Running on the CPU: fine-tuning takes about a minute"]
    (outcome,) = recorder.outcomes
    assert outcome.status is JobStatus.SUCCEEDED and outcome.job == "finetune"
    assert logic.model_path == checkpoint and checkpoint.parent == tmp_path / "scene"  # beside the scene
    assert not logic.busy and not runner.option("--image").exists()  # job files are removed


def test_one_job_at_a_time_and_stop(case, fake):
    from KAFSegmentLib.command import FinetuneOptions
    from KAFSegmentLib.logic import KafSegmentError
    from KAFSegmentLib.progress import JobStatus

    volume, annotation = case
    logic, runners, recorder = fake
    logic.finetune(volume, annotation, None, FinetuneOptions())
    with pytest.raises(KafSegmentError, match="still running"):
        logic.finetune(volume, annotation, None, FinetuneOptions())

    logic.stop()
    assert runners[-1].killed and recorder.messages[-1] == "Stopping finetune…"
    runners[-1].finish(130, stderr=["kaf: finetune stopped by the user; nothing was written"])
    assert recorder.outcomes[-1].status is JobStatus.STOPPED and not logic.busy
    assert logic.model_path is None


def test_cli_errors_reach_the_user_and_free_the_logic(case, fake):
    from KAFSegmentLib.command import FinetuneOptions
    from KAFSegmentLib.progress import JobStatus

    volume, annotation = case
    logic, runners, recorder = fake
    logic.finetune(volume, annotation, None, FinetuneOptions(checkpoint="/w/other.safetensors"))
    runners[-1].finish(2, stderr=["kaf finetune: error: /w/other.safetensors: made for preset paper-acdc"])
    outcome = recorder.outcomes[-1]
    assert (
        outcome.status is JobStatus.FAILED
        and outcome.message == "/w/other.safetensors: made for preset paper-acdc"
    )
    assert not logic.busy


def test_errors_before_a_job_starts(case, fake, tmp_path):
    from KAFSegmentLib.logic import KafSegmentError

    volume, _ = case
    logic, runners, _ = fake
    with pytest.raises(KafSegmentError, match="No model yet"):
        logic.predict(volume)
    logic.model_path = tmp_path / "model.safetensors"
    logic.model_path.write_bytes(b"weights")
    with pytest.raises(KafSegmentError, match="slices 0 to 5"):
        logic.explain(volume, 6)
    logic.command = None
    with pytest.raises(KafSegmentError, match="command line was not found"):
        logic.predict(volume)
    assert runners == [] and list((tmp_path / "work").glob("*-*")) == []


def test_predict_imports_the_labels_into_a_new_segmentation(case, fake, tmp_path):
    from KAFSegmentLib import mrml

    volume, annotation = case
    logic, runners, recorder = fake
    logic.model_path = tmp_path / "model.safetensors"
    logic.model_path.write_bytes(b"weights")
    logic.predict(volume, None, "cpu", annotation)
    runner = runners[-1]
    predicted = np.roll(two_class_labels(), 1, axis=0)
    write_volume(predicted, read_volume(runner.option("--image")).affine, runner.option("--out"))
    runner.finish(0, {"voxels_per_label": {"background": 400, "anterior": 13, "posterior": 9}})

    assert recorder.outcomes[-1].message == "Segmented: anterior 13 voxels, posterior 9 voxels"
    node = logic.prediction_node
    assert node.GetName() == "volume KAF prediction"
    ids = mrml.segment_ids(node)
    assert mrml.segment_names(node, ids) == ["anterior", "posterior"]
    assert mrml.segment_colors(node) == mrml.segment_colors(annotation)
    np.testing.assert_array_equal(mrml.segments_to_labels(node, ids, volume), predicted)


def test_predicted_segments_take_names_and_colours_from_the_clis_colour_table(case, fake, tmp_path):
    from KAFSegmentLib import mrml

    from kaf.data.volume_io.label_table import PALETTE, label_color, write_label_table

    assert [tuple(round(c * 255) for c in color) for color in mrml.PALETTE] == list(PALETTE)
    volume, annotation = case
    logic, runners, recorder = fake
    logic.model_path = tmp_path / "model.safetensors"
    logic.model_path.write_bytes(b"weights")
    logic.predict(volume, None, "cpu")  # no annotation: every colour from the table
    runner = runners[-1]
    out = runner.option("--out")
    write_volume(two_class_labels(), read_volume(runner.option("--image")).affine, out)
    table = write_label_table(out.parent / "segmentation.csv", ["background", "left lobe", "right lobe"])
    summary = {
        "voxels_per_label": {"background": 400, "label 1": 13, "label 2": 9},
        "label_table": str(table),
    }
    runner.finish(0, summary)

    assert recorder.outcomes[-1].succeeded, recorder.outcomes[-1].message
    node = logic.prediction_node
    ids = mrml.segment_ids(node)
    assert mrml.segment_names(node, ids) == ["left lobe", "right lobe"]  # the table's, not the counts'
    colors = mrml.segment_colors(node)
    for value, name in ((1, "left lobe"), (2, "right lobe")):
        np.testing.assert_allclose(colors[name], np.divide(label_color(value), 255), atol=1 / 255)

    # With the annotation: a segment named like an annotated one keeps its colour, the others the table's.
    segmentation = annotation.GetSegmentation()
    segmentation.GetSegment(mrml.segment_ids(annotation)[0]).SetColor(0.1, 0.2, 0.3)
    logic.predict(volume, None, "cpu", annotation)
    runner = runners[-1]
    out = runner.option("--out")
    write_volume(two_class_labels(), read_volume(runner.option("--image")).affine, out)
    write_label_table(out.parent / "segmentation.csv", ["background", NAMES[1], "other"])
    runner.finish(0, {"voxels_per_label": {"background": 400, "a": 13, "b": 9}})  # table found beside --out
    colors = mrml.segment_colors(logic.prediction_node)
    np.testing.assert_allclose(colors[NAMES[1]], (0.1, 0.2, 0.3), atol=1 / 255)
    np.testing.assert_allclose(colors["other"], np.divide(label_color(2), 255), atol=1 / 255)


def test_results_that_cannot_be_loaded_fail_the_job_cleanly(case, fake, tmp_path):
    from KAFSegmentLib.progress import JobStatus

    volume, _ = case
    logic, runners, recorder = fake
    logic.model_path = tmp_path / "model.safetensors"
    logic.model_path.write_bytes(b"weights")
    logic.predict(volume)
    runners[-1].finish(0, {"voxels_per_label": {}})  # but no segmentation file was written
    outcome = recorder.outcomes[-1]
    assert outcome.status is JobStatus.FAILED and "could not be loaded" in outcome.message
    assert not logic.busy


def test_explain_places_keypoints_and_switches_attention_maps_without_rerunning(case, fake, tmp_path):
    from KAFSegmentLib import mrml
    from KAFSegmentLib.logic import KafSegmentError

    volume, _ = case
    logic, runners, recorder = fake
    logic.model_path = tmp_path / "model.safetensors"
    logic.model_path.write_bytes(b"weights")
    logic.explain(volume, 3, keypoint=1)
    runner = runners[-1]
    out = runner.option("--out")
    (out / "keypoints.csv").write_text("index,row,col,score\n0,2.00,3.00,0.5\n1,6.50,1.25,0.3\n")
    slice_affine = oblique_affine()
    slice_affine[:3, 3] += 3 * slice_affine[:3, 2]
    maps = np.random.default_rng(0).random((2, 4, 1, 8, 9)).astype(np.float32)  # level, head, z, y, x
    for level in (1, 2):
        write_class_maps(maps[level - 1], slice_affine, out / f"attention_level{level}.nii.gz")
    runner.finish(0, {"slice": 3, "keypoints": 2})

    assert recorder.outcomes[-1].message == "2 keypoints on slice 3"
    markups = logic.keypoints_node
    positions = np.array([markups.GetNthControlPointPositionVector(i) for i in range(2)])
    np.testing.assert_allclose(positions[1], (oblique_affine() @ [1.25, 6.5, 3, 1])[:3], atol=1e-9)
    assert [markups.GetNthControlPointSelected(i) for i in range(2)] == [False, True]
    assert logic.explanation.matches(volume, logic.model_path, 3, 1)
    assert not (out / "image.nii").exists() and (out / "keypoints.csv").exists()

    import slicer

    node = logic.show_attention(level=2, head=3)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), maps[1, 3])
    np.testing.assert_allclose(mrml.ijk_to_ras(node), slice_affine, atol=1e-5)
    assert logic.show_attention(level=1, head=0) is node
    assert node.GetName() == "KAF attention (keypoint 1, level 1, head 0)"
    with pytest.raises(KafSegmentError, match="levels with attention: 1, 2"):
        logic.show_attention(level=3, head=0)
    assert [logic.explanation.level_nearest(level) for level in (1, 2, 3, 4)] == [1, 2, 2, 2]
    with pytest.raises(KafSegmentError, match="heads 0 to 3"):
        logic.show_attention(level=1, head=4)
    assert len(runners) == 1


# --- inputs from the parameter node ---------------------------------------------------------------------


@pytest.fixture
def parameters(case):
    """The module's parameter node, holding the case's volume and annotation."""
    from kafsegment_testing import module_parameter_node
    from KAFSegmentLib.parameters import KAFSegmentParameterNode

    volume, annotation = case
    parameters = KAFSegmentParameterNode(module_parameter_node(volume.GetScene()))
    parameters.inputVolume, parameters.annotation = volume, annotation
    return parameters


@pytest.fixture
def parameters_of(mrml_scene):
    """The module's parameter node holding a volume and a model."""
    from kafsegment_testing import module_parameter_node
    from KAFSegmentLib.parameters import KAFSegmentParameterNode

    def make(volume, model: Path):
        parameters = KAFSegmentParameterNode(module_parameter_node(mrml_scene))
        parameters.inputVolume, parameters.model = volume, model
        return parameters

    return make


def test_finetune_with_takes_the_settings_of_the_parameter_node(parameters, fake, tmp_path):
    logic, runners, _ = fake
    parameters.preset, parameters.device, parameters.steps, parameters.timeBudget = (
        "paper-acdc",
        "cpu",
        7,
        0.0,
    )
    parameters.startCheckpoint = tmp_path / "start.safetensors"
    logic.finetune_with(parameters)
    args = runners[-1].args
    assert args[args.index("--preset") + 1] == "paper-acdc" and args[args.index("--device") + 1] == "cpu"
    assert args[args.index("--steps") + 1] == "7" and "--time-budget" not in args  # 0: no budget
    assert runners[-1].option("--checkpoint") == tmp_path / "start.safetensors"
    assert args[args.index("--label-names") + 1] == ",".join(NAMES)

    checkpoint = runners[-1].option("--out")
    checkpoint.write_bytes(b"weights")
    runners[-1].finish(0, {"checkpoint": str(checkpoint)})
    assert checkpoint.parent == tmp_path / "scene"  # the default models folder: beside the scene file
    assert parameters.model == checkpoint  # what Predict will use, saved with the scene


@pytest.mark.parametrize("folder", ["models/kaf", "absolute"])
def test_models_go_to_the_chosen_folder(parameters, fake, tmp_path, folder):
    logic, runners, _ = fake
    chosen = tmp_path / "elsewhere" if folder == "absolute" else Path(folder)
    parameters.modelsFolder = chosen
    logic.finetune_with(parameters)
    out = runners[-1].option("--out")
    assert out.parent == (chosen if chosen.is_absolute() else tmp_path / "scene" / chosen)
    assert out.parent.is_dir() and out.name.startswith("volume-") and out.suffix == ".safetensors"


def test_finetune_with_the_selected_segment_only(parameters, fake):
    from KAFSegmentLib import mrml
    from KAFSegmentLib.logic import KafSegmentError

    logic, runners, _ = fake
    parameters.onlySelectedSegment = True
    with pytest.raises(KafSegmentError, match="Select the segment"):
        logic.finetune_with(parameters)
    parameters.annotationSegment = mrml.segment_ids(parameters.annotation)[1]
    logic.finetune_with(parameters)
    args = runners[-1].args
    assert args[args.index("--label-names") + 1] == "background,posterior"


def test_predict_and_explain_with_use_the_model_and_output_of_the_parameter_node(parameters, fake, tmp_path):
    from KAFSegmentLib.logic import KafSegmentError

    logic, runners, _ = fake
    with pytest.raises(KafSegmentError, match="No model yet"):
        logic.predict_with(parameters)
    parameters.model = tmp_path / "chosen.safetensors"
    parameters.model.write_bytes(b"weights")
    logic.predict_with(parameters)
    runner = runners[-1]
    assert runner.option("--checkpoint") == parameters.model
    write_volume(two_class_labels(), read_volume(runner.option("--image")).affine, runner.option("--out"))
    runner.finish(0, {"voxels_per_label": {"background": 400, "anterior": 13, "posterior": 9}})
    assert parameters.outputSegmentation is logic.prediction_node is not None

    parameters.explainSlice, parameters.keypoint, parameters.device = 4, 2, "cpu"
    logic.explain_with(parameters)
    args = runners[-1].args
    assert [args[args.index(option) + 1] for option in ("--slice", "--keypoint", "--device")] == [
        "4",
        "2",
        "cpu",
    ]
    assert runners[-1].option("--checkpoint") == parameters.model


# --- picking a keypoint by clicking in a slice view --------------------------------------------------------

PICK_SHAPE = (6, 40, 50)  # slices, rows, columns: 28 x 35 mm slices at the oblique spacing
PICKED_KEYPOINTS = "index,row,col,score\n0,5.00,6.00,0.9\n1,30.00,40.00,0.4\n2,31.50,37.25,0.2\n"


@pytest.fixture
def explained(mrml_scene, fake, tmp_path):
    """(logic, runners, volume): slice 3 of a volume with the oblique geometry (spacing 0.7 x 0.8 x 3 mm,
    rotated about two axes, shifted) explained by the fake CLI, with three keypoints and keypoint 0's
    attention."""
    logic, runners, _ = fake
    volume = add_volume(mrml_scene, np.zeros(PICK_SHAPE, np.float32), oblique_affine(), "pick")
    logic.model_path = tmp_path / "model.safetensors"
    logic.model_path.write_bytes(b"weights")
    logic.explain(volume, 3, keypoint=0)
    (runners[-1].option("--out") / "keypoints.csv").write_text(PICKED_KEYPOINTS)
    runners[-1].finish(0, {"slice": 3, "keypoints": 3})
    assert logic.explanation.shows(volume, logic.model_path, 3)
    return logic, runners, volume


def ras_of(slice_index: float, row: float, col: float, affine=None) -> np.ndarray:
    """The RAS position of voxel (i, j, k) = (col, row, slice) of the oblique volume."""
    return ((oblique_affine() if affine is None else affine) @ [col, row, slice_index, 1])[:3]


def test_a_click_on_a_keypoint_picks_it_and_its_attention_follows(explained, parameters_of):
    logic, runners, volume = explained
    parameters = parameters_of(volume, logic.model_path)
    markups = logic.keypoints_node

    pick = logic.pick_with(parameters, ras_of(3, 30.0, 40.0))  # exactly on keypoint 1
    assert (pick.slice_index, pick.explained, pick.keypoint) == (3, True, 1)
    assert pick.distance_mm == pytest.approx(0.0, abs=1e-6)
    assert (parameters.explainSlice, parameters.keypoint) == (3, 1)
    assert [markups.GetNthControlPointSelected(i) for i in range(3)] == [False, True, False]

    # A click near keypoint 2 (1.3 mm from it, 3.3 mm from keypoint 1) and a little off the slice's
    # plane (k = 3.3, inside slice 3) picks keypoint 2: distances are millimetres in the slice's plane.
    pick = logic.pick_with(parameters, ras_of(3.3, 31.0, 35.5))
    assert (pick.slice_index, pick.keypoint) == (3, 2) and pick.distance_mm == pytest.approx(1.3, abs=0.1)

    # The attention shown is that of the picked keypoint: explain runs again for it.
    logic.explain_with(parameters)
    args = runners[-1].args
    assert [args[args.index(option) + 1] for option in ("--slice", "--keypoint")] == ["3", "2"]


def test_a_click_far_from_every_keypoint_picks_none(explained, parameters_of):
    logic, _runners, volume = explained
    parameters = parameters_of(volume, logic.model_path)
    parameters.keypoint = 1
    pick = logic.pick_with(parameters, ras_of(3, 35.0, 5.0))  # 22.7 mm from keypoint 2, 24 from 0 and 1
    assert (pick.slice_index, pick.explained, pick.keypoint) == (3, True, None)
    assert pick.distance_mm == pytest.approx(22.7, abs=0.1)
    assert parameters.keypoint == 1  # unchanged
    assert pick.describe(5.0) == "No keypoint within 5.0 mm of the click on slice 3."
    # A bigger radius (a zoomed-out view) reaches the nearest, keypoint 2.
    assert logic.pick_with(parameters, ras_of(3, 35.0, 5.0), radius_mm=30.0).keypoint == 2


def test_the_slice_follows_the_click(explained, parameters_of):
    logic, runners, volume = explained
    parameters = parameters_of(volume, logic.model_path)
    pick = logic.pick_with(parameters, ras_of(4.6, 30.0, 40.0))  # where keypoint 1 is, two slices on
    assert (pick.slice_index, pick.explained, pick.keypoint) == (5, False, None)
    assert parameters.explainSlice == 5  # what Show keypoints explains next
    assert pick.describe(5.0).startswith("Showing the keypoints of slice 5")
    logic.explain_with(parameters)
    args = runners[-1].args
    assert args[args.index("--slice") + 1] == "5"

    for outside in (ras_of(6.6, 20.0, 20.0), ras_of(-0.6, 20.0, 20.0), ras_of(2, 20.0, 50.0)):
        assert logic.pick_keypoint(volume, outside).slice_index is None
    assert logic.pick_keypoint(volume, ras_of(-0.4, 20.0, 20.0)).slice_index == 0


def test_clicks_on_a_transformed_volume_pick_where_the_keypoints_are_drawn(explained, mrml_scene):
    import vtk

    logic, _runners, volume = explained
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    for row, shift in enumerate((12.0, -7.5, 30.0)):
        matrix.SetElement(row, 3, shift)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    world = ras_of(3, 5.0, 6.0) + np.array([12.0, -7.5, 30.0])
    assert logic.pick_keypoint(volume, world).keypoint == 0
    assert logic.pick_keypoint(volume, ras_of(3, 5.0, 6.0)).slice_index is None  # the untransformed place


def test_an_explanation_by_another_model_or_of_another_volume_is_not_picked_from(explained, mrml_scene):
    logic, _runners, volume = explained
    other_model = logic.model_path.with_name("other.safetensors")
    assert not logic.pick_keypoint(volume, ras_of(3, 5.0, 6.0), model=other_model).explained
    twin = add_volume(mrml_scene, np.zeros(PICK_SHAPE, np.float32), oblique_affine(), "twin")
    assert not logic.pick_keypoint(twin, ras_of(3, 5.0, 6.0)).explained


def test_a_left_click_in_a_slice_view_reaches_the_pick_as_a_ras_position(explained, mrml_scene):
    """The module's click path on real VTK objects: a slice view's interactor, Slicer's conversion from
    display position to RAS, and a press and release; a drag is no click, and stopped observers hear
    nothing."""
    import slicer
    import vtk
    from KAFSegmentLib.clicks import SliceViewClicks, millimetres_per_pixel

    logic, _runners, volume = explained
    slice_node = mrml_scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_node.SetDimensions(200, 100, 1)
    slice_node.SetFieldOfView(100.0, 50.0, 1.0)  # 0.5 mm per pixel
    for axis, value in enumerate(ras_of(3, 30.0, 40.0)):  # an axial view centred on keypoint 1
        slice_node.GetSliceToRAS().SetElement(axis, 3, value)
    slice_node.UpdateMatrices()
    window = vtk.vtkGenericOpenGLRenderWindow()  # no display needed until something renders
    window.SetSize(200, 100)
    window.AddRenderer(vtk.vtkRenderer())
    interactor = vtk.vtkGenericRenderWindowInteractor()
    interactor.SetRenderWindow(window)
    # As qMRMLSliceView sets its interactor up: a vtkInteractorStyleUser, and Slicer's slice view style
    # observing the interactor (VTK's camera styles would grab the mouse and hide the release).
    interactor.SetInteractorStyle(vtk.vtkInteractorStyleUser())
    slice_view_style = slicer.vtkMRMLSliceViewInteractorStyle()
    slice_view_style.SetInteractor(interactor)

    picks = []
    clicks = SliceViewClicks(lambda ras, node: picks.append(logic.pick_keypoint(volume, ras)))
    clicks.observe([(interactor, slice_node)])

    def press_release(press, release):
        interactor.SetEventPosition(*press)
        interactor.InvokeEvent(vtk.vtkCommand.LeftButtonPressEvent)
        interactor.SetEventPosition(*release)
        interactor.InvokeEvent(vtk.vtkCommand.LeftButtonReleaseEvent)

    press_release((100, 50), (101, 49))  # the centre of the view: keypoint 1
    press_release((100, 50), (160, 50))  # a drag
    press_release((70, 30), (70, 30))  # 15 mm and 10 mm off the centre: 16 to 18 mm from every keypoint
    assert [(pick.keypoint, pick.slice_index) for pick in picks] == [(1, 3), (None, 3)]
    assert millimetres_per_pixel(slice_node) == 0.5

    clicks.stop()
    press_release((100, 50), (100, 50))
    assert len(picks) == 2 and not clicks.active


# --- the real CLI ---------------------------------------------------------------------------------------


def kaf_command():
    """The venv's `kaf` executable, else `python -m kaf`, as the module's setting would name them."""
    from KAFSegmentLib.command import resolve_command

    if importlib.util.find_spec("kaf") is None:
        pytest.skip("the kaf core is not installed in this Python")
    beside_python = shutil.which("kaf", path=str(Path(sys.executable).parent))
    return resolve_command(beside_python or sys.executable, None)


def run_job(logic, runner_list, start) -> object:
    """Start a job and deliver the CLI's output until it ends; returns its outcome."""
    outcomes = []
    logic.finished.connect(outcomes.append)
    start()
    assert runner_list[-1].wait(JOB_TIMEOUT_S), f"kaf did not finish within {JOB_TIMEOUT_S} s"
    logic.finished.disconnect(outcomes.append)
    return outcomes[0]


def test_finetune_predict_explain_with_the_real_cli(mrml_scene, shared_data, tmp_path):
    """A real MRI (MSD Hippocampus case 1) with a rotated IJK-to-RAS, two painted slices, 3 steps."""
    import slicer
    from KAFSegmentLib import mrml
    from KAFSegmentLib.command import FinetuneOptions
    from KAFSegmentLib.logic import KafLogic
    from KAFSegmentLib.process import SubprocessRunner
    from KAFSegmentLib.volumes import read_keypoints

    mrml_scene.SetRootDirectory(str(tmp_path))  # the model is saved beside the scene
    image = read_volume(shared_data / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz")
    reference = read_volume(shared_data / "msd_hippocampus" / "labels" / "hippocampus_001.nii.gz")
    affine = oblique_affine() @ np.diag([1 / 0.7, 1 / 0.8, 1 / 3.0, 1.0])  # rotated, 1 mm voxels
    volume = add_volume(mrml_scene, image.array, affine, "hippocampus_001")
    painted = np.flatnonzero(reference.array.any(axis=(1, 2)))
    annotated = [int(painted[len(painted) // 3]), int(painted[2 * len(painted) // 3])]
    sparse = np.zeros_like(reference.array)
    sparse[annotated] = reference.array[annotated]
    annotation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "annotation")
    mrml.import_labels(annotation, sparse.astype(np.uint8), affine, volume, NAMES)

    runners: list[SubprocessRunner] = []
    single_thread = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 shared cores

    def new_runner():
        runners.append(SubprocessRunner())
        return runners[-1]

    logic = KafLogic(kaf_command(), new_runner, tmp_path, single_thread)
    progress = []
    logic.progress.connect(progress.append)

    options = FinetuneOptions(steps=3, device="cpu")
    outcome = run_job(logic, runners, lambda: logic.finetune(volume, annotation, None, options))
    assert outcome.succeeded, outcome.message
    assert outcome.result["annotated_slices"] == annotated and logic.model_path.is_file()
    assert logic.model_path.parent == tmp_path
    assert [update.step for update in progress if update.stage == "finetune"] == [1, 2, 3]

    outcome = run_job(logic, runners, lambda: logic.predict(volume, None, "cpu", annotation))
    assert outcome.succeeded, outcome.message
    prediction = logic.prediction_node
    counts = outcome.result["voxels_per_label"]
    assert list(counts) == NAMES and sum(counts.values()) == image.array.size
    ids = mrml.segment_ids(prediction)
    names = mrml.segment_names(prediction, ids)
    assert names == [name for name in NAMES[1:] if counts[name] > 0]
    labels = mrml.segments_to_labels(prediction, ids, volume)  # back on the volume's grid
    assert labels.shape == image.array.shape
    assert [int((labels == value).sum()) for value in range(1, len(ids) + 1)] == [counts[n] for n in names]

    middle = (annotated[0] + annotated[1]) // 2
    outcome = run_job(logic, runners, lambda: logic.explain(volume, middle, keypoint=0, device="cpu"))
    assert outcome.succeeded, outcome.message
    keypoints = read_keypoints(logic.explanation.folder / "keypoints.csv")
    markups = logic.keypoints_node
    assert markups.GetNumberOfControlPoints() == len(keypoints) == outcome.result["keypoints"] > 0
    ras = np.array([[*markups.GetNthControlPointPositionVector(i), 1] for i in range(len(keypoints))])
    ijk = (np.linalg.inv(affine) @ ras.T).T
    np.testing.assert_allclose(ijk[:, 2], middle, atol=1e-6)  # every keypoint lies on the explained slice
    np.testing.assert_allclose(ijk[:, :2], [[k.col, k.row] for k in keypoints], atol=1e-6)

    level = logic.explanation.level_nearest(1)  # what the module shows when level 1 carries no KAF
    assert level == min(preset_config("interactive").kaf_levels)
    attention = logic.show_attention(level=level, head=0)
    values = slicer.util.arrayFromVolume(attention)
    assert values.shape == (1, *image.array.shape[1:]) and values.max() == pytest.approx(1.0)
    expected_origin = (affine @ [0, 0, middle, 1])[:3]
    np.testing.assert_allclose(mrml.ijk_to_ras(attention)[:3, 3], expected_origin, atol=1e-4)
    np.testing.assert_allclose(mrml.ijk_to_ras(attention)[:3, :3], affine[:3, :3], atol=1e-5)
