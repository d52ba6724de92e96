"""KAF Segment: paint a few slices, fine-tune a KAF model on them, segment the whole volume, and inspect
the model's keypoints and attention. The work is done by the `kaf` command line, run as a QProcess."""

import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import qt
import slicer
import vtk
from KAFSegmentLib import install, mrml
from KAFSegmentLib.clicks import SliceViewClicks, millimetres_per_pixel
from KAFSegmentLib.command import EXTERNAL_PYTHON_SETTING, resolve_command
from KAFSegmentLib.logic import PICK_RADIUS_MM, KafLogic, KafSegmentError, chosen_file
from KAFSegmentLib.parameters import KAFSegmentParameterNode
from KAFSegmentLib.process import QProcessRunner
from KAFSegmentLib.progress import JobOutcome, JobStatus, ProgressUpdate
from KAFSegmentLib.volumes import Keypoint, read_nifti
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#
# KAFSegment
#


class KAFSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "KAF Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["KAF Segment developers"]
        self.parent.helpText = """
Segment a structure from a few painted slices. Paint it on two or more slices with the Segment Editor,
press <b>Fine-tune</b>, then <b>Predict</b> to segment every slice. <b>Show keypoints</b> places the model's
keypoints of a slice as control points; <b>Show attention</b> overlays where one of them attends. With
<b>Pick keypoint by clicking</b>, a click on a keypoint in a slice view shows its attention.
The work runs in the <code>kaf</code> command line; install it from the <i>Setup</i> section, or point
the module at a Python that has it.
"""
        self.parent.acknowledgementText = """
KAF: Z. Yang, M. Ren, K. Ding, G. Gerig, Y. Wang, Keypoint-Augmented Self-Supervised Learning for Medical
Image Segmentation with Limited Annotation, NeurIPS 2023.
"""


def slicer_pip_command() -> list[str]:
    """pip of Slicer's Python, run as a child process like slicer.util.pip_install does."""
    return [shutil.which("PythonSlicer") or sys.executable, "-m", "pip"]


PICK_RADIUS_PX = 12  # a click picks a keypoint drawn this close on screen (at least PICK_RADIUS_MM)


def slice_views() -> list:
    """(interactor, slice node) of every slice view of the current layout (none without a main window)."""
    layout_manager = slicer.app.layoutManager()
    views = []
    for name in layout_manager.sliceViewNames() if layout_manager else ():
        slice_widget = layout_manager.sliceWidget(name)
        views.append((slice_widget.sliceView().interactor(), slice_widget.mrmlSliceNode()))
    return views


def external_python_setting() -> str:
    return slicer.util.settingsValue(EXTERNAL_PYTHON_SETTING, "") or ""


#
# KAFSegmentWidget
#


class KAFSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module's panel. Its inputs and settings live in the parameter node (`KAFSegmentParameterNode`),
    bound to the widgets by their SlicerParameterName, so a saved scene restores them; the jobs read them
    from there. The annotation selector has no Slicer GUI connector, so it is synchronised here."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self._parameterNode: KAFSegmentParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._attention_wanted = False  # show the attention once the running explain has finished
        self._status = ""
        self._warning = ""  # the CLI's last warning (e.g. running on the CPU), shown until the next job

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/KAFSegment.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)

        self.logic = KAFSegmentLogic()
        self.logic.progress.connect(self.onProgress)
        self.logic.message.connect(self.showStatus)
        self.logic.warning.connect(self.onWarning)
        self.logic.finished.connect(self.onJobFinished)
        self.installer = install.PipInstall(slicer_pip_command(), QProcessRunner)
        self.installer.step.connect(self.onInstallStep)
        self.installer.line.connect(self.showStatus)
        self.installer.finished.connect(self.onInstallFinished)

        self.ui.externalPythonPathLineEdit.currentPath = external_python_setting()

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        self.ui.annotationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onAnnotationChanged)
        self.ui.annotationSelector.connect("currentSegmentChanged(QString)", self.onAnnotationSegmentChanged)
        self.ui.paintButton.connect("clicked(bool)", self.onPaint)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.predictButton.connect("clicked(bool)", self.onPredict)
        self.ui.showKeypointsButton.connect("clicked(bool)", self.onShowKeypoints)
        self.ui.keypointSpinBox.connect("valueChanged(int)", self.onKeypointChanged)
        self.ui.attentionLevelSpinBox.connect("valueChanged(int)", self.onAttentionChoiceChanged)
        self.ui.attentionHeadSpinBox.connect("valueChanged(int)", self.onAttentionChoiceChanged)
        self.ui.showAttentionButton.connect("clicked(bool)", self.onShowAttention)
        self.clicks = SliceViewClicks(self.onSliceViewClicked)
        self.ui.pickKeypointCheckBox.connect("toggled(bool)", self.onPickByClickingToggled)
        if slicer.app.layoutManager():  # none with --no-main-window
            slicer.app.layoutManager().layoutChanged.connect(self.onLayoutChanged)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.externalPythonPathLineEdit.connect(
            "currentPathChanged(QString)", self.onExternalPythonChanged
        )
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        self.clicks.stop()
        if slicer.app.layoutManager():
            slicer.app.layoutManager().layoutChanged.disconnect(self.onLayoutChanged)
        self.logic.stop()  # a module reload or application exit must not leave kaf or pip running
        self.installer.stop()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # The GUI is bound only while shown; jobs running meanwhile still read the parameter node.
        self._disconnectGui()

    def onSceneStartClose(self, caller, event):
        self.logic.stop()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node

    def initializeParameterNode(self):
        """Bind the GUI to the scene's parameter node (made on first use), choosing a volume if none is."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first_volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first_volume:
                self._parameterNode.inputVolume = first_volume

    def _disconnectGui(self):
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified
            )

    def setParameterNode(self, parameter_node: KAFSegmentParameterNode | None):
        self._disconnectGui()
        self._parameterNode = parameter_node
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        parameters = self._parameterNode
        selector = self.ui.annotationSelector
        if selector.currentNode() != parameters.annotation:
            selector.setCurrentNode(parameters.annotation)
        if parameters.annotationSegment and selector.currentSegmentID() != parameters.annotationSegment:
            selector.setCurrentSegmentID(parameters.annotationSegment)
        self._update_ranges()
        self.updateButtons()

    def _update_ranges(self):
        """Limits that depend on the scene, set after binding (Slicer's connectors set the annotated ones)."""
        volume = self._parameterNode.inputVolume
        if volume is not None and volume.GetImageData() is not None:
            self.ui.explainSliceSpinBox.maximum = volume.GetImageData().GetDimensions()[2] - 1
        explanation = self.logic.explanation
        if explanation is not None:
            self.ui.keypointSpinBox.maximum = max(len(explanation.keypoints) - 1, 0)
            if explanation.levels:  # a level the model has no KAF layer at would show nothing
                self._parameterNode.attentionLevel = explanation.level_nearest(
                    self._parameterNode.attentionLevel
                )

    def onAnnotationChanged(self, node):
        if self._parameterNode:
            self._parameterNode.annotation = node

    def onAnnotationSegmentChanged(self, segment_id):
        if self._parameterNode:
            self._parameterNode.annotationSegment = segment_id or ""

    # --- actions

    def onVolumeChanged(self, node=None):
        if self._parameterNode:
            self._update_ranges()

    def onPaint(self):
        with slicer.util.tryWithErrorDisplay("Could not open the Segment Editor.", waitCursor=True):
            volume = self._parameterNode.inputVolume
            if volume is None:
                raise KafSegmentError("Choose a volume first.")
            annotation = self._parameterNode.annotation or self._new_annotation(volume)
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(annotation)
            set_source = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode  # < 5.2
            set_source(volume)

    def _new_annotation(self, volume):
        annotation = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", f"{volume.GetName()} annotation"
        )
        annotation.CreateDefaultDisplayNodes()
        annotation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        annotation.GetSegmentation().AddEmptySegment("", "structure")
        self._parameterNode.annotation = annotation
        return annotation

    def _start_job(self, what: str, start) -> None:
        self._warning = ""
        with slicer.util.tryWithErrorDisplay(f"{what} could not start.", waitCursor=True):
            start(self._parameterNode)
        self.updateButtons()

    def onFinetune(self):
        self._start_job("Fine-tuning", self.logic.finetune_with)

    def onPredict(self):
        self._start_job("Prediction", self.logic.predict_with)

    def onShowKeypoints(self):
        self._parameterNode.keypoint = 0
        self._start_job("Explaining", self.logic.explain_with)

    def _explanation_is_current(self) -> bool:
        explanation = self.logic.explanation
        parameters = self._parameterNode
        return explanation is not None and explanation.matches(
            parameters.inputVolume,
            chosen_file(parameters.model),
            parameters.explainSlice,
            parameters.keypoint,
        )

    def onShowAttention(self):
        if self._explanation_is_current():
            self._show_attention()
            return
        self._attention_wanted = True  # the attention of another keypoint or slice needs a new explain run
        self._start_job("Explaining", self.logic.explain_with)
        if not self.logic.busy:
            self._attention_wanted = False

    def _show_attention(self):
        with slicer.util.tryWithErrorDisplay("Could not show the attention map."):
            self.logic.show_attention(self._parameterNode.attentionLevel, self._parameterNode.attentionHead)

    def onKeypointChanged(self, index):
        self.logic.select_keypoint(index)

    def onPickByClickingToggled(self, checked):
        if checked:
            self.clicks.observe(slice_views())
            self.showStatus("Click a keypoint in a slice view to see its attention.")
        else:
            self.clicks.stop()

    def onLayoutChanged(self, *unused):
        if self.clicks.active:  # a new layout may bring new slice views
            self.clicks.observe(slice_views())

    def onSliceViewClicked(self, ras, slice_node):
        """Pick the keypoint under a click (see `KafLogic.pick_with`) and show its attention; on a slice
        whose keypoints are not shown yet, show them first."""
        if self._parameterNode is None or self._parameterNode.inputVolume is None:
            return
        if self.logic.busy:
            self.showStatus("A job is running: click again when it has finished.")
            return
        radius = max(PICK_RADIUS_MM, PICK_RADIUS_PX * millimetres_per_pixel(slice_node))
        pick = None
        with slicer.util.tryWithErrorDisplay("Could not pick a keypoint."):
            pick = self.logic.pick_with(self._parameterNode, ras, radius)
        if pick is None:
            return
        self.showStatus(pick.describe(radius))
        if pick.keypoint is not None:
            self.onShowAttention()
        elif pick.slice_index is not None and not pick.explained:
            if chosen_file(self._parameterNode.model) is None:
                self.showStatus("No model yet: fine-tune first, or choose a fine-tuned checkpoint.")
            else:
                self.onShowKeypoints()

    def onAttentionChoiceChanged(self, value):
        if self.logic.attention_node is not None and self._explanation_is_current():
            self._show_attention()  # the files are there: switching level or head is immediate

    def onStop(self):
        self.logic.stop()
        self.installer.stop()

    def onExternalPythonChanged(self, path):
        # An application setting, not a scene parameter: it names a Python on this computer.
        qt.QSettings().setValue(EXTERNAL_PYTHON_SETTING, path)
        self.logic.use_external_python(path)

    def onInstallDependencies(self):
        with slicer.util.tryWithErrorDisplay("Installing the dependencies failed."):
            self.installer.start(
                install.install_plan(
                    Path(self.resourcePath("requirements.txt")),
                    external_python=bool(self.ui.externalPythonPathLineEdit.currentPath),
                    project_source=self.ui.projectPathLineEdit.currentPath,
                )
            )
        self.updateButtons()

    def onInstallStep(self, step: install.PipStep):
        self.showStatus(f"Installing {', '.join(step.names)}; this can take minutes…")

    def onInstallFinished(self, succeeded: bool, message: str):
        self.showStatus(message)
        if not succeeded:
            slicer.util.errorDisplay(message, windowTitle="KAF Segment: installation failed")
        self.updateButtons()

    # --- job notifications

    def onProgress(self, update: ProgressUpdate):
        self.ui.progressBar.maximum = max(update.total, 1)
        self.ui.progressBar.value = update.step
        self.showStatus(update.describe())

    def onJobFinished(self, outcome: JobOutcome):
        self.ui.progressBar.value = self.ui.progressBar.maximum if outcome.succeeded else 0
        self.updateButtons()
        self.showStatus(
            outcome.message if outcome.status is not JobStatus.FAILED else f"kaf {outcome.job} failed."
        )
        if outcome.status is JobStatus.FAILED:
            slicer.util.errorDisplay(outcome.message, windowTitle=f"KAF Segment: {outcome.job} failed")
        if not outcome.succeeded:
            self._attention_wanted = False
            return
        if outcome.job == "finetune" and self._parameterNode and self._parameterNode.predictAfterFinetune:
            self.onPredict()
        elif outcome.job == "explain":
            self._after_explain()

    def _after_explain(self):
        explanation = self.logic.explanation
        self._update_ranges()
        mrml.jump_to_slice(explanation.volume_node, explanation.slice_index)
        if self._attention_wanted:
            self._attention_wanted = False
            self._show_attention()

    def onWarning(self, text: str):
        self._warning = text
        self.showStatus(self._status)

    def showStatus(self, text: str):
        self._status = text
        self.ui.statusLabel.text = f"{text}\nWarning: {self._warning}" if self._warning else text

    def updateButtons(self, *unused):
        busy = self.logic.busy or self.installer.running  # kaf must not run while pip replaces it
        parameters = self._parameterNode
        has_volume = parameters is not None and parameters.inputVolume is not None
        has_model = has_volume and chosen_file(parameters.model) is not None
        self.ui.finetuneButton.enabled = not busy and has_volume and parameters.annotation is not None
        for button in (self.ui.predictButton, self.ui.showKeypointsButton, self.ui.showAttentionButton):
            button.enabled = not busy and has_model
        self.ui.stopButton.enabled = busy
        self.ui.installDependenciesButton.enabled = not busy


