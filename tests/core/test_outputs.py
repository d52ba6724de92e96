"""What a command writes: never over one of its own inputs or outputs (with or without --force), only over
an existing file with --force, and with the permissions the user's umask gives."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from kaf.app.cli import EXIT_USER_ERROR, main
from kaf.runtime.atomic import check_outputs, same_file, umask
from kaf.runtime.errors import InputFileError
from tests.conftest import random_checkpoint, save_nifti, synthetic_volume

QUIET = ["--device", "cpu", "--progress", "none"]


def _refused(arguments: list[str], capsys, *named: str) -> str:
    """Run `kaf ARGUMENTS`, expect the user-error exit, and return its message, which names `named`."""
    assert main(arguments) == EXIT_USER_ERROR
    message = capsys.readouterr().err
    assert "Traceback" not in message
    for text in named:
        assert text in message, message
    return message


def _image(folder: Path, name: str = "image.nii.gz") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return save_nifti(synthetic_volume()[0], folder / name)


# --- the helper ------------------------------------------------------------------------------------------


def test_same_file_sees_links_and_other_spellings(tmp_path: Path) -> None:
    image = _image(tmp_path)
    os.link(image, tmp_path / "hard.nii.gz")
    (tmp_path / "soft.nii.gz").symlink_to(image)
    (tmp_path / "sub").mkdir()

    assert same_file(tmp_path / "hard.nii.gz", image)
    assert same_file(tmp_path / "soft.nii.gz", image)
    assert same_file(tmp_path / "sub" / ".." / "image.nii.gz", image)
    assert same_file(tmp_path / "sub" / ".." / "new.nii.gz", tmp_path / "new.nii.gz")  # neither exists
    assert not same_file(tmp_path / "other.nii.gz", image)


def test_an_output_that_is_an_input_is_refused_even_with_force(tmp_path: Path) -> None:
    image = _image(tmp_path)
    before = image.read_bytes()

    with pytest.raises(InputFileError, match="--image and also as the output --out") as error:
        check_outputs({"--out": tmp_path / "." / "image.nii.gz"}, {"--image": image}, force=True)

    assert str(image.name) in str(error.value)
    assert image.read_bytes() == before


def test_two_outputs_on_one_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="--out and also as the output --uncertainty"):
        check_outputs(
            {"--out": tmp_path / "a.nii.gz", "--uncertainty": tmp_path / "a.nii.gz"}, {}, force=True
        )


def test_an_existing_output_needs_force_and_none_values_are_ignored(tmp_path: Path) -> None:
    existing = _image(tmp_path)
    with pytest.raises(InputFileError, match="--force"):
        check_outputs({"--out": existing, "--uncertainty": None}, {"--checkpoint": None}, force=False)
    check_outputs({"--out": existing}, {"--image": tmp_path / "other.nii.gz"}, force=True)


# --- every command -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_predict_never_writes_its_segmentation_over_its_image(tmp_path: Path, capsys, force) -> None:
    image = _image(tmp_path, "x.nii.gz")
    before = image.read_bytes()
    arguments = ["predict", "--image", str(image), "--checkpoint", str(tmp_path / "m.safetensors")]

    _refused([*arguments, "--out", str(image), *force, *QUIET], capsys, "--image", "--out", str(image))

    assert image.read_bytes() == before


def test_predict_refuses_a_hard_link_to_its_checkpoint_and_clashing_outputs(tmp_path: Path, capsys) -> None:
    image, checkpoint = _image(tmp_path), tmp_path / "m.safetensors"
    checkpoint.write_bytes(b"weights")
    os.link(checkpoint, tmp_path / "seg.nii.gz")
    base = ["predict", "--image", str(image), "--checkpoint", str(checkpoint), "--force", *QUIET]

    _refused([*base, "--out", str(tmp_path / "seg.nii.gz")], capsys, "--checkpoint", "--out")
    _refused(
        [*base, "--out", str(tmp_path / "a.nii.gz"), "--uncertainty", str(tmp_path / "a.nii.gz")],
        capsys,
        "--out",
        "--uncertainty",
    )
    assert checkpoint.read_bytes() == b"weights"


@pytest.mark.parametrize("flag", ["--image", "--labels", "--checkpoint"])
def test_finetune_never_writes_its_checkpoint_over_an_input(tmp_path: Path, capsys, flag: str) -> None:
    paths = {"--image": _image(tmp_path), "--labels": _image(tmp_path, "labels.nii.gz")}
    paths["--checkpoint"] = Path(shutil.copyfile(paths["--image"], tmp_path / "start.safetensors"))
    before = {name: path.read_bytes() for name, path in paths.items()}
    arguments = ["finetune", *(str(part) for pair in paths.items() for part in pair)]

    _refused([*arguments, "--out", str(paths[flag]), "--force", *QUIET], capsys, flag, "--out")

    assert {name: path.read_bytes() for name, path in paths.items()} == before


def test_pretrain_never_writes_its_checkpoint_over_a_volume_of_its_data(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    volume = _image(data / "deep", "scan.nii.gz")
    arguments = ["pretrain", "--method", "kaf", "--data", str(data), "--out", str(volume), "--force", *QUIET]

    _refused(arguments, capsys, "--data", "--out", str(volume))


def test_pretrain_resumes_into_its_own_checkpoint_without_force(tmp_path: Path, capsys) -> None:
    volume = _image(tmp_path, "scan.nii.gz")
    out = tmp_path / "pretrained.safetensors"
    common = ["--data", str(volume), "--out", str(out), "--view-size", "32", "--batch-size", "2", *QUIET]
    assert main(["pretrain", "--method", "gcl", *common, "--steps", "1"]) == 0

    assert main(["pretrain", "--method", "gcl", *common, "--steps", "2", "--resume", str(out)]) == 0


def test_explain_never_writes_over_its_image(tmp_path: Path, capsys) -> None:
    """Its --out is a folder: neither the folder nor a file it writes there may be an input."""
    checkpoint = random_checkpoint(tmp_path / "model.safetensors", "finetune")
    out = tmp_path / "explained"
    image = _image(out, "attention_level1.nii.gz")
    base = ["explain", "--checkpoint", str(checkpoint), "--slice", "0", *QUIET]

    _refused([*base, "--image", str(image), "--out", str(image)], capsys, "--image", "--out")
    _refused([*base, "--image", str(image), "--out", str(out)], capsys, "--image", "--out", str(image))


def test_demo_never_writes_over_its_image_or_labels(tmp_path: Path, capsys) -> None:
    out = tmp_path / "kaf-demo-output"
    image, labels = _image(out, "image.nii.gz"), _image(out, "reference.nii.gz")
    before = labels.read_bytes()
    arguments = ["demo", "--image", str(image), "--labels", str(labels), "--out", str(out), "--no-viewer"]

    _refused([*arguments, *QUIET], capsys, "--labels", "--out", str(labels))

    assert labels.read_bytes() == before
    assert sorted(path.name for path in out.iterdir()) == ["image.nii.gz", "reference.nii.gz"]


def test_an_output_folder_that_is_a_file_is_refused(tmp_path: Path, capsys) -> None:
    image, labels = _image(tmp_path), _image(tmp_path, "labels.nii.gz")
    (tmp_path / "out").write_text("a note")
    arguments = ["demo", "--image", str(image), "--labels", str(labels), "--out", str(tmp_path / "out")]

    _refused([*arguments, "--no-viewer", *QUIET], capsys, "is a file", "folder")


# --- permissions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_permissions_of_the_umask(tmp_path: Path, mask: int, mode: int) -> None:
    """safetensors and private temporaries make files 0600; a written file gets what the umask gives."""
    image = _image(tmp_path / "in")
    outputs = {name: tmp_path / name for name in ("m.safetensors", "seg.nii.gz", "uncertainty.nii.gz")}
    previous = os.umask(mask)
    try:
        assert umask() == mask
        random_checkpoint(outputs["m.safetensors"], "finetune")
        arguments = ["--image", str(image), "--checkpoint", str(outputs["m.safetensors"]), *QUIET]
        assert (
            main(
                [
                    "predict",
                    *arguments,
                    "--out",
                    str(outputs["seg.nii.gz"]),
                    "--uncertainty",
                    str(outputs["uncertainty.nii.gz"]),
                ]
            )
            == 0
        )
    finally:
        os.umask(previous)

    assert {name: stat.S_IMODE(path.stat().st_mode) for name, path in outputs.items()} == dict.fromkeys(
        outputs, mode
    )


def test_the_umask_is_read_without_proc_too(monkeypatch: pytest.MonkeyPatch) -> None:
    previous = os.umask(0o027)
    try:
        monkeypatch.setattr(Path, "is_file", lambda self: False)
        assert umask() == 0o027
        assert os.umask(0o027) == 0o027  # reading it left it as it was
    finally:
        os.umask(previous)
