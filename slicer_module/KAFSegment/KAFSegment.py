"""KAF Segment: paint a few slices, fine-tune a KAF model on them, segment the whole volume, and inspect
the model's keypoints and attention. The work is done by the `kaf` command line, run as a QProcess."""

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import qt
import slicer
from KAFSegmentLib import install, mrml
from KAFSegmentLib.command import DEVICES, EXTERNAL_PYTHON_SETTING, PRESETS, FinetuneOptions, resolve_command
from KAFSegmentLib.logic import KafLogic, KafSegmentError
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
keypoints of a slice as control points; <b>Show attention</b> overlays where one of them attends.
The work runs in the <code>kaf</code> command line; install it from the <i>Setup</i> section, or point
the module at a Python that has it.
"""
        self.parent.acknowledgementText = """
KAF: Z. Yang, M. Ren, K. Ding, G. Gerig, Y. Wang, Keypoint-Augmented Self-Supervised Learning for Medical
Image Segmentation with Limited Annotation, NeurIPS 2023.
"""


def external_python_setting() -> str:
    return slicer.util.settingsValue(EXTERNAL_PYTHON_SETTING, "") or ""


#
# KAFSegmentWidget
#


class KAFSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
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

        self.ui.presetComboBox.addItems(list(PRESETS))
        self.ui.deviceComboBox.addItems(list(DEVICES))
        self.ui.externalPythonPathLineEdit.currentPath = external_python_setting()

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        self.ui.annotationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.paintButton.connect("clicked(bool)", self.onPaint)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onCheckpointChanged)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.predictButton.connect("clicked(bool)", self.onPredict)
        self.ui.showKeypointsButton.connect("clicked(bool)", self.onShowKeypoints)
        self.ui.keypointSpinBox.connect("valueChanged(int)", self.onKeypointChanged)
        self.ui.attentionLevelSpinBox.connect("valueChanged(int)", self.onAttentionChoiceChanged)
        self.ui.attentionHeadSpinBox.connect("valueChanged(int)", self.onAttentionChoiceChanged)
        self.ui.showAttentionButton.connect("clicked(bool)", self.onShowAttention)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.externalPythonPathLineEdit.connect(
            "currentPathChanged(QString)", self.onExternalPythonChanged
        )
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.onVolumeChanged()

    def cleanup(self):
        self.removeObservers()
        self.logic.stop()  # a module reload or application exit must not leave kaf running

    def enter(self):
        self.updateButtons()

    def onSceneStartClose(self, caller, event):
        self.logic.stop()

    # --- inputs

    def _volume(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        if volume is None:
            raise KafSegmentError("Choose a volume first.")
        return volume

    def _annotation(self):
        annotation = self.ui.annotationSelector.currentNode()
        if annotation is None:
            raise KafSegmentError(
                "Choose the annotation segmentation, or create one with Paint in Segment Editor."
            )
        return annotation

    def _segment_ids(self):
        """The segments to learn: the selected one when asked for, else all (None)."""
        if not self.ui.onlySelectedSegmentCheckBox.checked:
            return None
        segment_id = self.ui.annotationSelector.currentSegmentID()
        if not segment_id:
            raise KafSegmentError("Select the segment to fine-tune on.")
        return [segment_id]

    def _finetune_options(self) -> FinetuneOptions:
        return FinetuneOptions(
            preset=self.ui.presetComboBox.currentText,
            device=self.ui.deviceComboBox.currentText,
            steps=self.ui.stepsSpinBox.value,
            time_budget=self.ui.timeBudgetSpinBox.value or None,  # 0 shows as "none"
            checkpoint=self.ui.checkpointPathLineEdit.currentPath or None,
        )

    # --- actions

    def onVolumeChanged(self, node=None):
        volume = self.ui.inputVolumeSelector.currentNode()
        if volume is not None and volume.GetImageData() is not None:
            self.ui.explainSliceSpinBox.maximum = volume.GetImageData().GetDimensions()[2] - 1
        self.updateButtons()

    def onPaint(self):
        with slicer.util.tryWithErrorDisplay("Could not open the Segment Editor.", waitCursor=True):
            volume = self._volume()
            annotation = self.ui.annotationSelector.currentNode() or self._new_annotation(volume)
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
        self.ui.annotationSelector.setCurrentNode(annotation)
        return annotation

    def onCheckpointChanged(self, path):
        """A fine-tuned checkpoint chosen here becomes the model for Predict and Show keypoints."""
        if path and Path(path).is_file():
            self.logic.model_path = Path(path)
        self.updateButtons()

    def _start_job(self, what: str, start) -> None:
        self._warning = ""
        with slicer.util.tryWithErrorDisplay(f"{what} could not start.", waitCursor=True):
            start()
        self.updateButtons()

    def onFinetune(self):
        self._start_job(
            "Fine-tuning",
            lambda: self.logic.finetune(
                self._volume(), self._annotation(), self._segment_ids(), self._finetune_options()
            ),
        )

    def onPredict(self):
        self._start_job(
            "Prediction",
            lambda: self.logic.predict(
                self._volume(),
                self.ui.outputSegmentationSelector.currentNode(),
                self.ui.deviceComboBox.currentText,
                self.ui.annotationSelector.currentNode(),
            ),
        )

    def onShowKeypoints(self):
        self.ui.keypointSpinBox.value = 0
        self._explain(keypoint=0)

    def _explain(self, keypoint: int):
        self._start_job(
            "Explaining",
            lambda: self.logic.explain(
                self._volume(),
                self.ui.explainSliceSpinBox.value,
                keypoint,
                self.ui.deviceComboBox.currentText,
            ),
        )

    def _explanation_is_current(self) -> bool:
        explanation = self.logic.explanation
        return explanation is not None and explanation.matches(
            self.ui.inputVolumeSelector.currentNode(),
            self.logic.model_path,
            self.ui.explainSliceSpinBox.value,
            self.ui.keypointSpinBox.value,
        )

    def onShowAttention(self):
        if self._explanation_is_current():
            self._show_attention()
            return
        self._attention_wanted = True  # the attention of another keypoint or slice needs a new explain run
        self._explain(keypoint=self.ui.keypointSpinBox.value)
        if not self.logic.busy:
            self._attention_wanted = False

    def _show_attention(self):
        with slicer.util.tryWithErrorDisplay("Could not show the attention map."):
            self.logic.show_attention(self.ui.attentionLevelSpinBox.value, self.ui.attentionHeadSpinBox.value)

    def onKeypointChanged(self, index):
        self.logic.select_keypoint(index)

    def onAttentionChoiceChanged(self, value):
        if self.logic.attention_node is not None and self._explanation_is_current():
            self._show_attention()  # the files are there: switching level or head is immediate

    def onStop(self):
        self.logic.stop()

    def onExternalPythonChanged(self, path):
        qt.QSettings().setValue(EXTERNAL_PYTHON_SETTING, path)
        self.logic.use_external_python(path)

    def onInstallDependencies(self):
        with slicer.util.tryWithErrorDisplay("Installing the dependencies failed.", waitCursor=True):
            self.showStatus("Installing; this can take minutes…")
            installed = install.install_all(
                Path(self.resourcePath("requirements.txt")),
                external_python=bool(self.ui.externalPythonPathLineEdit.currentPath),
                project_source=self.ui.projectPathLineEdit.currentPath,
            )
            self.showStatus(f"Installed {', '.join(installed)}." if installed else "Everything is installed.")

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
        if outcome.job == "finetune" and self.ui.predictAfterFinetuneCheckBox.checked:
            self.onPredict()
        elif outcome.job == "predict":
            self.ui.outputSegmentationSelector.setCurrentNode(self.logic.prediction_node)
        elif outcome.job == "explain":
            self._after_explain()

    def _after_explain(self):
        explanation = self.logic.explanation
        self.ui.keypointSpinBox.maximum = max(len(explanation.keypoints) - 1, 0)
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
        busy = self.logic.busy
        has_volume = self.ui.inputVolumeSelector.currentNode() is not None
        has_model = self.logic.model_path is not None
        self.ui.finetuneButton.enabled = (
            not busy and has_volume and self.ui.annotationSelector.currentNode() is not None
        )
        for button in (self.ui.predictButton, self.ui.showKeypointsButton, self.ui.showAttentionButton):
            button.enabled = not busy and has_volume and has_model
        self.ui.stopButton.enabled = busy
        self.ui.installDependenciesButton.enabled = not busy
        self.ui.modelLabel.text = str(self.logic.model_path) if has_model else "none yet"


#
# KAFSegmentLogic
#


class KAFSegmentLogic(ScriptedLoadableModuleLogic, KafLogic):
    """`KafLogic` inside Slicer: jobs run as QProcess, files go to Slicer's temporary folder, and kaf runs
    from Slicer's Python or from the external Python of the module's setting. Usable without the widget:

        logic = KAFSegmentLogic()
        logic.finished.connect(print)
        logic.finetune(volumeNode, segmentationNode, None, FinetuneOptions(steps=50))
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

    def test_finetune_predict(self):
        logic = KAFSegmentLogic()
        if not install.is_installed("nibabel") or not (
            external_python_setting() or install.is_installed(install.CORE_DISTRIBUTION)
        ):
            logging.warning("KAFSegmentTest: kaf or nibabel is not installed; fine-tune/predict skipped")
            return
        volume, annotation = _synthetic_case()
        outcome = self._run(logic, lambda: logic.finetune(volume, annotation, None, FinetuneOptions(steps=2)))
        self.assertTrue(outcome.succeeded, outcome.message)
        outcome = self._run(logic, lambda: logic.predict(volume))
        self.assertTrue(outcome.succeeded, outcome.message)
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
