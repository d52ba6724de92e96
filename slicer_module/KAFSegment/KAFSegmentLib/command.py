"""Command lines of the `kaf` CLI (see the README's contract) and how to launch it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PRESETS = ("interactive", "paper-acdc", "paper-chd")
DEVICES = ("auto", "cpu", "cuda", "mps")
EXTERNAL_PYTHON_SETTING = "KAFSegment/externalPython"  # QSettings key: a python or `kaf` executable


@dataclass(frozen=True)
class KafCommand:
    """The program and leading arguments that run the CLI, e.g. ('/usr/bin/python3', '-m', 'kaf')."""

    prefix: tuple[str, ...]

    def __call__(self, subcommand: str, *arguments: str) -> list[str]:
        return [*self.prefix, subcommand, *arguments, "--progress", "jsonl"]


def resolve_command(external: str | None, slicer_python: str | None) -> KafCommand | None:
    """The command for the user's setting: an external `kaf` executable runs as is, any other external
    executable is taken for a Python with `kaf` installed; without a setting, Slicer's own Python runs
    `-m kaf`. None when there is neither (Slicer's `PythonSlicer` was not found)."""
    if external:
        if Path(external).stem.lower() == "kaf":  # kaf, kaf.exe
            return KafCommand((external,))
        return KafCommand((external, "-m", "kaf"))
    return KafCommand((slicer_python, "-m", "kaf")) if slicer_python else None


SHIPPED_PRESET = "interactive"  # the preset of the checkpoint that ships with kaf ("--checkpoint default")


@dataclass(frozen=True)
class FinetuneOptions:
    """The fine-tuning choices offered by the module; None leaves the CLI's default."""

    preset: str = "interactive"
    device: str = "auto"
    steps: int | None = None
    time_budget: float | None = None  # seconds
    # starting weights; None: the shipped pretrained default for the interactive preset (the only preset
    # it fits), random initialisation for the paper presets
    checkpoint: str | None = None


def finetune_arguments(
    image: Path, labels: Path, out: Path, options: FinetuneOptions, label_names: list[str]
) -> list[str]:
    arguments = ["--image", str(image), "--labels", str(labels), "--out", str(out)]
    arguments += ["--preset", options.preset, "--device", options.device]
    if options.checkpoint:
        arguments += ["--checkpoint", options.checkpoint]
    elif options.preset == SHIPPED_PRESET:
        arguments += ["--checkpoint", "default"]
    if options.steps is not None:
        arguments += ["--steps", str(options.steps)]
    if options.time_budget is not None:
        arguments += ["--time-budget", f"{options.time_budget:g}"]
    arguments += ["--label-names", ",".join(_label_name(name) for name in label_names)]
    return arguments


def predict_arguments(image: Path, checkpoint: Path, out: Path, device: str) -> list[str]:
    return ["--image", str(image), "--checkpoint", str(checkpoint), "--out", str(out), "--device", device]


def explain_arguments(
    image: Path, checkpoint: Path, slice_index: int, keypoint: int, out: Path, device: str
) -> list[str]:
    return [
        *("--image", str(image), "--checkpoint", str(checkpoint)),
        *("--slice", str(slice_index), "--keypoint", str(keypoint)),
        *("--out", str(out), "--device", device),
    ]


def _label_name(name: str) -> str:
    """Segment names go into a comma-separated list: commas become spaces; an empty name gets a default."""
    return " ".join(name.replace(",", " ").split()) or "unnamed"
