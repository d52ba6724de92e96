"""Shared fixtures: a small synthetic 'anatomy' volume and the real data folder (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from volume_factory import save_nifti, synthetic_volume

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
