"""Tier 3: KAFSegment.py imported with stub Slicer modules, and static checks of the extension's files.

The stubs (`qt`, `ctk`, `vtk`, `slicer`, `slicer.util`, `slicer.ScriptedLoadableModule`) exist only inside
the `module` fixture: it saves sys.modules and puts it back, so that the tier-2 tests keep the real
`slicer` of slicer-core.
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

import pytest

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


class StubObservationMixin:
    def __init__(self) -> None:
        self.observers = []

    def addObserver(self, caller, event, method) -> None:
        self.observers.append((caller, event, method))

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
        pass


def stub_slicer(tmp_path: Path, shown_errors: list) -> ModuleType:
    slicer = ModuleType("slicer")
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
    slicer.app = SimpleNamespace(temporaryPath=str(tmp_path))
    slicer.mrmlScene = MagicMock(name="mrmlScene")
    slicer.modules = MagicMock(name="slicer.modules")
    scripted = ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = StubModule
    scripted.ScriptedLoadableModuleWidget = StubWidget
    scripted.ScriptedLoadableModuleLogic = StubLogic
    scripted.ScriptedLoadableModuleTest = unittest.TestCase
    slicer.ScriptedLoadableModule = scripted
    return slicer


@pytest.fixture
def module(tmp_path):
    """KAFSegment.py imported under stubs; `module.shown_errors` collects tryWithErrorDisplay's errors."""
    saved = dict(sys.modules)
    for name in [name for name in sys.modules if name.startswith(("KAFSegment", "slicer", "vtk"))]:
        del sys.modules[name]  # import the module's own files afresh, against the stubs
    shown_errors = []
    slicer = stub_slicer(tmp_path, shown_errors)
    sys.modules.update(
        {
            "slicer": slicer,
            "slicer.util": slicer.util,
            "slicer.ScriptedLoadableModule": slicer.ScriptedLoadableModule,
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


@pytest.fixture
def widget(module):
    """The widget after setup(), with one MagicMock per objectName of the .ui and nothing more."""
    ui = SimpleNamespace(**{name: MagicMock(name=name) for name in ui_object_names()})
    module.slicer.util.childWidgetVariables.return_value = ui
    widget = module.KAFSegmentWidget()
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
    ui.presetComboBox.addItems.assert_called_once_with(["interactive", "paper-acdc", "paper-chd"])
    ui.finetuneButton.connect.assert_called_once_with("clicked(bool)", widget.onFinetune)
    ui.stopButton.connect.assert_called_once_with("clicked(bool)", widget.onStop)
    assert widget.observers  # scene-close observer


def test_user_errors_are_shown_not_raised(module, widget):
    widget.ui.inputVolumeSelector.currentNode.return_value = None
    widget.onFinetune()
    widget.onPredict()
    (message, error), (_, also) = module.shown_errors
    assert message == "Fine-tuning could not start." and str(error) == "Choose a volume first."
    assert str(also) == "Choose a volume first."


def test_finished_jobs_update_the_widget(module, widget):
    from KAFSegmentLib.progress import JobOutcome, JobStatus

    failed = JobOutcome("predict", JobStatus.FAILED, "labels.nii: no annotated slice")
    widget.onJobFinished(failed)
    module.slicer.util.errorDisplay.assert_called_once_with(
        "labels.nii: no annotated slice", windowTitle="KAF Segment: predict failed"
    )
    assert widget.ui.statusLabel.text == "kaf predict failed."

    widget.onPredict = MagicMock()
    widget.ui.predictAfterFinetuneCheckBox.checked = True
    widget.onWarning("Running on the CPU")
    widget.onJobFinished(JobOutcome("finetune", JobStatus.SUCCEEDED, "Fine-tuned model saved to /m"))
    widget.onPredict.assert_called_once_with()
    assert widget.ui.statusLabel.text == "Fine-tuned model saved to /m\nWarning: Running on the CPU"


# --- static checks ----------------------------------------------------------------------------------------


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
