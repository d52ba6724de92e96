"""Tier 1: what "Install dependencies" installs, with `slicer.util.pip_install` recorded by a stub."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from unittest.mock import MagicMock

import pytest
from KAFSegmentLib import install
from KAFSegmentLib.install import (
    CORE_DISTRIBUTION,
    PYTORCH_CPU_INDEX,
    PYTORCH_CUDA_INDEX,
    TORCH_REQUIREMENT,
    InstallError,
    install_all,
    missing_requirements,
    read_requirements,
    requirement_name,
    torch_pip_arguments,
)

REQUIREMENTS = (
    Path(__file__).resolve().parents[2] / "slicer_module" / "KAFSegment" / "Resources" / "requirements.txt"
)


@pytest.fixture
def pip(monkeypatch):
    """The pip_install calls, with a stub `slicer` (no PyTorch extension) and only NumPy installed."""
    slicer = ModuleType("slicer")
    slicer.util = SimpleNamespace(pip_install=MagicMock(name="pip_install"))
    slicer.modules = SimpleNamespace()
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    monkeypatch.setattr(install, "is_installed", lambda name: name == "numpy")
    monkeypatch.setattr(install, "has_nvidia_gpu", lambda: False)
    return slicer.util.pip_install


def installed_arguments(pip) -> list[list[str]]:
    return [call.args[0] for call in pip.call_args_list]


def test_with_an_external_python_slicer_only_needs_nibabel(pip):
    assert install_all(REQUIREMENTS, external_python=True, project_source="") == ["nibabel>=5.2"]
    assert installed_arguments(pip) == [["nibabel>=5.2"]]


def test_full_install_torch_first_then_the_core_without_replacing_anything(pip, tmp_path):
    installed = install_all(REQUIREMENTS, external_python=False, project_source=str(tmp_path))
    calls = installed_arguments(pip)
    assert calls[0] == ["nibabel>=5.2"]
    assert calls[1][0] == TORCH_REQUIREMENT
    assert calls[2] == ["--no-deps", str(tmp_path)]
    core_dependencies = calls[3]
    assert not any(requirement_name(line) == "numpy" for line in core_dependencies)  # installed: kept
    assert "monai" in {requirement_name(line) for line in core_dependencies}
    assert installed[:3] == ["nibabel>=5.2", "torch", CORE_DISTRIBUTION]


def test_the_core_needs_a_folder_or_wheel_to_install_from(pip):
    with pytest.raises(InstallError, match="Choose the KAF Segment project folder"):
        install_all(REQUIREMENTS, external_python=False, project_source="")


def test_pytorch_utils_is_used_when_the_extension_is_there(pip, monkeypatch):
    sys.modules["slicer"].modules.pytorchutils = object()
    logic = MagicMock(name="PyTorchUtilsLogic")
    logic.return_value.installTorch.return_value = None  # the user cancelled
    monkeypatch.setitem(sys.modules, "PyTorchUtils", SimpleNamespace(PyTorchUtilsLogic=logic))
    with pytest.raises(InstallError, match="cancelled"):
        install.install_torch()
    logic.return_value.installTorch.assert_called_once_with(
        askConfirmation=True, torchVersionRequirement=">=2.4"
    )


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