#
# KAFSegmentLogic
#


class KAFSegmentLogic(ScriptedLoadableModuleLogic, KafLogic):
    """`KafLogic` inside Slicer: jobs run as QProcess, their files go to Slicer's temporary folder, models
    beside the scene (the parameter node's models folder), and kaf runs from Slicer's Python or from the
    external Python of the module's setting. Usable without the widget:

        logic = KAFSegmentLogic()
        logic.finished.connect(print)
        parameters = logic.getParameterNode()
        parameters.inputVolume, parameters.annotation, parameters.steps = volumeNode, segmentationNode, 50
        logic.finetune_with(parameters)
    """

    def __init__(self, runner_factory=QProcessRunner):
        ScriptedLoadableModuleLogic.__init__(self)
        KafLogic.__init__(self, None, runner_factory, Path(slicer.app.temporaryPath) / "KAFSegment")
        self.use_external_python(external_python_setting())

    def use_external_python(self, path: str) -> None:
        self.command = resolve_command(path, shutil.which("PythonSlicer"))
        # An external Python must not see Slicer's PYTHONHOME and PYTHONPATH: give it the environment
        # Slicer was started with. Slicer's own Python needs the current one.
        self.environment = slicer.util.startupEnvironment() if path else None

    def getParameterNode(self) -> KAFSegmentParameterNode:
        """The scene's parameter node of the module, typed; made on first use."""
        return KAFSegmentParameterNode(super().getParameterNode())


