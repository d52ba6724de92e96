"""The steps every front-end chains together: read files, prepare, fine-tune, predict, explain.

These functions turn file paths and checkpoints into the objects the jobs take, so the CLI, napari
and Slicer share one way of doing it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kaf.data.annotation import SparseAnnotation, sparse_annotation
from kaf.data.intensity import IntensityNormalization, fit_normalization
from kaf.data.keypoints import KeypointConfig
from kaf.data.preparation import PreparedVolume
from kaf.data.slices import scale_for_max_side
from kaf.data.volume_io import Volume, read_labels, read_volume
from kaf.jobs.events import CancelToken, Job
from kaf.jobs.finetune import Initialisation
from kaf.jobs.pretrain import PretrainSettings, pretrain
from kaf.models import KafUNet, ModelConfig, preset_config
from kaf.models.checkpoints import CheckpointMetadata, check_compatible, load_checkpoint, model_with_weights
from kaf.models.default_weights import resolve_checkpoint
from kaf.runtime.errors import CheckpointError
from kaf.ssl.data import volumes_from_arrays


def prepare_for_training(
    volume: Volume,
    preset: str | ModelConfig,
    slice_axis: int = 0,
    modality: str = "auto",
    max_side: int | None = None,
) -> PreparedVolume:
    """`preset`: a preset name or a model configuration (a checkpoint's own, for preset "custom").
    `max_side` None means the model's input size; 0 keeps the native resolution."""
    normalization = fit_normalization(volume.array, modality, source=str(volume.source or "image"))
    config = preset if isinstance(preset, ModelConfig) else preset_config(preset)
    keypoints = KeypointConfig(max_keypoints=config.max_keypoints)
    shape = np.moveaxis(volume.array, slice_axis, 0).shape[1:]
    scale = scale_for_max_side(shape, config.input_size if max_side is None else max_side)
    return PreparedVolume.from_array(volume.array, normalization, keypoints, slice_axis, scale)


def prepare_for_inference(volume: Volume, metadata: CheckpointMetadata) -> PreparedVolume:
    """The checkpoint's recipe replayed on a new volume: same modality and clip window, statistics of
    this volume (the per-volume z-score of METHODS.md A.6), same keypoints, slice axis and scale."""
    recorded = IntensityNormalization.from_dict(metadata.normalization) if metadata.normalization else None
    modality = recorded.modality if recorded else "auto"
    window = (recorded.clip_low, recorded.clip_high) if recorded and recorded.clip_low is not None else None
    normalization = fit_normalization(
        volume.array, modality, ct_window=window, source=str(volume.source or "image")
    )
    return PreparedVolume.from_array(
        volume.array,
        normalization,
        KeypointConfig.from_dict(metadata.keypoints),
        metadata.slice_axis,
        float(metadata.extra.get("scale", 1.0)),
    )


def read_annotation(
    labels_path: str | Path, image: Volume, slice_axis: int = 0, explicit_slices: tuple[int, ...] = ()
) -> SparseAnnotation:
    labels = read_labels(labels_path, image)
    return sparse_annotation(labels, slice_axis, explicit_slices, source=str(labels_path))


def load_initialisation(path: str | Path, preset: str | None) -> Initialisation:
    """Weights to start fine-tuning from: a checkpoint file, or 'default' for the shipped one."""
    path = resolve_checkpoint(path)
    state, metadata = load_checkpoint(path)
    check_compatible(metadata, preset, path)
    return Initialisation(state, metadata, str(path))


def load_finetuned_model(path: str | Path) -> tuple[KafUNet, CheckpointMetadata]:
    state, metadata = load_checkpoint(path)
    if metadata.method != "finetune":
        raise CheckpointError(
            f"{path} holds pretrained weights ('{metadata.method}'), not a fine-tuned model: fine-tune from "
            "it first, then predict."
        )
    return model_with_weights(state, metadata, path).eval(), metadata


def open_image(path: str | Path) -> Volume:
    return read_volume(path)


ADAPT_STEP_CAP = 100_000  # the time budget, not the step count, ends an adaptation
ADAPT_BATCH = 8


def adapt_to_image(
    prepared: PreparedVolume,
    preset: str,
    init: Initialisation | None,
    time_budget: float,
    work_dir: str | Path,
    device: str = "auto",
    cancel: CancelToken | None = None,
) -> Job[Initialisation]:
    """A short KAF self-supervised pretraining on the open image itself (napari's Adapt), starting from
    `init`, for `time_budget` seconds; returns the adapted weights to fine-tune from. The checkpoint is
    written under `work_dir`."""
    images = prepared.model_images(range(prepared.slice_count))[:, 0].numpy()
    side = min(images.shape[1:])
    settings = PretrainSettings(
        method="kaf",
        preset=preset,
        steps=ADAPT_STEP_CAP,
        batch_size=ADAPT_BATCH,
        view_size=min(128, side - side % 16),
        device=device,
        time_budget=time_budget,
        save_every=ADAPT_STEP_CAP,
    )
    data = volumes_from_arrays([images], prepared.keypoint_config.max_keypoints)
    out = Path(work_dir) / "adapted.safetensors"
    yield from pretrain(data, settings, out, cancel=cancel, start=init)
    return load_initialisation(out, preset)
