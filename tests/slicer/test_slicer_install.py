"""Tier 1: what "Install dependencies" installs (the plan), and how it runs: pip as child processes, one
step after another, here a fake pip run by SubprocessRunner."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
from KAFSegmentLib import install
from KAFSegmentLib.install import (
    CORE_DISTRIBUTION,
    PYTORCH_CPU_INDEX,
    PYTORCH_CUDA_INDEX,
    TORCH_REQUIREMENT,
    InstallError,
    PipInstall,
    PipStep,
    install_plan,
    missing_requirements,
    read_requirements,
    requirement_name,
    torch_pip_arguments,
)
from KAFSegmentLib.process import SubprocessRunner

REQUIREMENTS = (
    Path(__file__).resolve().parents[2] / "slicer_module" / "KAFSegment" / "Resources" / "requirements.txt"
)


@pytest.fixture
def plan(monkeypatch):
    """`install_plan` with only NumPy installed, no NVIDIA GPU and no PyTorch extension."""
    monkeypatch.setattr(install, "is_installed", lambda name: name == "numpy")
    monkeypatch.setattr(install, "has_nvidia_gpu", lambda: False)
    monkeypatch.setattr(install, "has_pytorch_utils", lambda: False)
    return lambda **options: list(install_plan(REQUIREMENTS, **options))


def test_with_an_external_python_slicer_only_needs_nibabel(plan):
    assert plan(external_python=True, project_source="") == [PipStep(["nibabel"], ["nibabel>=5.2"])]


def test_full_install_torch_first_then_the_core_without_replacing_anything(plan, tmp_path):
    steps = plan(external_python=False, project_source=str(tmp_path))
    assert steps[0].arguments == ["nibabel>=5.2"]
    assert steps[1] == PipStep(["torch"], [TORCH_REQUIREMENT, "--index-url", PYTORCH_CPU_INDEX])
    assert steps[2] == PipStep([CORE_DISTRIBUTION], ["--no-deps", str(tmp_path)])
    core_dependencies = steps[3].names
    assert "numpy" not in core_dependencies and "monai" in core_dependencies  # installed ones are kept


def test_the_core_needs_a_folder_or_wheel_to_install_from(plan):
    with pytest.raises(InstallError, match="Choose the KAF Segment project folder"):
        plan(external_python=False, project_source="")


def test_pytorch_utils_is_used_when_the_extension_is_there(plan, monkeypatch):
    monkeypatch.setattr(install, "has_pytorch_utils", lambda: True)
    logic = MagicMock(name="PyTorchUtilsLogic")
    logic.return_value.installTorch.return_value = None  # the user cancelled
    monkeypatch.setitem(sys.modules, "PyTorchUtils", SimpleNamespace(PyTorchUtilsLogic=logic))
    with pytest.raises(InstallError, match="cancelled"):
        plan(external_python=False, project_source="")
    logic.return_value.installTorch.assert_called_once_with(
        askConfirmation=True, torchVersionRequirement=">=2.4"
    )


# --- pip as a child process, with a fake pip ---------------------------------------------------------------

FAKE_PIP = """
import sys, time
requirement = sys.argv[2]
print("Collecting", requirement, flush=True)
time.sleep(0.2)
if requirement == "broken":
    print("ERROR: No matching distribution found for broken", file=sys.stderr, flush=True)
    sys.exit(1)
