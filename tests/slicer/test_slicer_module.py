"""Tier 3: KAFSegment.py imported with stub Slicer modules, and static checks of the extension's files.

The stubs (`qt`, `ctk`, `vtk`, `slicer`, `slicer.util`, `slicer.ScriptedLoadableModule`) exist only inside
the `module` fixture: it saves sys.modules and puts it back, so that the tier-2 tests keep the real
`slicer` of slicer-core. The stub `slicer` borrows the real MRML classes and a real scene from slicer-core,
and the parameterNodeWrapper stand-in, so the widget's parameter node is a real vtkMRMLScriptedModuleNode.
"""

from __future__ import annotations

import ast
import re
import struct
import sys
import unittest
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace
from unittest.mock import MagicMock

import fake_parameter_node_wrapper
import pytest
from kafsegment_testing import module_parameter_node

REPO = Path(__file__).resolve().parents[2]
EXTENSION_DIR = REPO / "slicer_module"
MODULE_DIR = EXTENSION_DIR / "KAFSegment"
MODULE_FILE = MODULE_DIR / "KAFSegment.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "KAFSegment.ui"
QT_CLASSES = {
    "QWidget",
    "QLabel",
    "QPushButton",
    "QCheckBox",
    "QComboBox",
    "QSpinBox",
    "QDoubleSpinBox",
    "QProgressBar",
}


def ui_object_names() -> list[str]:
    return [widget.get("name") for widget in ET.parse(UI_FILE).getroot().iter("widget")]


def ui_parameter_widgets() -> dict[str, tuple[str, str]]:
    """objectName -> (class, SlicerParameterName) of the widgets bound to a parameter."""
    bound = {}
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = (widget.get("class"), prop.findtext("string"))
    return bound


class StubObservationMixin:
    def __init__(self) -> None:
        self.observers = []

    def addObserver(self, caller, event, method) -> None:
        self.observers.append((caller, event, method))

    def removeObserver(self, caller, event, method) -> None:
        self.observers.remove((caller, event, method))

    def removeObservers(self) -> None:
        self.observers.clear()


class StubModule:
    def __init__(self, parent) -> None:
        self.parent = parent


class StubWidget:
    def __init__(self, parent=None) -> None:
        self.parent = parent
        self.layout = MagicMock(name="layout")

    def setup(self) -> None:
        pass

    def resourcePath(self, filename: str) -> str:
        return str(MODULE_DIR / "Resources" / filename)


class StubLogic:
    def __init__(self, parent=None) -> None:
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        return module_parameter_node(sys.modules["slicer"].mrmlScene, self.moduleName)


def stub_slicer(tmp_path: Path, shown_errors: list, real_slicer) -> ModuleType:
    slicer = ModuleType("slicer")
    for name in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode"):
        setattr(slicer, name, getattr(real_slicer, name))
    slicer.parameterNodeWrapper = fake_parameter_node_wrapper
    slicer.util = MagicMock(name="slicer.util")
    slicer.util.VTKObservationMixin = StubObservationMixin
    slicer.util.settingsValue.return_value = ""
    slicer.util.startupEnvironment.return_value = {}

    @contextmanager
    def try_with_error_display(message, waitCursor=False):
        try:
            yield
        except Exception as error:
            shown_errors.append((message, error))

    slicer.util.tryWithErrorDisplay = try_with_error_display
    layout_manager = MagicMock(name="layoutManager")
    layout_manager.sliceViewNames.return_value = ["Red", "Green"]
    slice_widgets = {name: MagicMock(name=f"{name} slice widget") for name in ("Red", "Green")}
    layout_manager.sliceWidget.side_effect = slice_widgets.get
    slicer.app = SimpleNamespace(temporaryPath=str(tmp_path), layoutManager=lambda: layout_manager)
    slicer.mrmlScene = real_slicer.vtkMRMLScene()
    slicer.modules = MagicMock(name="slicer.modules")
    scripted = ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = StubModule
    scripted.ScriptedLoadableModuleWidget = StubWidget
    scripted.ScriptedLoadableModuleLogic = StubLogic
    scripted.ScriptedLoadableModuleTest = unittest.TestCase
    slicer.ScriptedLoadableModule = scripted
    return slicer


