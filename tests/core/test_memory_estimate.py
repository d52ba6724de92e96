"""Training and prediction memory is estimated before allocation, and requests that cannot fit are refused
up front."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from volume_factory import save_nifti, synthetic_volume

from kaf.app.cli import main
from kaf.models import ModelConfig, preset_config
from kaf.models.checkpoints import load_checkpoint
from kaf.models.memory_estimate import inference_batch_bytes, training_step_bytes
from kaf.runtime import devices
from kaf.runtime.host_memory import available_ram_bytes
from tests.conftest import random_checkpoint

# The interactive preset on BATCH slices of 128^2 in a fresh process, twice; prints its peak RSS rise in
# bytes. (Not ru_maxrss: it would carry over the RSS of pytest, which forks the process.)
SETUP = """
import torch
from kaf.runtime.host_memory import peak_resident_bytes, resident_bytes
from kaf.models import KafUNet, preset_config

torch.set_num_threads(1)
config = preset_config("interactive")
images = torch.randn(BATCH, 1, 128, 128)
keypoints = torch.randint(0, 128, (BATCH, config.max_keypoints, 2))
mask = torch.ones(BATCH, config.max_keypoints, dtype=torch.bool)
before = resident_bytes()
model = KafUNet(config)
"""
TRAINING_STEPS = """
optimiser = torch.optim.Adam(model.parameters())
for _ in range(2):
    loss = model(images, keypoints, mask).logits.square().mean()
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
print(peak_resident_bytes() - before)
"""
# Forward passes without gradients, as `kaf predict --batch-size BATCH` runs them.
PREDICTIONS = """
model.eval()
with torch.no_grad():
    for _ in range(2):
        probabilities = model(images, keypoints, mask).logits.softmax(1)
        del probabilities
print(peak_resident_bytes() - before)
"""


def measured_rise(batch: int, work: str) -> int:
    script = (SETUP + work).replace("BATCH", str(batch))
    run = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return int(run.stdout)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_estimate_is_close_to_the_measured_peak_of_a_training_step():
    measured = measured_rise(4, TRAINING_STEPS)
    estimate = training_step_bytes(preset_config("interactive"), 4, 128, 128)

    assert 0.75 <= measured / estimate <= 1.25, (measured, estimate)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_prediction_estimate_is_close_to_the_measured_peak_of_a_forward_pass():
    measured = measured_rise(16, PREDICTIONS)
    estimate = inference_batch_bytes(preset_config("interactive"), 16, 128, 128)

    assert 0.75 <= measured / estimate <= 1.1, (measured, estimate)  # on the refusing side, not far


def test_prediction_estimate_grows_with_the_batch_and_stays_below_training():
    config = preset_config("interactive")
    one, eight = (inference_batch_bytes(config, batch, 128, 128) for batch in (1, 8))

    assert eight > one
    assert eight < training_step_bytes(config, 8, 128, 128)  # no activations kept for a backward pass


def test_estimate_grows_linearly_with_the_batch():
    config = preset_config("interactive")
    two, four, eight = (training_step_bytes(config, batch, 64, 64) for batch in (2, 4, 8))

    assert eight - four == pytest.approx(2 * (four - two), rel=0.01)
    assert four - two > 0


@pytest.fixture
def scan(tmp_path):
    image, labels = synthetic_volume()
    sparse = labels * 0
    sparse[[2, 5]] = labels[[2, 5]]
    return save_nifti(image, tmp_path / "scan.nii.gz"), save_nifti(sparse, tmp_path / "sparse.nii.gz")


def refused_quickly(argv: list[str], capsys) -> str:
    """Runs a command that must be refused before allocating; returns its message."""
    started = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - started < 20  # allocating hundreds of GB would fail or swap, not return
    return capsys.readouterr().err


@pytest.mark.skipif(available_ram_bytes() is None, reason="the system does not report its free memory")
def test_finetune_with_a_batch_larger_than_memory_is_refused_before_allocation(scan, tmp_path, capsys):
    image, sparse = scan
    out = tmp_path / "model.safetensors"
    argv = ["finetune", "--image", str(image), "--labels", str(sparse), "--out", str(out)]

    message = refused_quickly([*argv, "--batch-size", "100000", "--device", "cpu"], capsys)

    assert "Not enough memory on cpu for fine-tuning on 100000 crops of 48 x 64 per step" in message
    assert "smaller batch size" in message and not out.exists()


@pytest.mark.skipif(available_ram_bytes() is None, reason="the system does not report its free memory")
def test_pretraining_with_a_batch_larger_than_memory_is_refused_before_allocation(scan, tmp_path, capsys):
    image, _ = scan
    out = tmp_path / "pretrained.safetensors"
    argv = ["pretrain", "--method", "kaf", "--data", str(image), "--out", str(out), "--steps", "1"]

    message = refused_quickly([*argv, "--batch-size", "100000", "--view-size", "32"], capsys)

    assert "Not enough memory on cpu for pretraining on 200000 views of 32 x 32 per step" in message
    assert not out.exists()


def test_predict_with_a_batch_larger_than_free_memory_is_refused_before_allocation(
    scan, tmp_path, capsys, monkeypatch
):
    image, _ = scan  # 8 slices of 48 x 64, padded to 48 x 64 for the model
    checkpoint = random_checkpoint(tmp_path / "model.safetensors", "finetune")
    out = tmp_path / "segmentation.nii.gz"
    argv = ["predict", "--image", str(image), "--checkpoint", str(checkpoint), "--out", str(out)]
    config = ModelConfig.from_dict(load_checkpoint(checkpoint)[1].model)
    one, eight = (inference_batch_bytes(config, batch, 48, 64) for batch in (1, 8))
    free = (one + eight) / 2 / devices.MEMORY_MARGIN  # enough for one slice per pass, not for eight
    monkeypatch.setattr(devices, "free_memory_bytes", lambda device: int(free))

    message = refused_quickly([*argv, "--batch-size", "8", "--device", "cpu"], capsys)

    assert "Not enough memory on cpu for the class probabilities of 8 slices" in message
    assert "a forward pass on 8 slices of 48 x 64" in message and not out.exists()
    assert main([*argv, "--batch-size", "1", "--device", "cpu", "--progress", "none"]) == 0
    assert out.exists()
