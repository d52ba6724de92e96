"""Interrupted jobs: Ctrl+C (SIGINT), SIGTERM (Slicer's Stop, `kill`) or a failure while saving leave no
partial file, keep the previous output intact, and the work can go on from what was kept.

SIGINT raises KeyboardInterrupt wherever the program is, even inside a save; SIGTERM sets the job's
Stop flag, which is read between steps. Both are sent to real `kaf` processes here."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from kaf_process import run_until
from volume_factory import save_nifti, synthetic_volume

from kaf.app.cli import EXIT_CANCELLED
from kaf.data import volume_io
from kaf.data.volume_io import read_volume, write_volume
from kaf.jobs.pretrain import read_resume_point
from kaf.models import KafUNet, ModelConfig, checkpoints, preset_config
from kaf.models.checkpoints import CheckpointMetadata, load_checkpoint, save_checkpoint

SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]
KAF = [sys.executable, "-m", "kaf"]
PRETRAIN_STEPS = 8
SAVE_EVERY = 2


def leftovers(folder: Path, expected: set[str]) -> set[str]:
    """Files in `folder` other than the expected ones (a partial or temporary file would show here)."""
    return {p.name for p in folder.iterdir()} - expected


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("scan")
    image, labels = synthetic_volume()
    sparse = np.zeros_like(labels)
    sparse[[2, 5]] = labels[[2, 5]]
    return save_nifti(image, folder / "image.nii.gz"), save_nifti(sparse, folder / "sparse.nii.gz")


def pretrain_command(scan: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [
        *KAF, "pretrain", "--method", "kaf", "--data", str(scan[0]), "--out", str(out), "--view-size", "32",
        "--batch-size", "2", "--steps", str(PRETRAIN_STEPS), "--save-every", str(SAVE_EVERY),
        "--progress", "jsonl", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(scan, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("straight") / "pretrained.safetensors"
    subprocess.run(pretrain_command(scan, out), check=True, capture_output=True)
    return load_checkpoint(out)[0]


@pytest.mark.parametrize("signum", SIGNALS)
def test_interrupted_pretraining_keeps_its_last_save_and_resumes_to_the_same_weights(
    signum, scan, uninterrupted, tmp_path
):
    out = tmp_path / "pretrained.safetensors"

    code, error = run_until(pretrain_command(scan, out), "pretrain", SAVE_EVERY + 1, signum)

    assert code == EXIT_CANCELLED and "Traceback" not in error
    assert leftovers(tmp_path, {out.name}) == set()
    kept = read_resume_point(out, "kaf", preset_config("interactive"))  # complete and loadable
    assert kept.step % SAVE_EVERY == 0 and 0 < kept.step < PRETRAIN_STEPS

    resumed = subprocess.run(pretrain_command(scan, out, "--resume", str(out)), capture_output=True)

    assert resumed.returncode == 0, resumed.stderr
    weights = load_checkpoint(out)[0]
    assert set(weights) == set(uninterrupted)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def finetune_command(scan: tuple[Path, Path], out: Path, steps: int, *extra: str) -> list[str]:
    return [
        *KAF, "finetune", "--image", str(scan[0]), "--labels", str(scan[1]), "--out", str(out),
        "--steps", str(steps), "--batch-size", "2", "--crop-size", "32", "--device", "cpu",
        "--progress", "jsonl", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fine_tuned(scan, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("fine_tuned") / "model.safetensors"
    subprocess.run(finetune_command(scan, out, 2), check=True, capture_output=True)
    return out.read_bytes()


@pytest.mark.parametrize("signum", SIGNALS)
def test_interrupted_finetuning_keeps_the_previous_checkpoint_which_fine_tuning_continues_from(
    signum, scan, fine_tuned, tmp_path
):
    out = tmp_path / "model.safetensors"
    out.write_bytes(fine_tuned)

    code, error = run_until(finetune_command(scan, out, 10_000, "--force"), "finetune", 1, signum)

    assert code == EXIT_CANCELLED and "Traceback" not in error
    assert out.read_bytes() == fine_tuned
    assert leftovers(tmp_path, {out.name}) == set()

    continued = tmp_path / "continued.safetensors"
    again = subprocess.run(
        finetune_command(scan, continued, 2, "--checkpoint", str(out)), capture_output=True
    )
    assert again.returncode == 0, again.stderr
    assert load_checkpoint(continued)[1].extra["pretrained_from"] == "finetune"


def write_half_then_interrupt(write):
    """A writer that gets half its bytes out, then is hit by Ctrl+C."""

    def interrupted(*args, **kwargs):
        write(*args, **kwargs)
        written = next(Path(a) for a in (*args, *kwargs.values()) if isinstance(a, str | Path))
        written.write_bytes(written.read_bytes()[: written.stat().st_size // 2])
        raise KeyboardInterrupt

    return interrupted


def test_ctrl_c_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    config = ModelConfig(base_width=4, token_dim=8, attention_heads=2, attention_blocks=1, max_keypoints=8)
    state = KafUNet(config).state_dict()
    metadata = CheckpointMetadata(
        preset="custom",
        model=config.to_dict(),
        method="finetune",
        label_names=["background", "label 1"],
        normalization={"modality": "mri", "clip_low": None, "clip_high": None, "mean": 0.0, "std": 1.0},
        keypoints={"max_keypoints": 8, "detector": "sift"},
        slice_axis=0,
        steps=1,
        data_fingerprint="0123456789abcdef",
    )
    save_checkpoint(path, state, metadata)
    previous = path.read_bytes()
    monkeypatch.setattr(checkpoints, "save_file", write_half_then_interrupt(checkpoints.save_file))

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {name: t + 1 for name, t in state.items()}, metadata)

    assert path.read_bytes() == previous
    assert leftovers(tmp_path, {path.name}) == set()


def test_ctrl_c_while_writing_a_segmentation_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "segmentation.nii.gz"
    affine = np.diag([1.5, 1.5, 4.0, 1.0])
    write_volume(np.ones((4, 8, 8), np.uint8), affine, path)
    previous = path.read_bytes()
    monkeypatch.setattr(volume_io, "write_nifti", write_half_then_interrupt(volume_io.write_nifti))

    with pytest.raises(KeyboardInterrupt):
        write_volume(np.full((4, 8, 8), 2, np.uint8), affine, path)

    assert path.read_bytes() == previous and read_volume(path).array.max() == 1
    assert leftovers(tmp_path, {path.name}) == set()
