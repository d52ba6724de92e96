"""Training memory is estimated before allocation, and requests that cannot fit are refused up front."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from volume_factory import save_nifti, synthetic_volume

from kaf.app.cli import main
from kaf.models import preset_config
from kaf.models.memory_estimate import training_step_bytes
from kaf.runtime.host_memory import available_ram_bytes

# Two Adam steps of the interactive preset in a fresh process; prints its peak RSS rise in bytes. (Not
# ru_maxrss: it would carry over the RSS of pytest, which forks the process.)
MEASURE_STEP = """
import torch
from kaf.runtime.host_memory import peak_resident_bytes, resident_bytes
from kaf.models import KafUNet, preset_config

torch.set_num_threads(1)
config = preset_config("interactive")
images = torch.randn(4, 1, 128, 128)
keypoints = torch.randint(0, 128, (4, config.max_keypoints, 2))
mask = torch.ones(4, config.max_keypoints, dtype=torch.bool)
before = resident_bytes()
model = KafUNet(config)
optimiser = torch.optim.Adam(model.parameters())
for _ in range(2):
    loss = model(images, keypoints, mask).logits.square().mean()
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
print(peak_resident_bytes() - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_estimate_is_close_to_the_measured_peak_of_a_training_step():
    measured = int(
        subprocess.run(
            [sys.executable, "-c", MEASURE_STEP], check=True, capture_output=True, text=True
        ).stdout
    )
    estimate = training_step_bytes(preset_config("interactive"), 4, 128, 128)

    assert 0.75 <= measured / estimate <= 1.25, (measured, estimate)


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
