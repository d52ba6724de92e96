"""Fine-tuning on labelled slices of several volumes: the few-label protocol's "M labelled volumes, all
their slices" (METHODS.md A.6), and with one volume and its annotated slices the annotator's protocol.

Volumes differ in slice size, so their slices are put on one grid: each volume's own model grid (resized,
zero-padded to a multiple of 16, as `PreparedVolume.model_images` makes it) is zero-padded again, centred,
to the largest grid of the pool, and its keypoints move with it. The zeros are the padding the layout
already uses. The optimiser, loss, schedule and augmentation are those of `kaf.jobs.finetune`, and the
random draws come in the same order: on a single volume this job trains exactly the model `finetune` does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from kaf.data.keypoints import drop_padding
from kaf.data.preparation import PreparedVolume
from kaf.jobs.events import CancelToken, Job, StageClock
from kaf.jobs.finetune import (
    FinetuneResult,
    FinetuneSettings,
    Initialisation,
    SlicePool,
    build_model,
    finetune_metadata,
    labelled_slices,
    train_on_pool,
)
from kaf.jobs.finetune import model_config as preset_model_config
from kaf.models import ModelConfig
from kaf.models.checkpoints import CheckpointMetadata, fingerprint_arrays
from kaf.runtime.devices import resolve_device
from kaf.runtime.errors import InputDataError


@dataclass
class LabelledVolume:
    prepared: PreparedVolume
    labels: np.ndarray  # (z, y, x) on the image grid
    slices: tuple[int, ...] | None = None  # the labelled slices along the slice axis; None: every slice
    name: str = ""

    def indices(self) -> list[int]:
        return list(range(self.prepared.slice_count)) if self.slices is None else list(self.slices)


def check_volumes(volumes: Sequence[LabelledVolume], classes: int) -> None:
    if not volumes:
        raise InputDataError("fine-tuning needs at least one labelled volume")
    for volume in volumes:
        name = volume.name or "a volume"
        shape = volume.labels.shape
        if shape[volume.prepared.slice_axis] != volume.prepared.slice_count or volume.labels.ndim != 3:
            raise InputDataError(
                f"{name}: labels of shape {shape} do not fit its {volume.prepared.slice_count} slices"
            )
        if not volume.indices():
            raise InputDataError(f"{name}: no labelled slice")
        outside = [i for i in volume.indices() if not 0 <= i < volume.prepared.slice_count]
        if outside:
            raise InputDataError(f"{name}: slices {outside} do not exist")
        if volume.labels.min() < 0 or volume.labels.max() >= classes:
            raise InputDataError(
                f"{name}: labels span {int(volume.labels.min())}..{int(volume.labels.max())}, outside the "
                f"model's classes 0..{classes - 1}"
            )
    if len({volume.prepared.slice_axis for volume in volumes}) > 1:
        raise InputDataError("the volumes were cut along different slice axes")


def pad_to(pool: SlicePool, shape: tuple[int, int]) -> SlicePool:
    """Zero-pad the pool's slices, centred, to `shape`; keypoints move by the same offset."""
    height, width = pool.images.shape[-2:]
    top, left = (shape[0] - height) // 2, (shape[1] - width) // 2
    padding = (left, shape[1] - width - left, top, shape[0] - height - top)
    offset = torch.tensor([top, left])
    return SlicePool(
        F.pad(pool.images, padding),
        F.pad(pool.labels, padding),
        torch.where(pool.keypoint_mask[..., None], pool.keypoints + offset, pool.keypoints),
        pool.keypoint_mask,
    )


def pool_slices(volumes: Sequence[LabelledVolume]) -> SlicePool:
    pools = [
        labelled_slices(volume.prepared, volume.labels, volume.prepared.slice_axis, volume.indices())
        for volume in volumes
    ]
    if len({pool.keypoints.shape[1] for pool in pools}) > 1:
        raise InputDataError("the volumes were prepared with different keypoint caps")
    shape = tuple(max(pool.images.shape[axis] for pool in pools) for axis in (-2, -1))
    padded = [pad_to(pool, shape) for pool in pools]
    images, labels, keypoints, mask = (
        torch.cat([getattr(p, f.name) for p in padded]) for f in fields(SlicePool)
    )
    return SlicePool(images, labels, *drop_padding(keypoints, mask))


def multi_finetune(
    volumes: Sequence[LabelledVolume],
    classes: int,
    settings: FinetuneSettings,
    init: Initialisation | None = None,
    model_config: ModelConfig | None = None,
    label_names: list[str] | None = None,
    cancel: CancelToken | None = None,
) -> Job[FinetuneResult]:
    """Train on every labelled slice of `volumes`. `model_config` replaces the preset's model (the plain
    UNet baseline, tests); its number of classes becomes `classes`."""
    cancel = cancel or CancelToken()
    clock = StageClock()
    check_volumes(volumes, classes)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    config = (
        model_config.with_classes(classes)
        if model_config is not None
        else preset_model_config(settings.preset, classes, init)
    )
    device = resolve_device(settings.device)
    total = sum(len(volume.indices()) for volume in volumes)
    yield clock.event("prepare", 0, total, message=f"detecting keypoints on {total} slices")
    pool = pool_slices(volumes)
    yield clock.event("prepare", total, total, message="keypoints ready")

    model, transfer = build_model(config, init)
    started = time.perf_counter()
    losses = yield from train_on_pool(model, pool, settings, device, generator, clock, cancel)
    model.cpu().eval()
    metadata = _metadata(volumes, config, settings, init, label_names, len(losses))
    return FinetuneResult(model, metadata, losses, transfer, time.perf_counter() - started)


def _metadata(
    volumes: Sequence[LabelledVolume],
    config: ModelConfig,
    settings: FinetuneSettings,
    init: Initialisation | None,
    label_names: list[str] | None,
    steps: int,
) -> CheckpointMetadata:
    """Normalisation and keypoints of the first volume (they share modality and keypoint settings); each
    volume was resized by its own scale, so `scale` holds their median for inference to replay."""
    scales = [volume.prepared.layout.scale for volume in volumes]
    arrays = [array for volume in volumes for array in (volume.prepared.slices, volume.labels)]
    return finetune_metadata(
        volumes[0].prepared,
        config,
        settings,
        init,
        label_names,
        steps,
        fingerprint_arrays(*arrays),
        float(np.median(scales)),
        labelled_volumes=[volume.name for volume in volumes],
        labelled_slices=[volume.indices() for volume in volumes],
        scales=scales,
    )