@pytest.fixture
def module(tmp_path, slicer_core):
    """KAFSegment.py imported under stubs; `module.shown_errors` collects tryWithErrorDisplay's errors."""
    saved = dict(sys.modules)
    for name in [name for name in sys.modules if name.startswith(("KAFSegment", "slicer", "vtk"))]:
        del sys.modules[name]  # import the module's own files afresh, against the stubs
    shown_errors = []
    slicer = stub_slicer(tmp_path, shown_errors, slicer_core)
    sys.modules.update(
        {
            "slicer": slicer,
            "slicer.util": slicer.util,
            "slicer.ScriptedLoadableModule": slicer.ScriptedLoadableModule,
            "slicer.parameterNodeWrapper": slicer.parameterNodeWrapper,
            "qt": MagicMock(name="qt"),
            "ctk": MagicMock(name="ctk"),
            "vtk": MagicMock(name="vtk"),
        }
    )
    try:
        import KAFSegment  # the module folder is on sys.path (conftest.py)

        KAFSegment.shown_errors = shown_errors
        yield KAFSegment
    finally:
        sys.modules.clear()
        sys.modules.update(saved)


def stub_widget(name: str, parameter: str | None) -> MagicMock:
    """A MagicMock widget whose SlicerParameterName property is that of the .ui."""
    widget = MagicMock(name=name)
    widget.property.side_effect = lambda key: parameter if key == "SlicerParameterName" else None
    return widget


@pytest.fixture
def widget(module):
    """The widget after setup(), with one MagicMock per objectName of the .ui and nothing more."""
    bound = ui_parameter_widgets()
    ui = SimpleNamespace(
        **{name: stub_widget(name, bound.get(name, (None, None))[1]) for name in ui_object_names()}
    )
    module.slicer.util.childWidgetVariables.return_value = ui
    widget = module.KAFSegmentWidget(SimpleNamespace(isEntered=True))
    widget.setup()
    return widget


def test_module_classes_and_metadata(module):
    parent = MagicMock()
    module.KAFSegment(parent)
    assert parent.title == "KAF Segment" and parent.categories == ["Segmentation"]
    assert issubclass(module.KAFSegmentWidget, StubObservationMixin)
    assert issubclass(module.KAFSegmentLogic, module.KafLogic)
    assert callable(module.KAFSegmentTest.runTest)


def test_logic_works_without_the_widget(module, tmp_path):
    logic = module.KAFSegmentLogic(runner_factory=MagicMock())
    assert logic.work_dir == tmp_path / "KAFSegment"
    logic.use_external_python("/envs/kaf/bin/kaf")
    assert logic.command.prefix == ("/envs/kaf/bin/kaf",)
    assert logic.environment == {}  # Slicer's startup environment, without its PYTHONHOME/PYTHONPATH


def test_widget_setup_uses_only_widgets_of_the_ui_file(widget):
    ui = widget.ui
    assert [call.args for call in ui.presetComboBox.addItem.call_args_list] == [
        ("interactive",),
        ("paper-acdc",),
        ("paper-chd",),
    ]  # filled by the parameter node's GUI connector from the Choice annotation
    ui.finetuneButton.connect.assert_called_once_with("clicked(bool)", widget.onFinetune)
    ui.stopButton.connect.assert_called_once_with("clicked(bool)", widget.onStop)
    events = {event for _, event, _ in widget.observers}
    assert {widget_scene_event("StartCloseEvent"), widget_scene_event("EndCloseEvent")} <= events


def widget_scene_event(name: str) -> int:
    return getattr(sys.modules["slicer"].mrmlScene, name)