#
# KAFSegmentTest
#


class KAFSegmentTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, ctest, or slicer_module/run_slicer_tests.py). The kaf round trip
    needs nibabel and kaf in Slicer's Python (or the external Python setting) and is skipped otherwise."""

    JOB_TIMEOUT_S = 600

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_volume_round_trip()
        self.setUp()
        self.test_keypoints_become_control_points()
        self.setUp()
        self.test_parameter_node_survives_saving_and_loading_the_scene()
        self.setUp()
        self.test_finetune_predict()

    def test_volume_round_trip(self):
        if not install.is_installed("nibabel"):
            logging.warning("KAFSegmentTest: nibabel is not installed; volume round trip skipped")
            return
        affine = _oblique_affine()
        voxels = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
        volume = slicer.util.addVolumeFromArray(voxels, affine, "round trip")
        with tempfile.TemporaryDirectory() as folder:
            array, read_affine = read_nifti(mrml.export_volume(volume, Path(folder) / "volume.nii"))
        np.testing.assert_array_equal(array, voxels)
        np.testing.assert_allclose(read_affine, affine, atol=1e-4)

    def test_keypoints_become_control_points(self):
        affine = _oblique_affine()
        volume = slicer.util.addVolumeFromArray(np.zeros((5, 6, 7), np.float32), affine, "keypoints")
        markups = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        keypoints = [Keypoint(0, 2.0, 3.5, 0.9), Keypoint(1, 4.25, 1.0, 0.5)]
        mrml.update_keypoints(markups, keypoints, 3, volume)
        positions = slicer.util.arrayFromMarkupsControlPoints(markups)
        expected = [affine @ [3.5, 2.0, 3, 1], affine @ [1.0, 4.25, 3, 1]]
        np.testing.assert_allclose(positions, np.array(expected)[:, :3], atol=1e-6)

    def test_parameter_node_survives_saving_and_loading_the_scene(self):
        logic = KAFSegmentLogic()
        volume, annotation = _synthetic_case()
        parameters = logic.getParameterNode()
        self.assertEqual(
            (parameters.steps, parameters.preset, parameters.model), (150, "interactive", Path())
        )
        parameters.inputVolume, parameters.annotation = volume, annotation
        parameters.preset, parameters.device, parameters.steps, parameters.timeBudget = (
            "paper-acdc",
            "cpu",
            7,
            30.0,
        )
        parameters.predictAfterFinetune, parameters.modelsFolder = False, Path("models")
        expected = {name: parameters.getValue(name) for name in parameters.allParameters}
        with tempfile.TemporaryDirectory() as folder:
            slicer.util.saveNode(volume, f"{folder}/volume.nrrd")
            slicer.util.saveNode(annotation, f"{folder}/annotation.seg.nrrd")
            self.assertTrue(slicer.util.saveScene(f"{folder}/scene.mrml"))
            slicer.mrmlScene.Clear()
            slicer.util.loadScene(f"{folder}/scene.mrml")
            restored = logic.getParameterNode()
            self.assertEqual(restored.inputVolume.GetName(), "KAF test volume")
            self.assertEqual(restored.annotation.GetName(), "KAF test annotation")
            for name, value in expected.items():
                if name not in ("inputVolume", "annotation"):
                    self.assertEqual(restored.getValue(name), value, name)
            self.assertEqual(Path(slicer.mrmlScene.GetRootDirectory()).resolve(), Path(folder).resolve())

    def test_finetune_predict(self):
        logic = KAFSegmentLogic()
        if not install.is_installed("nibabel") or not (
            external_python_setting() or install.is_installed(install.CORE_DISTRIBUTION)
        ):
            logging.warning("KAFSegmentTest: kaf or nibabel is not installed; fine-tune/predict skipped")
            return
        volume, annotation = _synthetic_case()
        parameters = logic.getParameterNode()
        parameters.inputVolume, parameters.annotation, parameters.steps = volume, annotation, 2
        root = slicer.mrmlScene.GetRootDirectory()
        with tempfile.TemporaryDirectory() as folder:
            slicer.mrmlScene.SetRootDirectory(folder)  # as if the scene had been saved there
            try:
                outcome = self._run(logic, lambda: logic.finetune_with(parameters))
            finally:
                slicer.mrmlScene.SetRootDirectory(root)
            self.assertTrue(outcome.succeeded, outcome.message)
            self.assertEqual(parameters.model.parent.resolve(), Path(folder).resolve())  # beside the scene
            outcome = self._run(logic, lambda: logic.predict_with(parameters))
        self.assertTrue(outcome.succeeded, outcome.message)
        self.assertIs(parameters.outputSegmentation, logic.prediction_node)
        self.assertGreater(logic.prediction_node.GetSegmentation().GetNumberOfSegments(), 0)

    def _run(self, logic, start) -> JobOutcome:
        """Start a job and let Slicer's event loop deliver the QProcess signals until it ends."""
        outcomes = []
        logic.finished.connect(outcomes.append)
        start()
        deadline = time.monotonic() + self.JOB_TIMEOUT_S
        while not outcomes and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.02)
        logic.finished.disconnect(outcomes.append)
        self.assertTrue(outcomes, f"kaf did not finish within {self.JOB_TIMEOUT_S} s")
        return outcomes[0]


def _oblique_affine() -> np.ndarray:
    """Spacing (0.8, 0.9, 2.5) mm, rotated 30 degrees about the S axis, shifted."""
    angle = np.radians(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-20.0, 15.0, 7.5]
    return affine


def _synthetic_case():
    """A bright disc whose radius changes along z, and an annotation of it on two slices."""
    slices, rows, cols = 8, 40, 40
    r, c = np.mgrid[:rows, :cols]
    disc = np.stack([np.hypot(r - 20, c - 20) < 8 + z for z in range(slices)]).astype(np.uint8)
    image = disc * 100.0 + np.random.default_rng(0).normal(0, 5, disc.shape)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    volume = slicer.util.addVolumeFromArray(image.astype(np.float32), affine, "KAF test volume")
    sparse = np.zeros_like(disc)
    sparse[[2, 5]] = disc[[2, 5]]
    annotation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "KAF test annotation")
    mrml.import_labels(annotation, sparse, affine, volume, ["background", "disc"])
    return volume, annotation