print("Successfully installed", requirement, flush=True)
"""


@pytest.fixture
def installer(tmp_path):
    """(PipInstall running a fake pip with SubprocessRunner, its runners, what it reported)."""
    script = tmp_path / "fake_pip.py"
    script.write_text(FAKE_PIP)
    runners: list[SubprocessRunner] = []

    def new_runner() -> SubprocessRunner:
        runners.append(SubprocessRunner())
        return runners[-1]

    pip = PipInstall([sys.executable, str(script)], new_runner)
    reported = SimpleNamespace(steps=[], lines=[], finished=[])
    pip.step.connect(reported.steps.append)
    pip.line.connect(reported.lines.append)
    pip.finished.connect(lambda *outcome: reported.finished.append(outcome))
    return pip, runners, reported


def run_to_the_end(pip, runners) -> None:
    """Deliver the processes' output as Slicer's event loop would, until the install has ended."""
    deadline = time.monotonic() + 30
    while pip.running and time.monotonic() < deadline:
        runners[-1].process_events(timeout=0.05)


def test_pip_runs_step_after_step_without_blocking_and_streams_its_lines(installer):
    pip, runners, reported = installer
    steps = [PipStep(["nibabel"], ["nibabel>=5.2"]), PipStep(["torch"], ["torch>=2.4"])]
    pip.start(iter(steps))
    assert pip.running and runners[0].running and reported.lines == []  # start returned at once
    run_to_the_end(pip, runners)
    assert reported.steps == steps and len(runners) == 2
    assert reported.lines == [
        "Collecting nibabel>=5.2",
        "Successfully installed nibabel>=5.2",
        "Collecting torch>=2.4",
        "Successfully installed torch>=2.4",
    ]
    assert reported.finished == [(True, "Installed nibabel, torch.")]


def test_a_failing_step_ends_the_install_with_pips_message(installer):
    pip, runners, reported = installer
    pip.start(iter([PipStep(["broken"], ["broken"]), PipStep(["torch"], ["torch>=2.4"])]))
    run_to_the_end(pip, runners)
    assert len(runners) == 1 and not pip.running
    ((succeeded, message),) = reported.finished
    assert not succeeded and message == (
        "pip install broken failed (exit code 1): ERROR: No matching distribution found for broken"
    )


def test_stop_and_plan_errors_end_the_install(installer):
    pip, runners, reported = installer
    pip.start(iter([PipStep(["torch"], ["torch>=2.4"])]))
    pip.stop()
    run_to_the_end(pip, runners)
    assert reported.finished == [(False, "Installation stopped.")]

    def no_source():
        raise InstallError("Choose the KAF Segment project folder or a wheel (.whl) to install from.")
        yield

    pip.start(no_source())
    assert reported.finished[-1] == (
        False,
        "Choose the KAF Segment project folder or a wheel (.whl) to install from.",
    )
    pip.start(iter([]))
    assert reported.finished[-1] == (True, "Everything is installed.") and len(runners) == 1


def test_requirement_names():
    assert requirement_name("nibabel>=5.2") == "nibabel"
    assert requirement_name("scikit-image>=0.22 ; python_version >= '3.10'") == "scikit-image"
    assert requirement_name("# a comment") is None
    assert requirement_name("--index-url https://example.org") is None


def test_only_missing_requirements_are_installed_and_extras_are_skipped():
    installed = {"numpy", "torch"}
    requirements = ["numpy>=1.26", "torch>=2.4", "monai>=1.4", 'napari[pyqt6]>=0.5; extra == "napari"']
    assert missing_requirements(requirements, installed.__contains__) == ["monai>=1.4"]


@pytest.mark.parametrize(
    ("system", "nvidia", "expected"),
    [
        ("Linux", True, [TORCH_REQUIREMENT]),
        ("Linux", False, [TORCH_REQUIREMENT, "--index-url", PYTORCH_CPU_INDEX]),
        ("Windows", True, [TORCH_REQUIREMENT, "--index-url", PYTORCH_CUDA_INDEX]),
        ("Windows", False, [TORCH_REQUIREMENT, "--index-url", PYTORCH_CPU_INDEX]),
        ("Darwin", False, [TORCH_REQUIREMENT]),
    ],
)
def test_torch_build_fits_the_machine(system, nvidia, expected):
    assert torch_pip_arguments(system, nvidia) == expected


def test_module_requirements_name_nibabel_and_the_core():
    names = [requirement_name(line) for line in read_requirements(REQUIREMENTS)]
    assert names == ["nibabel", CORE_DISTRIBUTION]
