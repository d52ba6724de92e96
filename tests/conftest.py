"""Shared fixtures: a small synthetic 'anatomy' volume and the real data folder (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from volume_factory import save_nifti, synthetic_volume

from kaf.data.keypoints import KeypointConfig
from kaf.jobs.finetune import default_label_names
from kaf.models import KafUNet, ModelConfig
from kaf.models.checkpoints import CUSTOM_PRESET, CheckpointMetadata, save_checkpoint

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def synthetic_files(tmp_path):
    """Image and a sparse annotation (slices 2 and 5 painted) as NIfTI files, plus the full reference."""
    image, labels = synthetic_volume()
    sparse = np.zeros_like(labels)
    sparse[[2, 5]] = labels[[2, 5]]
    return (
        save_nifti(image, tmp_path / "image.nii.gz"),
        save_nifti(sparse, tmp_path / "sparse.nii.gz"),
        labels,
    )


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real data folder {SHARED_DATA} is absent (it sits beside the repository in development)"
        )
    return SHARED_DATA


# A small KAF architecture that no preset has: what a `--preset custom` fine-tuning takes from its checkpoint.
CUSTOM_ARCHITECTURE = ModelConfig(
    base_width=4, token_dim=16, attention_heads=2, attention_blocks=1, max_keypoints=32, input_size=64
)


@pytest.fixture
def custom_checkpoint(tmp_path) -> Path:
    """A KAF-pretrained checkpoint (random weights) of CUSTOM_ARCHITECTURE."""
    return random_checkpoint(tmp_path / "custom.safetensors", "kaf")


def random_checkpoint(path: Path, method: str) -> Path:
    """A checkpoint of CUSTOM_ARCHITECTURE with random weights, as made by `method` ('finetune', 'kaf')."""
    torch.manual_seed(0)
    metadata = CheckpointMetadata(
        preset=CUSTOM_PRESET,
        model=CUSTOM_ARCHITECTURE.to_dict(),
        method=method,
        label_names=default_label_names(CUSTOM_ARCHITECTURE.classes),
        normalization=None,
        keypoints=KeypointConfig(max_keypoints=CUSTOM_ARCHITECTURE.max_keypoints).to_dict(),
    )
    return save_checkpoint(path, KafUNet(CUSTOM_ARCHITECTURE).state_dict(), metadata)
