"""Fine-tuning on the labelled slices of several volumes (kaf.jobs.multi_finetune)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ssl_support import tiny_model
from volume_factory import synthetic_volume

from kaf.app.workflow import prepare_for_training
from kaf.data.annotation import sparse_annotation
from kaf.data.intensity import fit_normalization
from kaf.data.keypoints import KeypointConfig
from kaf.data.preparation import PreparedVolume
from kaf.data.volume_io import read_labels, read_volume
from kaf.jobs.events import drive
from kaf.jobs.finetune import FinetuneSettings, finetune
from kaf.jobs.multi_finetune import LabelledVolume, multi_finetune, pool_slices
from kaf.runtime.errors import InputDataError

TINY = tiny_model(kaf=True).config
QUICK = FinetuneSettings(steps=3, batch_size=2, crop_size=32, device="cpu")


def _volume(height: int, width: int, seed: int, slices: tuple[int, ...] | None = None) -> LabelledVolume:
    image, labels = synthetic_volume(slices=6, height=height, width=width, seed=seed)
    prepared = PreparedVolume.from_array(image, fit_normalization(image, "mri"), KeypointConfig(32))
    return LabelledVolume(prepared, labels, slices, name=f"volume {seed}")


def test_pool_holds_every_slice_of_every_volume_centred_on_the_largest_grid():
    small, large = _volume(32, 48, 0), _volume(48, 64, 1)  # model grids 32 x 48 and 48 x 64
    pool = pool_slices([small, large])
    assert len(pool) == 12 and pool.images.shape == (12, 1, 48, 64) and pool.labels.shape == (12, 48, 64)
    own = small.prepared.model_images(range(6))
    torch.testing.assert_close(pool.images[:6, :, 8:40, 8:56], own, rtol=0, atol=0)
    assert pool.images[:6, :, :8].abs().sum() == 0 and pool.labels[:6, :8].sum() == 0
    assert torch.equal(pool.labels[:6, 8:40, 8:56], torch.from_numpy(small.labels.astype(np.int64)))
    # Keypoints stay on the same pixels of the anatomy after the shift.
    keypoints = small.prepared.keypoint_batch(range(6))
    length = pool.keypoint_mask.shape[1]
    assert torch.equal(pool.keypoint_mask[:6], keypoints.mask[:, :length]) and keypoints.mask.any()
    for index in range(6):
        rows, cols = pool.keypoints[index][pool.keypoint_mask[index]].T
        own_rows, own_cols = keypoints.coords[index][keypoints.mask[index]].T
        assert torch.equal(pool.images[index, 0, rows, cols], own[index, 0, own_rows, own_cols])
    torch.testing.assert_close(pool.images[6:], large.prepared.model_images(range(6)), rtol=0, atol=0)


def test_pool_drops_only_keypoint_columns_that_are_padding_in_every_slice():
    volumes = [_volume(32, 48, 0), _volume(48, 64, 1)]
    full = [volume.prepared.keypoint_batch(range(6)).mask for volume in volumes]
    longest = max(int(mask.sum(1).max()) for mask in full)
    assert longest < 32  # the cap: there is padding to drop
    pool = pool_slices(volumes)
    assert pool.keypoint_mask.shape[1] == longest and pool.keypoints.shape[1] == longest
    assert torch.equal(pool.keypoint_mask.sum(1), torch.cat(full).sum(1))


def test_pool_takes_only_the_listed_slices():
    pool = pool_slices([_volume(32, 48, 0, slices=(1, 4)), _volume(48, 64, 1)])
    assert len(pool) == 8
    assert torch.equal(pool.labels[0, 8:40, 8:56], torch.from_numpy(_volume(32, 48, 0).labels[1]).long())


def test_one_volume_trains_exactly_the_model_of_single_volume_fine_tuning():
    volume = _volume(48, 64, 0, slices=(2, 5))
    sparse = np.zeros_like(volume.labels)
    sparse[[2, 5]] = volume.labels[[2, 5]]
    single = drive(finetune(volume.prepared, sparse_annotation(sparse), QUICK))
    multi = drive(multi_finetune([volume], 3, QUICK))
    assert multi.losses == single.losses
    expected = single.model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in multi.model.state_dict().items())


def test_result_records_volumes_slices_and_architecture():
    volumes = [_volume(32, 48, 0, slices=(0, 3)), _volume(48, 64, 1)]
    result = drive(multi_finetune(volumes, 3, QUICK, model_config=TINY))
    metadata = result.metadata
    assert metadata.method == "finetune" and metadata.steps == 3 and metadata.preset == "custom"
    assert metadata.model_config() == TINY.with_classes(3)
    assert metadata.extra["labelled_volumes"] == ["volume 0", "volume 1"]
    assert metadata.extra["labelled_slices"] == [[0, 3], list(range(6))]
    assert metadata.extra["pretrained_from"] == "random" and not result.model.training


def test_bad_volumes_are_refused():
    volume = _volume(32, 48, 0)
    with pytest.raises(InputDataError, match="at least one"):
        drive(multi_finetune([], 3, QUICK))
    with pytest.raises(InputDataError, match="outside the model's classes"):
        drive(multi_finetune([volume], 2, QUICK))
    with pytest.raises(InputDataError, match="do not exist"):
        drive(multi_finetune([_volume(32, 48, 0, slices=(9,))], 3, QUICK))


def test_loss_falls_on_two_real_hippocampus_volumes(shared_data):
    volumes = []
    for name in ("hippocampus_001", "hippocampus_003"):
        image = read_volume(shared_data / "msd_hippocampus" / "images" / f"{name}.nii.gz")
        labels = read_labels(shared_data / "msd_hippocampus" / "labels" / f"{name}.nii.gz", image)
        prepared = prepare_for_training(image, TINY)
        volumes.append(LabelledVolume(prepared, labels, tuple(range(8, 24)), name))
    settings = FinetuneSettings(steps=30, batch_size=4, crop_size=48, learning_rate=1e-2, device="cpu")
    losses = drive(multi_finetune(volumes, 3, settings, model_config=TINY)).losses
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
