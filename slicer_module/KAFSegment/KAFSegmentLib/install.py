"""Installing what the module needs into Slicer's Python.

pip runs block and must run on the main thread (`slicer.util.pip_install` creates Qt objects); the
pure functions decide what to install. Nothing already installed is replaced: pip upgrading a package
that Slicer ships (NumPy, VTK, SimpleITK...) can break Slicer (Slicer/Slicer#6711).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

CORE_DISTRIBUTION = "napari-kaf"  # the distribution that provides the `kaf` package and CLI
TORCH_REQUIREMENT = "torch>=2.4"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYTORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu126"  # Windows: PyPI only has CPU builds
_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class InstallError(RuntimeError):
    pass


def requirement_name(requirement: str) -> str | None:
    """The distribution a requirement line names (None for comments, options and blank lines)."""
    text = requirement.split("#", 1)[0].strip()
    if not text or text.startswith("-"):
        return None
    match = _NAME.match(text)
    return match[1] if match else None


def read_requirements(path: Path) -> list[str]:
    """The requirement lines of a requirements.txt, without comments and blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line]


def missing_requirements(requirements: Iterable[str], is_installed: Callable[[str], bool]) -> list[str]:
    """The requirements whose distribution is not installed at any version; requirements that apply
    only to an extra (`; extra == "..."`) are left out."""
    missing = []
    for requirement in requirements:
        name = requirement_name(requirement)
        marker = requirement.partition(";")[2]
        if name and "extra" not in marker and not is_installed(name):
            missing.append(requirement.strip())
    return missing


def torch_pip_arguments(system: str, nvidia_gpu: bool) -> list[str]:
    """pip arguments for a torch build that fits the machine when PyTorch Utils is not there.
    PyPI's Linux wheels bundle CUDA and its macOS wheels use MPS; on Windows PyPI has CPU builds only,
    and a machine without an NVIDIA GPU should not download the multi-GB CUDA wheels."""
    if system == "Darwin" or (system == "Linux" and nvidia_gpu):
        return [TORCH_REQUIREMENT]
    return [TORCH_REQUIREMENT, "--index-url", PYTORCH_CUDA_INDEX if nvidia_gpu else PYTORCH_CPU_INDEX]


def is_installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver is installed (probed without importing torch)."""
    return shutil.which("nvidia-smi") is not None


def install_requirements(requirements: Iterable[str]) -> list[str]:
    """pip install the requirements that are missing; returns them."""
    import slicer

    missing = missing_requirements(requirements, is_installed)
    if missing:
        slicer.util.pip_install(missing)
        importlib.invalidate_caches()
    return missing


def install_torch() -> list[str]:
    """Install PyTorch unless it is there: through PyTorch Utils (which matches the build to the GPU
    driver) when that extension is installed, else with pip from the index that fits the machine."""
    import platform

    import slicer

    if is_installed("torch"):
        return []
    if hasattr(slicer.modules, "pytorchutils"):  # the PyTorch extension is installed
        import PyTorchUtils

        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT.removeprefix("torch")
        )
        if torch is None:
            raise InstallError("PyTorch was not installed (cancelled).")
    else:
        slicer.util.pip_install(torch_pip_arguments(platform.system(), has_nvidia_gpu()))
    return ["torch"]


def install_project(source: str) -> list[str]:
    """Install the KAF core from a project folder or wheel: the package itself without dependencies,
    then only those of its dependencies that are missing. Returns what was installed."""
    import slicer

    if not source or not Path(source).exists():
        raise InstallError("Choose the KAF Segment project folder or a wheel (.whl) to install from.")
    slicer.util.pip_install(["--no-deps", str(source)])
    importlib.invalidate_caches()
    try:
        dependencies = importlib.metadata.requires(CORE_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as error:
        raise InstallError(f"{source} did not install {CORE_DISTRIBUTION}.") from error
    return [CORE_DISTRIBUTION, *install_requirements(dependencies)]


def install_all(requirements_file: Path, external_python: bool, project_source: str) -> list[str]:
    """What "Install dependencies" does: the module's own requirements; then, unless kaf runs from an
    external Python, PyTorch and the KAF core from `project_source` (needed only while the core is not
    installed, or to update it). Returns what was installed."""
    requirements = read_requirements(requirements_file)
    installed = install_requirements(
        [line for line in requirements if requirement_name(line) != CORE_DISTRIBUTION]
    )
    if external_python:
        return installed
    installed = installed + install_torch()
    if project_source or not is_installed(CORE_DISTRIBUTION):
        installed = installed + install_project(project_source)
    return installed
