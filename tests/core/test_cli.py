"""The `kaf` command end to end on tiny volumes: outputs, progress lines, and every bad input."""

import json
import pickle
import signal
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from kaf_process import run_until

from kaf.app.cli import EXIT_CANCELLED, EXIT_USER_ERROR, main
from kaf.data.volume_io.label_table import label_color, read_label_table
from kaf.models.checkpoints import load_checkpoint
from tests.conftest import save_nifti, synthetic_volume

FAST = ["--steps", "2", "--batch-size", "2", "--crop-size", "32", "--device", "cpu", "--progress", "none"]


@pytest.fixture
def trained(synthetic_files, tmp_path):
    image, sparse, _ = synthetic_files
    checkpoint = tmp_path / "model.safetensors"
    assert (
        main(["finetune", "--image", str(image), "--labels", str(sparse), "--out", str(checkpoint), *FAST])
        == 0
    )
    return image, sparse, checkpoint


def test_finetune_predict_explain_write_their_outputs(trained, tmp_path, capsys):
    image, _, checkpoint = trained
    segmentation, probabilities = tmp_path / "seg.nii.gz", tmp_path / "prob.nii.gz"
    code = main(
        [
            "predict",
            "--image",
            str(image),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(segmentation),
            "--probabilities",
            str(probabilities),
            "--device",
            "cpu",
            "--progress",
            "none",
        ]
    )
    assert code == 0
    written, source = nib.load(segmentation), nib.load(image)
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}
    assert nib.load(probabilities).shape == (*source.shape, 3)
    # The class names travel beside the segmentation, in a colour table that Slicer reads too.
    table = read_label_table(tmp_path / "seg.csv")
    assert table.label_names() == ["background", "label 1", "label 2"]
    assert table.colors[1] == (*label_color(1), 255)
    printed = capsys.readouterr().out
    assert "segmentation" in printed and f"label_table: {tmp_path / 'seg.csv'}" in printed
    out = tmp_path / "explain"
    assert (
        main(
            [
                "explain",
                "--image",
                str(image),
                "--checkpoint",
                str(checkpoint),
                "--slice",
                "3",
                "--out",
                str(out),
                "--progress",
                "none",
            ]
        )
        == 0
    )
    assert (out / "attention.png").stat().st_size > 10_000
    assert nib.load(out / "attention_level3.nii.gz").shape == (64, 48, 1, 4)  # KAF at levels 3-4
    header, first = (out / "keypoints.csv").read_text().splitlines()[:2]
    assert header == "index,row,col,score" and first.startswith("0,")


def test_jsonl_progress_is_one_json_object_per_line_ending_in_the_result(synthetic_files, tmp_path, capsys):
    image, sparse, _ = synthetic_files
    args = [
        "finetune",
        "--image",
        str(image),
        "--labels",
        str(sparse),
        "--out",
        str(tmp_path / "m.safetensors"),
    ]
    assert main([*args, *FAST[:-2], "--progress", "jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    steps = [line for line in lines if line["event"] == "progress" and line["stage"] == "finetune"]
    assert [s["step"] for s in steps] == [1, 2] and all(s["loss"] > 0 for s in steps)
    assert lines[-1]["event"] == "result" and lines[-1]["checkpoint"].endswith("m.safetensors")


def bad_case(tmp_path, case):
    """Returns (arguments for `kaf finetune`, phrase the error must contain)."""
    image, labels = synthetic_volume()
    sparse = np.zeros_like(labels)
    sparse[2] = labels[2]
    good_image = save_nifti(image, tmp_path / "image.nii.gz")
    good_labels = save_nifti(sparse, tmp_path / "labels.nii.gz")
    if case == "missing file":
        return str(tmp_path / "nope.nii.gz"), str(good_labels), "does not exist"
    if case == "corrupt file":
        corrupt = tmp_path / "corrupt.nii.gz"
        corrupt.write_bytes(good_image.read_bytes()[:200])
        return str(corrupt), str(good_labels), "corrupt.nii.gz"
    if case == "shape mismatch":
        return str(good_image), str(save_nifti(sparse[:, :40], tmp_path / "small.nii.gz")), "shape"
    if case == "affine mismatch":
        shifted = np.diag([1.5, 1.5, 4.0, 1.0])
        shifted[0, 3] = 10
        return (
            str(good_image),
            str(save_nifti(sparse, tmp_path / "moved.nii.gz", shifted)),
            "positions in space",
        )
    if case == "no annotated slice":
        return (
            str(good_image),
            str(save_nifti(np.zeros_like(sparse), tmp_path / "empty.nii.gz")),
            "no slice is annotated",
        )
    if case == "negative labels":
        return (
            str(good_image),
            str(save_nifti(sparse.astype(np.int16) - 1, tmp_path / "neg.nii.gz")),
            "negative",
        )
    if case == "NaN voxels":
        image[3, 4, 5] = np.nan
        return str(save_nifti(image, tmp_path / "nan.nii.gz")), str(good_labels), "NaN"
    if case == "2D image":
        flat = tmp_path / "flat.nii.gz"
        nib.save(nib.Nifti1Image(image[0], np.eye(4)), flat)
        return str(flat), str(good_labels), "3D"
    if case == "4D image":
        four = tmp_path / "four.nii.gz"
        nib.save(nib.Nifti1Image(np.stack([image.T, image.T], -1), np.eye(4)), four)
        return str(four), str(good_labels), "3D"
    raise AssertionError(case)


CASES = [
    "missing file",
    "corrupt file",
    "shape mismatch",
    "affine mismatch",
    "no annotated slice",
    "negative labels",
    "NaN voxels",
    "2D image",
    "4D image",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_a_message_without_traceback_and_writes_nothing(case, tmp_path, capsys):
    image, labels, phrase = bad_case(tmp_path, case)
    out = tmp_path / "out.safetensors"
    code = main(["finetune", "--image", image, "--labels", labels, "--out", str(out), *FAST])
    error = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert phrase.lower() in error.lower() and "Traceback" not in error
    assert len(error.strip().splitlines()) == 1  # the CPU warning comes only once the inputs are good
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))


def test_a_pickle_checkpoint_is_refused_and_never_executed(synthetic_files, tmp_path, capsys):
    image, _, _ = synthetic_files
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Payload()))
    code = main(
        ["predict", "--image", str(image), "--checkpoint", str(evil), "--out", str(tmp_path / "s.nii.gz")]
    )
    assert code == EXIT_USER_ERROR and "pickle" in capsys.readouterr().err
    assert not marker.exists()
    torch.save({"weights": torch.zeros(2)}, tmp_path / "torch.pt")
    assert (
        main(
            [
                "predict",
                "--image",
                str(image),
                "--checkpoint",
                str(tmp_path / "torch.pt"),
                "--out",
                str(tmp_path / "s.nii.gz"),
            ]
        )
        == EXIT_USER_ERROR
    )