def test_the_gui_is_bound_to_the_parameter_node_while_the_module_is_shown(module, widget):
    ui, parameters = widget.ui, widget._parameterNode
    assert isinstance(parameters, module.KAFSegmentParameterNode)
    assert ui.stepsSpinBox.value == 150 and ui.predictAfterFinetuneCheckBox.checked is True

    ui.stepsSpinBox.value = 7  # the user edits; Qt emits valueChanged
    changed = ui.stepsSpinBox.valueChanged.connect.call_args.args[0]
    changed(7)
    assert parameters.steps == 7
    parameters.device = "cpu"  # e.g. a loaded scene: the GUI follows
    assert ui.deviceComboBox.currentIndex == 1

    widget.exit()
    parameters.steps = 9
    assert ui.stepsSpinBox.value == 7 and widget._parameterNode is parameters  # kept for running jobs
    widget.enter()
    assert ui.stepsSpinBox.value == 9 and widget._parameterNode.parameterNode is parameters.parameterNode


def test_the_annotation_selector_is_synchronised_by_hand(module, widget):
    scene = module.slicer.mrmlScene
    annotation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
    widget.onAnnotationChanged(annotation)
    widget.onAnnotationSegmentChanged("Segment_1")
    parameters = widget._parameterNode
    assert parameters.annotation is annotation and parameters.annotationSegment == "Segment_1"
    widget.onParameterNodeModified()
    widget.ui.annotationSelector.setCurrentNode.assert_called_with(annotation)


def test_closing_the_scene_unbinds_and_reopening_binds_a_new_parameter_node(module, widget):
    first = widget._parameterNode.parameterNode
    widget.onSceneStartClose(None, None)
    assert widget._parameterNode is None
    from KAFSegmentLib.progress import JobOutcome, JobStatus

    widget.onJobFinished(JobOutcome("finetune", JobStatus.STOPPED, "stopped"))  # the stopped job ends later
    module.slicer.mrmlScene.Clear(1)
    widget.onSceneEndClose(None, None)
    assert widget._parameterNode is not None and widget._parameterNode.parameterNode is not first


def test_jobs_take_their_inputs_from_the_parameter_node(widget):
    widget.logic.finetune_with = MagicMock()
    widget.logic.predict_with = MagicMock()
    widget.onFinetune()
    widget.onPredict()
    widget.logic.finetune_with.assert_called_once_with(widget._parameterNode)
    widget.logic.predict_with.assert_called_once_with(widget._parameterNode)


def test_install_runs_in_the_background_and_blocks_jobs_until_it_ends(module, widget):
    from KAFSegmentLib.install import PipStep

    widget.installer.start = MagicMock()
    widget.onInstallDependencies()
    (plan,), _ = widget.installer.start.call_args
    assert hasattr(plan, "__next__")  # a plan of steps, run one by one by the installer

    widget.installer._plan = plan  # as if running
    widget.updateButtons()
    assert widget.ui.installDependenciesButton.enabled is False and widget.ui.stopButton.enabled is True
    widget.onInstallStep(PipStep(["torch"], ["torch>=2.4"]))
    assert widget.ui.statusLabel.text.startswith("Installing torch;")
    widget.installer._plan = None
    widget.onInstallFinished(False, "pip install torch>=2.4 failed (exit code 1): no space left")
    module.slicer.util.errorDisplay.assert_called_once_with(
        "pip install torch>=2.4 failed (exit code 1): no space left",
        windowTitle="KAF Segment: installation failed",
    )
    assert widget.ui.installDependenciesButton.enabled is True


def test_user_errors_are_shown_not_raised(module, widget):
    widget.onFinetune()
    widget.onPredict()
    (message, error), (_, also) = module.shown_errors
    assert message == "Fine-tuning could not start." and str(error) == "Choose a volume that has voxels."
    assert str(also) == "Choose a volume that has voxels."


def test_finished_jobs_update_the_widget(module, widget):
    from KAFSegmentLib.progress import JobOutcome, JobStatus

    failed = JobOutcome("predict", JobStatus.FAILED, "labels.nii: no annotated slice")
    widget.onJobFinished(failed)
    module.slicer.util.errorDisplay.assert_called_once_with(
        "labels.nii: no annotated slice", windowTitle="KAF Segment: predict failed"
    )
    assert widget.ui.statusLabel.text == "kaf predict failed."

    widget.onPredict = MagicMock()
    assert widget._parameterNode.predictAfterFinetune  # the default
    widget.onWarning("Running on the CPU")
    widget.onJobFinished(JobOutcome("finetune", JobStatus.SUCCEEDED, "Fine-tuned model saved to /m"))
    widget.onPredict.assert_called_once_with()
    assert widget.ui.statusLabel.text == "Fine-tuned model saved to /m\nWarning: Running on the CPU"


