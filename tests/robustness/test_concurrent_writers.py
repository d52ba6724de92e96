"""Two writers to the same output: the result is always one complete file from one writer (issue #23,
item 7). Each writer fills a temporary of its own beside the output and renames it into place; two
writers sharing one temporary name would mix their bytes, or the second rename would find nothing."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from volume_factory import save_nifti, synthetic_volume

from kaf.data.keypoints import KeypointConfig
from kaf.data.volume_io import read_volume, write_volume
from kaf.models import KafUNet, checkpoints
from kaf.models.checkpoints import CheckpointMetadata, load_checkpoint, save_checkpoint
from kaf.runtime import atomic
from tests.conftest import CUSTOM_ARCHITECTURE, random_checkpoint

KAF = [sys.executable, "-m", "kaf"]
QUIET = ["--device", "cpu", "--progress", "none", "--force"]


@pytest.fixture
def scan(tmp_path) -> tuple[Path, Path]:
    image, labels = synthetic_volume()
    sparse = np.zeros_like(labels)
    sparse[[2, 5]] = labels[[2, 5]]
    return save_nifti(image, tmp_path / "image.nii.gz"), save_nifti(sparse, tmp_path / "sparse.nii.gz")


def run_together(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start every command at once and wait for all."""
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    results = []
    for command, process in zip(commands, processes, strict=True):
        out, error = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(command, process.returncode, out, error))
    return results


def test_two_finetune_processes_writing_one_checkpoint_leave_one_complete_checkpoint(scan, tmp_path):
    image, sparse = scan
    out = tmp_path / "model.safetensors"
    command = [*KAF, "finetune", "--image", str(image), "--labels", str(sparse), "--out", str(out)]
    training = ["--steps", "2", "--batch-size", "2", "--crop-size", "32", *QUIET]
    commands = [[*command, "--seed", str(seed), *training] for seed in (1, 2)]

    for result in run_together(commands):
        assert result.returncode == 0, result.stderr

    state, metadata = load_checkpoint(out)
    assert metadata.extra["finetune"]["seed"] in (1, 2)
    KafUNet(metadata.model_config()).load_state_dict(state)  # every tensor, of the model its metadata names
    assert {path.name for path in tmp_path.iterdir()} == {image.name, sparse.name, out.name}


def test_two_predict_processes_writing_one_segmentation_leave_one_complete_segmentation(scan, tmp_path):
    image, _ = scan
    checkpoint = random_checkpoint(tmp_path / "model.safetensors", "finetune")
    out = tmp_path / "segmentation.nii.gz"
    command = [*KAF, "predict", "--image", str(image), "--checkpoint", str(checkpoint), "--out", str(out)]

    for result in run_together([[*command, *QUIET]] * 2):
        assert result.returncode == 0, result.stderr

    written = nib.load(out)
    assert written.shape == nib.load(image).shape
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}  # every voxel readable: no truncation
    expected = {image.name, "sparse.nii.gz", checkpoint.name, out.name, "segmentation.csv"}
    assert {path.name for path in tmp_path.iterdir()} == expected


@pytest.fixture
def writers_meet_before_renaming(monkeypatch) -> None:
    """Each write waits, its temporary complete, until the other has written its own: both temporaries
    exist at once, the moment where a shared name would break."""
    barrier = threading.Barrier(2, timeout=30)
    original = atomic.give_default_permissions

    def meet(path: Path) -> None:
        barrier.wait()
        original(path)

    monkeypatch.setattr(atomic, "give_default_permissions", meet)
    monkeypatch.setattr(checkpoints, "give_default_permissions", meet)


def in_two_threads(write: Callable[[int], object], values: list[int]) -> list[Exception]:
    """Run `write` on each value in a thread of its own; the errors they raised."""
    errors: list[Exception] = []

    def guarded(value: int) -> None:
        try:
            write(value)
        except Exception as error:  # reported by the test
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(value,)) for value in values]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_checkpoint_writers_inside_one_save_at_the_same_time_keep_their_own_temporaries(
    tmp_path, writers_meet_before_renaming
):
    out = tmp_path / "model.safetensors"
    model = KafUNet(CUSTOM_ARCHITECTURE)

    def save(steps: int) -> None:
        metadata = CheckpointMetadata(
            preset="custom",
            model=CUSTOM_ARCHITECTURE.to_dict(),
            method="finetune",
            label_names=["background", "label 1"],
            normalization=None,
            keypoints=KeypointConfig(max_keypoints=CUSTOM_ARCHITECTURE.max_keypoints).to_dict(),
            steps=steps,
        )
        save_checkpoint(out, model.state_dict(), metadata)

    assert in_two_threads(save, [1, 2]) == []
    assert load_checkpoint(out)[1].steps in (1, 2)
    assert [path.name for path in tmp_path.iterdir()] == [out.name]


def test_volume_writers_inside_one_write_at_the_same_time_keep_their_own_temporaries(
    tmp_path, writers_meet_before_renaming
):
    out = tmp_path / "segmentation.nii.gz"
    arrays = {value: np.full((4, 8, 8), value, np.uint8) for value in (1, 2)}

    assert in_two_threads(lambda value: write_volume(arrays[value], np.eye(4), out), [1, 2]) == []
    written = read_volume(out).array
    assert any(np.array_equal(written, array) for array in arrays.values())
    assert [path.name for path in tmp_path.iterdir()] == [out.name]