def test_a_checkpoint_of_another_preset_is_refused(trained, tmp_path, capsys):
    image, sparse, checkpoint = trained
    code = main(
        [
            "finetune",
            "--image",
            str(image),
            "--labels",
            str(sparse),
            "--out",
            str(tmp_path / "x.safetensors"),
            "--checkpoint",
            str(checkpoint),
            "--preset",
            "paper-acdc",
            *FAST,
        ]
    )
    assert code == EXIT_USER_ERROR and "interactive" in capsys.readouterr().err


def test_existing_outputs_are_not_overwritten_without_force(trained, capsys):
    image, sparse, checkpoint = trained
    before = checkpoint.read_bytes()
    code = main(["finetune", "--image", str(image), "--labels", str(sparse), "--out", str(checkpoint), *FAST])
    assert code == EXIT_USER_ERROR and "--force" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before
    assert (
        main(
            [
                "finetune",
                "--image",
                str(image),
                "--labels",
                str(sparse),
                "--out",
                str(checkpoint),
                "--force",
                *FAST,
            ]
        )
        == 0
    )


def test_fine_tuning_continues_from_a_fine_tuned_checkpoint(trained, tmp_path, capsys):
    image, sparse, checkpoint = trained
    out = tmp_path / "again.safetensors"
    args = [
        "finetune",
        "--image",
        str(image),
        "--labels",
        str(sparse),
        "--out",
        str(out),
        "--checkpoint",
        str(checkpoint),
    ]
    assert main([*args, *FAST]) == 0
    assert "loaded" in capsys.readouterr().out


def test_finetune_at_batch_size_1_on_crops_holding_single_keypoints(synthetic_files, tmp_path):
    """16 x 16 crops of the 48 x 64 slices often keep one keypoint: one token for the token BatchNorm."""
    image, sparse, _ = synthetic_files
    out = tmp_path / "model.safetensors"
    files = ["--image", str(image), "--labels", str(sparse), "--out", str(out)]
    training = [
        "--steps",
        "6",
        "--batch-size",
        "1",
        "--crop-size",
        "16",
        "--device",
        "cpu",
        "--progress",
        "none",
    ]

    assert main(["finetune", *files, *training]) == 0

    _, metadata = load_checkpoint(out)
    assert metadata.steps == 6 and metadata.extra["finetune"]["batch_size"] == 1


def test_sigterm_stops_a_running_finetune_and_writes_nothing(synthetic_files, tmp_path):
    image, sparse, _ = synthetic_files
    out = tmp_path / "stopped.safetensors"
    command = [sys.executable, "-m", "kaf", "finetune", "--image", str(image), "--labels", str(sparse)]
    command += ["--out", str(out), "--steps", "10000", "--batch-size", "2", "--crop-size", "32"]
    command += ["--device", "cpu", "--progress", "jsonl"]
    code, error = run_until(command, "finetune", 0, signal.SIGTERM, timeout=60)
    assert code == EXIT_CANCELLED
    assert "stopped" in error and "Traceback" not in error
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