def test_pick_by_clicking_observes_the_slice_views_only_while_checked(module, widget):
    layout_manager = module.slicer.app.layoutManager()
    layout_manager.layoutChanged.connect.assert_called_once_with(widget.onLayoutChanged)
    interactors = [layout_manager.sliceWidget(name).sliceView().interactor() for name in ("Red", "Green")]
    assert not interactors[0].AddObserver.called  # unchecked: clicks do what they always did

    toggled = widget.ui.pickKeypointCheckBox.connect.call_args
    assert toggled.args == ("toggled(bool)", widget.onPickByClickingToggled)
    widget.onPickByClickingToggled(True)
    events = [call.args[0] for call in interactors[0].AddObserver.call_args_list]
    command = module.vtk.vtkCommand
    assert events == [command.LeftButtonPressEvent, command.LeftButtonReleaseEvent]
    assert widget.clicks.active and widget.ui.statusLabel.text.startswith("Click a keypoint")

    widget.onLayoutChanged(2)  # a new layout: observed again, not twice
    assert interactors[0].RemoveObserver.call_count == 2
    widget.onPickByClickingToggled(False)
    assert not widget.clicks.active and interactors[0].RemoveObserver.call_count == 4
    widget.cleanup()
    layout_manager.layoutChanged.disconnect.assert_called_once_with(widget.onLayoutChanged)


@pytest.mark.parametrize(
    ("pick", "model", "then", "status"),
    [
        ((3, True, 1, 0.5), "model", "attention", "Keypoint 1 of slice 3 (0.5 mm from the click)"),
        ((5, False, None, None), "model", "keypoints", "Showing the keypoints of slice 5"),
        ((5, False, None, None), None, None, "No model yet"),
        ((3, True, None, 9.0), "model", None, "No keypoint within 6.0 mm of the click on slice 3."),
        ((None, False, None, None), "model", None, "The click is outside the volume."),
    ],
)
def test_a_click_shows_the_picked_keypoints_attention(module, widget, tmp_path, pick, model, then, status):
    from KAFSegmentLib.volumes import KeypointPick

    parameters = widget._parameterNode
    parameters.inputVolume = module.slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    if model:
        parameters.model = tmp_path / "model.safetensors"
    widget.logic.pick_with = MagicMock(return_value=KeypointPick(*pick))
    widget.onShowAttention, widget.onShowKeypoints = MagicMock(), MagicMock()
    slice_node = MagicMock()
    slice_node.GetFieldOfView.return_value = (250.0, 200.0, 1.0)
    slice_node.GetDimensions.return_value = (500, 400, 1)  # 0.5 mm per pixel: 12 pixels are 6 mm
    widget.onSliceViewClicked([1.0, 2.0, 3.0], slice_node)

    widget.logic.pick_with.assert_called_once_with(parameters, [1.0, 2.0, 3.0], 6.0)
    assert widget.onShowAttention.called == (then == "attention")
    assert widget.onShowKeypoints.called == (then == "keypoints")
    assert widget.ui.statusLabel.text.startswith(status)


def test_clicks_wait_while_a_job_runs(module, widget):
    widget._parameterNode.inputVolume = module.slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    widget.logic._job = MagicMock()  # busy
    widget.logic.pick_with = MagicMock()
    widget.onSliceViewClicked([0.0, 0.0, 0.0], MagicMock())
    assert not widget.logic.pick_with.called and widget.ui.statusLabel.text.startswith("A job is running")


# --- static checks ----------------------------------------------------------------------------------------

