"""Installing what the module needs into Slicer's Python.

`install_plan` decides what to install, one `pip install` at a time; `PipInstall` runs those as child
processes so that Slicer's GUI neither freezes nor hides pip's progress (`slicer.util.pip_install`
blocks the main thread until pip ends). Nothing already installed is replaced: pip upgrading a package
that Slicer ships (NumPy, VTK, SimpleITK...) can break Slicer (Slicer/Slicer#6711).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .process import ProcessRunner
from .signal import Signal

CORE_DISTRIBUTION = "napari-kaf"  # the distribution that provides the `kaf` package and CLI
TORCH_REQUIREMENT = "torch>=2.4"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYTORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu126"  # Windows: PyPI only has CPU builds
_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class InstallError(RuntimeError):
    pass


@dataclass(frozen=True)
class PipStep:
    names: list[str]  # what the step installs, as the user is told
    arguments: list[str]  # of `pip install`


def requirements_step(requirements: list[str]) -> PipStep:
    return PipStep([requirement_name(line) or line for line in requirements], requirements)


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


def install_torch_with_pytorch_utils() -> None:
    """Install PyTorch through the PyTorch Utils extension, which matches the build to the GPU driver.
    It asks the user first and shows its own progress, so it runs as it is, on the main thread."""
    import PyTorchUtils

    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT.removeprefix("torch")
    )
    if torch is None:
        raise InstallError("PyTorch was not installed (cancelled).")


def has_pytorch_utils() -> bool:
    import slicer

    return hasattr(slicer.modules, "pytorchutils")


def install_plan(requirements_file: Path, external_python: bool, project_source: str) -> Iterator[PipStep]:
    """What "Install dependencies" does, as one `pip install` after another: the module's
    own requirements; then, unless kaf runs from an external Python, PyTorch and the KAF core from
    `project_source` (needed only while the core is not installed, or to update it), and last the core's
    missing dependencies. A generator, because that last step can be known only once the core is
    installed: the caller runs each step before asking for the next."""
    requirements = read_requirements(requirements_file)
    own = missing_requirements(
        [line for line in requirements if requirement_name(line) != CORE_DISTRIBUTION], is_installed
    )
    if own:
        yield requirements_step(own)
    if external_python:
        return
    if not is_installed("torch"):
        if has_pytorch_utils():
            install_torch_with_pytorch_utils()
        else:
            yield PipStep(["torch"], torch_pip_arguments(platform.system(), has_nvidia_gpu()))
    if project_source or not is_installed(CORE_DISTRIBUTION):
        if not project_source or not Path(project_source).exists():
            raise InstallError("Choose the KAF Segment project folder or a wheel (.whl) to install from.")
        # the core alone: its dependencies must not replace anything installed
        yield PipStep([CORE_DISTRIBUTION], ["--no-deps", str(project_source)])
        try:
            dependencies = importlib.metadata.requires(CORE_DISTRIBUTION) or []
        except importlib.metadata.PackageNotFoundError as error:
            raise InstallError(f"{project_source} did not install {CORE_DISTRIBUTION}.") from error
        missing = missing_requirements(dependencies, is_installed)
        if missing:
            yield requirements_step(missing)


class PipInstall:
    """Runs the steps of an install plan as `pip install` child processes, one after another, through an
    injected process runner (QProcess in Slicer): Slicer's GUI stays responsive for the minutes a PyTorch
    download takes, and pip's output reaches `line` as it is printed.

    Signals: `step` (PipStep, about to run), `line` (str), `finished` (succeeded, message).
    """

    def __init__(
        self,
        pip_command: Sequence[str],
        runner_factory: Callable[[], ProcessRunner],
        environment: Mapping[str, str] | None = None,
    ) -> None:
        self.pip_command = list(pip_command)  # e.g. [PythonSlicer, "-m", "pip"]
        self.environment = environment
        self.step = Signal()
        self.line = Signal()
        self.finished = Signal()
        self._runner_factory = runner_factory
        self._plan: Iterator[PipStep] | None = None
        self._runner: ProcessRunner | None = None
        self._installed: list[str] = []
        self._last_line = ""
        self._stop_requested = False

    @property
    def running(self) -> bool:
        return self._plan is not None

    def start(self, plan: Iterator[PipStep]) -> None:
        if self.running:
            raise InstallError("An installation is already running.")
        self._plan, self._installed, self._stop_requested = plan, [], False
        self._next_step()

    def stop(self) -> None:
        """Stop pip; what it had installed before stays installed."""
        if self._runner is not None:
            self._stop_requested = True
            self._runner.kill()

    def _next_step(self) -> None:
        try:
            step = next(self._plan)
        except StopIteration:
            installed = ", ".join(self._installed)
            self._finish(True, f"Installed {installed}." if installed else "Everything is installed.")
            return
        except Exception as error:  # a plan that cannot go on (no source, cancelled) ends the install
            self._finish(False, str(error))
            return
        runner = self._runner_factory()
        runner.on_stdout_line = self._on_line
        runner.on_stderr_line = self._on_line
        runner.on_finished = lambda exit_code: self._step_finished(step, exit_code)
        self._runner = runner
        self.step.emit(step)
        runner.start([*self.pip_command, "install", *step.arguments], self.environment)

    def _on_line(self, line: str) -> None:
        if line.strip():
            self._last_line = line
            self.line.emit(line)

    def _step_finished(self, step: PipStep, exit_code: int) -> None:
        self._runner = None
        if self._stop_requested:
            self._finish(False, "Installation stopped.")
            return
        if exit_code != 0:
            command = " ".join(["pip install", *step.arguments])
            self._finish(False, f"{command} failed (exit code {exit_code}): {self._last_line}")
            return
        importlib.invalidate_caches()  # what pip installed must be found by the next step's checks
        self._installed += step.names
        self._next_step()

    def _finish(self, succeeded: bool, message: str) -> None:
        self._plan = None
        self.finished.emit(succeeded, message)
