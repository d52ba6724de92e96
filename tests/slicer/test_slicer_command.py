"""Tier 1: the command lines the module builds, checked against the real CLI's argument parser."""

from __future__ import annotations

from pathlib import Path

import pytest
from KAFSegmentLib.command import (
    DEVICES,
    PRESETS,
    FinetuneOptions,
    KafCommand,
    explain_arguments,
    finetune_arguments,
    predict_arguments,
    resolve_command,
)

from kaf.app.cli import build_parser
from kaf.models import PRESETS as CORE_PRESETS


def parse(command: list[str]):
    """What the real `kaf` argument parser makes of a command line built by the module."""
    return build_parser().parse_args(command[3:])  # drop python -m kaf


PYTHON = KafCommand(("/venv/bin/python", "-m", "kaf"))


@pytest.mark.parametrize(
    ("external", "slicer_python", "prefix"),
    [
        ("/envs/kaf/bin/python3", "/slicer/bin/PythonSlicer", ("/envs/kaf/bin/python3", "-m", "kaf")),
        ("/envs/kaf/bin/kaf", "/slicer/bin/PythonSlicer", ("/envs/kaf/bin/kaf",)),
        ("C:/envs/kaf/Scripts/kaf.exe", None, ("C:/envs/kaf/Scripts/kaf.exe",)),
        ("", "/slicer/bin/PythonSlicer", ("/slicer/bin/PythonSlicer", "-m", "kaf")),
    ],
)
def test_resolve_command(external, slicer_python, prefix):
    assert resolve_command(external, slicer_python) == KafCommand(prefix)


def test_without_any_python_there_is_no_command():
    assert resolve_command("", None) is None


def test_finetune_command_matches_the_cli():
    options = FinetuneOptions(
        "paper-chd", "cuda", steps=20, time_budget=90.0, checkpoint="/w/pre.safetensors"
    )
    command = PYTHON(
        "finetune",
        *finetune_arguments(
            Path("i.nii"), Path("l.nii"), Path("o.safetensors"), options, ["bg", "left, right"]
        ),
    )
    args = parse(command)
    assert command[-2:] == ["--progress", "jsonl"]
    assert (args.command, args.image, args.labels, args.out) == (
        "finetune",
        "i.nii",
        "l.nii",
        "o.safetensors",
    )
    assert (args.preset, args.device, args.steps, args.time_budget) == ("paper-chd", "cuda", 20, 90.0)
    assert args.checkpoint == "/w/pre.safetensors"
    assert args.label_names == "bg,left right"  # a comma in a segment name must not add a class


def test_finetune_defaults_start_from_the_shipped_checkpoint_and_leave_the_cli_defaults():
    command = PYTHON(
        "finetune", *finetune_arguments(Path("i"), Path("l"), Path("o"), FinetuneOptions(), ["b"])
    )
    args = parse(command)
    assert args.checkpoint == "default" and args.steps is None and args.time_budget is None
    assert args.progress == "jsonl"
    paper = finetune_arguments(Path("i"), Path("l"), Path("o"), FinetuneOptions(preset="paper-acdc"), ["b"])
    assert parse(PYTHON("finetune", *paper)).checkpoint is None  # the shipped weights fit only interactive


def test_predict_and_explain_commands_match_the_cli():
    predict = parse(PYTHON("predict", *predict_arguments(Path("i.nii"), Path("m"), Path("s.nii"), "cpu")))
    assert (predict.image, predict.checkpoint, predict.out, predict.device) == ("i.nii", "m", "s.nii", "cpu")
    explain = parse(PYTHON("explain", *explain_arguments(Path("i.nii"), Path("m"), 17, 3, Path("d"), "auto")))
    assert (explain.slice, explain.keypoint, explain.out, explain.progress) == (17, 3, "d", "jsonl")


def test_the_module_offers_the_cores_presets_and_the_documented_devices():
    assert set(PRESETS) == set(CORE_PRESETS)
    assert DEVICES == ("auto", "cpu", "cuda", "mps")