# The widget classes Slicer's parameterNodeWrapper GUI connectors bind (Base/Python/slicer/
# parameterNodeWrapper/guiConnectors.py), by parameter type; connectGui fails on any other pair.
SLICER_CONNECTORS = {
    "QCheckBox": {bool},
    "QSpinBox": {int},
    "QDoubleSpinBox": {float},
    "QComboBox": {str, int, float, bool},  # with a Choice annotation
    "ctkPathLineEdit": {Path},
    "qMRMLNodeComboBox": {"node"},
}
BOUND_BY_HAND = {"annotation", "annotationSegment"}  # qMRMLSegmentSelectorWidget has no connector


def test_every_bound_widget_fits_a_slicer_gui_connector(slicer_core):
    import typing

    from KAFSegmentLib.parameters import KAFSegmentParameterNode

    hints = typing.get_type_hints(KAFSegmentParameterNode, include_extras=True)
    bound = ui_parameter_widgets()
    names = [parameter for _, parameter in bound.values()]
    assert len(names) == len(set(names)), "a parameter is bound to two widgets"
    assert set(names) == set(hints) - BOUND_BY_HAND
    for object_name, (widget_class, parameter) in bound.items():
        parameter_type, *annotations = typing.get_args(hints[parameter]) or (hints[parameter],)
        kind = "node" if fake_parameter_node_wrapper.is_node_type(parameter_type) else parameter_type
        assert kind in SLICER_CONNECTORS[widget_class], object_name
        kinds = {type(annotation).__name__ for annotation in annotations}
        if widget_class == "QComboBox":
            assert "Choice" in kinds, f"{parameter}: Slicer's combo box connector needs Choice"
        if widget_class in ("QSpinBox", "QDoubleSpinBox"):  # else Slicer widens the range to +-2**31 or inf
            assert kinds & {"WithinRange", "Minimum"}, f"{parameter}: give the spin box's range"


def test_every_ui_name_the_code_reads_exists_in_the_ui_file():
    names = set(ui_object_names())
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used and used <= names, f"not in {UI_FILE.name}: {sorted(used - names)}"
    assert len(names) == len(ui_object_names()), "objectNames must be unique"


def test_ui_file_declares_its_slicer_widgets_and_connects_the_scene():
    root = ET.parse(UI_FILE).getroot()
    assert root.find("widget").get("class") == "qMRMLWidget"
    used = {widget.get("class") for widget in root.iter("widget")} - QT_CLASSES
    declared = {custom.findtext("class") for custom in root.iter("customwidget")}
    assert used <= declared
    scene_receivers = {
        connection.findtext("receiver")
        for connection in root.iter("connection")
        if connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
    }
    mrml_widgets = {
        widget.get("name") for widget in root.iter("widget") if widget.get("class").startswith("qMRML")
    }
    assert scene_receivers == mrml_widgets - {"KAFSegment"}


def cmake_list(text: str, variable: str) -> set[str]:
    body = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)[1]
    return {item.replace("${MODULE_NAME}", "KAFSegment") for item in body.split()}


def test_cmake_lists_every_script_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = {str(path.relative_to(MODULE_DIR)) for path in MODULE_DIR.rglob("*.py")}
    resources = {
        str(path.relative_to(MODULE_DIR)) for path in (MODULE_DIR / "Resources").rglob("*") if path.is_file()
    }
    assert cmake_list(text, "MODULE_PYTHON_SCRIPTS") == scripts
    assert cmake_list(text, "MODULE_PYTHON_RESOURCES") == resources
    assert {
        "Resources/Icons/KAFSegment.png",
        "Resources/UI/KAFSegment.ui",
        "Resources/requirements.txt",
    } <= resources
    assert "WITH_GENERIC_TESTS" in text
    assert re.search(
        r"if\(BUILD_TESTING\)\s+(#.*\n\s*)*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text
    )


