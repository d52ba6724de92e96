"""The steps every front-end chains together: read files, prepare, fine-tune, predict, explain.

These functions turn file paths and checkpoints into the objects the jobs take, so the CLI, napari
and Slicer share one way of doing it. `finetune_volume` is the whole fine-tuning of one volume, with
its rules (the custom preset, label names, the starting checkpoint) in one place.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kaf.data.annotation import SparseAnnotation, sparse_annotation
from kaf.data.intensity import IntensityNormalization, fit_normalization
from kaf.data.keypoints import KeypointConfig
from kaf.data.preparation import PreparedVolume
from kaf.data.slices import scale_for_max_side
from kaf.data.volume_io import Volume, read_labels, read_volume
from kaf.jobs.events import CancelToken, Job
from kaf.jobs.finetune import FinetuneResult, FinetuneSettings, Initialisation, finetune
from kaf.jobs.pretrain import PretrainSettings, pretrain
from kaf.models import KafUNet, ModelConfig, preset_config
from kaf.models.checkpoints import (
    CUSTOM_PRESET,
    CheckpointMetadata,
    check_compatible,
    load_checkpoint,
    model_with_weights,
)
from kaf.models.default_weights import resolve_checkpoint
from kaf.runtime.errors import CheckpointError, InputDataError
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


def initialise(checkpoint: str | Path | None, preset: str) -> Initialisation | None:
    """The weights to fine-tune from: a checkpoint file, 'default' for the shipped one, or None for random
    initialisation, which preset "custom" cannot have: it takes its architecture from the checkpoint."""
    if checkpoint is not None:
        return load_initialisation(checkpoint, preset)
    if preset == CUSTOM_PRESET:
        raise InputDataError(
            "The preset 'custom' takes its architecture from the checkpoint fine-tuning starts from: "
            "give a checkpoint."
        )
    return None


def checked_label_names(names: Sequence[str] | None, classes: int) -> list[str] | None:
    """The class names to store in the model, one per class and background first; None: numbered."""
    if names is None:
        return None
    if len(names) != classes:
        raise InputDataError(f"{len(names)} label names were given but the labels have {classes} classes")
    return list(names)


@dataclass
class TrainedModel:
    result: FinetuneResult
    prepared: PreparedVolume  # the image as the model saw it; prediction and explanation reuse it


def finetune_volume(
    image: Volume,
    annotation: SparseAnnotation,
    settings: FinetuneSettings,
    checkpoint: str | Path | None = None,
    label_names: Sequence[str] | None = None,
    *,
    modality: str = "auto",
    max_side: int | None = None,
    adapt_seconds: float | None = None,
    on_ready: Callable[[], None] | None = None,
    cancel: CancelToken | None = None,
) -> Job[TrainedModel]:
    """Fine-tune a model on the annotated slices of `image`: start from `checkpoint` (see `initialise`),
    prepare the image for the model, then train. With `adapt_seconds`, the starting weights are first
    adapted to this image by a short self-supervised KAF pretraining on it (no labels used).
    `on_ready` runs once every input has been checked, before any training starts."""
    cancel = cancel or CancelToken()
    init = initialise(checkpoint, settings.preset)
    names = checked_label_names(label_names, annotation.classes)
    cancel.raise_if_cancelled("fine-tuning")
    architecture = init.metadata.model_config() if settings.preset == CUSTOM_PRESET else settings.preset
    prepared = prepare_for_training(image, architecture, annotation.slice_axis, modality, max_side)
    if on_ready is not None:
        on_ready()
    if adapt_seconds:
        with tempfile.TemporaryDirectory(prefix="kaf-adapt-") as work_dir:
            init = yield from adapt_to_image(
                prepared, settings.preset, init, adapt_seconds, work_dir, settings.device, cancel
            )
    result = yield from finetune(prepared, annotation, settings, init, names, cancel)
    return TrainedModel(result, prepared)