def test_extension_cmake_has_the_wizard_layout():
    text = (EXTENSION_DIR / "CMakeLists.txt").read_text()
    assert "project(KAFSegment)" in text
    for key in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert re.search(r'set\(EXTENSION_DEPENDS "(NA|PyTorch)"\)', text)
    order = ["find_package(Slicer REQUIRED)", "add_subdirectory(KAFSegment)", "## NEXT_MODULE"]
    order += ["include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    assert [text.index(line) for line in order] == sorted(text.index(line) for line in order)


# Properties of Slicer's extension catalog entry schema (Slicer/Slicer Schemas/
# slicer-extension-catalog-entry-schema-v1.0.1.json): the first three are required, no others allowed.
INDEX_REQUIRED = {"$schema", "category", "scm_url"}
INDEX_OPTIONAL = {"scm_revision", "scm_type", "build_dependencies", "build_subdirectory", "enabled", "tier"}


def cmake_value(text: str, variable: str) -> str:
    return re.search(rf'set\({variable}\s+"([^"]*)"\)', text)[1]


def test_extensions_index_entry_matches_the_extension_and_names_files_it_has():
    """KAFSegment.json, the file to submit to Slicer's ExtensionsIndex: the schema's fields, and the same
    name, category, dependencies and repository as the extension's CMakeLists.txt, whose icon and
    screenshot URLs are files of this extension folder in that repository at that revision."""
    import json

    entry = json.loads((EXTENSION_DIR / "KAFSegment.json").read_text())
    assert INDEX_REQUIRED <= set(entry) <= INDEX_REQUIRED | INDEX_OPTIONAL
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/")
    text = (EXTENSION_DIR / "CMakeLists.txt").read_text()
    assert re.search(r"^project\((\w+)\)", text, re.M)[1] == "KAFSegment"  # the entry's file name
    assert entry["category"] == cmake_value(text, "EXTENSION_CATEGORY") == "Segmentation"
    assert entry["build_dependencies"] == cmake_value(text, "EXTENSION_DEPENDS").split()
    assert entry["build_subdirectory"] == "." and entry["tier"] == 1

    repository = entry["scm_url"]
    assert repository.startswith("https://") and not repository.endswith(("/", ".git"))
    assert cmake_value(text, "EXTENSION_HOMEPAGE") == repository
    files = f"{repository}/raw/{entry['scm_revision']}/"
    icon = cmake_value(text, "EXTENSION_ICONURL")
    screenshots = cmake_value(text, "EXTENSION_SCREENSHOTURLS").split()
    assert icon == files + "KAFSegment/Resources/Icons/KAFSegment.png" and screenshots
    for url in [icon, *screenshots]:
        assert url.startswith(files), url
        path = EXTENSION_DIR / url.removeprefix(files)
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url


def test_test_class_has_run_test_and_helpers_import_no_slicer_or_qt():
    tree = ast.parse(MODULE_FILE.read_text())
    test_class = next(
        node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "KAFSegmentTest"
    )
    assert "runTest" in {node.name for node in test_class.body if isinstance(node, ast.FunctionDef)}
    for name in ("signal", "progress", "process", "command", "volumes", "install"):
        source = ast.parse((MODULE_DIR / "KAFSegmentLib" / f"{name}.py").read_text())
        top_level = [node for node in source.body if isinstance(node, ast.Import | ast.ImportFrom)]
        imported = {alias.name for node in top_level for alias in node.names} | {
            node.module for node in top_level if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not imported & {"slicer", "qt", "ctk", "vtk", "nibabel"}, name


def test_requirements_name_the_core_distribution():
    from KAFSegmentLib.install import CORE_DISTRIBUTION

    project = (REPO / "pyproject.toml").read_text().split("[project]", 1)[1]
    distribution = re.search(r'^name\s*=\s*"([^"]+)"', project, re.M)[1]  # tomllib needs Python 3.11
    assert distribution == CORE_DISTRIBUTION
    requirements = (MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()
    assert distribution in [line.strip() for line in requirements]


def test_icon_is_a_128_pixel_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "KAFSegment.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def test_the_slicer_runner_is_documented():
    readme = (EXTENSION_DIR / "README.md").read_text()
    assert "--python-script slicer_module/run_slicer_tests.py" in readme
    assert "--additional-module-paths slicer_module/KAFSegment" in readme
    runner = (EXTENSION_DIR / "run_slicer_tests.py").read_text()
    assert "KAFSegmentTest().runTest()" in runner and "slicer.util.exit(" in runner
