"""The steps every front-end chains together: read files, prepare, fine-tune, predict, explain, pretrain.

These functions turn file paths and checkpoints into the objects the jobs take, so the CLI, napari
and Slicer share one way of doing it. Each user job is chained once here, with its rules in one place:
`finetune_volume` (the custom preset, label names, the starting checkpoint; `finetune_from` when the
weights are already loaded, as in the benchmarks), `predict_volume` (which
model, the checkpoint's preparation replayed, uncertainty), `explain_slice` (the same model choice,
one slice's keypoints and attention) and `pretrain_volumes` (resume defaults,
view size, data loading, the processes under torchrun).
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
from kaf.data.volume_io.label_table import check_label_names
from kaf.jobs.events import CancelToken, Job, ProgressEvent, drive
from kaf.jobs.explain import Explanation, explain
from kaf.jobs.finetune import FinetuneResult, FinetuneSettings, Initialisation, finetune
from kaf.jobs.predict import Prediction, predict
from kaf.jobs.pretrain import (
    PretrainResult,
    PretrainSettings,
    communicator_from_environment,
    pretrain,
    rank_device,
    read_resume_point,
    with_resume_defaults,
)
from kaf.models import KafUNet, ModelConfig, preset_config
from kaf.models.checkpoints import (
    CUSTOM_PRESET,
    CheckpointMetadata,
    check_compatible,
    load_checkpoint,
    model_with_weights,
)
from kaf.models.default_weights import resolve_checkpoint
from kaf.runtime.errors import CheckpointError, InputDataError, KafError
from kaf.runtime.problems import summarise
from kaf.ssl import make_method
from kaf.ssl.data import SKIPPED_LOG, load_pretrain_data, volumes_from_arrays


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


def prepare_for_inference(
    volume: Volume, metadata: CheckpointMetadata, source: str | Path = "The checkpoint"
) -> PreparedVolume:
    """The checkpoint's recipe replayed on a new volume: same modality and clip window, statistics of
    this volume (the per-volume z-score of METHODS.md A.6), same keypoints, slice axis and scale.
    `source` names the checkpoint in errors about its recipe."""
    recorded = (
        IntensityNormalization.from_dict(metadata.normalization, str(source))
        if metadata.normalization
        else None
    )
    try:
        keypoints = KeypointConfig.from_dict(metadata.keypoints)
    except KafError as error:
        raise CheckpointError(
            f"{source}: its keypoint settings are invalid ({error}); the checkpoint is damaged or was "
            "edited. Choose another checkpoint."
        ) from error
    modality = recorded.modality if recorded else "auto"
    window = (recorded.clip_low, recorded.clip_high) if recorded and recorded.clip_low is not None else None
    normalization = fit_normalization(
        volume.array, modality, ct_window=window, source=str(volume.source or "image")
    )
    return PreparedVolume.from_array(
        volume.array,
        normalization,
        keypoints,
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
    initialisation."""
    return None if checkpoint is None else load_initialisation(checkpoint, preset)


def checked_label_names(names: Sequence[str] | None, classes: int) -> list[str] | None:
    """The class names to store in the model, one per class and background first; None: numbered."""
    if names is None:
        return None
    if len(names) != classes:
        raise InputDataError(
            f"{len(names)} label names were given but the labels have {classes} classes: give one name per "
            "class, background first"
        )
    return check_label_names(names)


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
    **options,
) -> Job[TrainedModel]:
    """Fine-tune a model on the annotated slices of `image`, starting from `checkpoint` (see `initialise`):
    `finetune_from` with those weights; `options`: those of `finetune_from` after `label_names`."""
    init = initialise(checkpoint, settings.preset)
    return (yield from finetune_from(image, annotation, settings, init, label_names, **options))


def finetune_from(
    image: Volume,
    annotation: SparseAnnotation,
    settings: FinetuneSettings,
    init: Initialisation | None,
    label_names: Sequence[str] | None = None,
    *,
    modality: str = "auto",
    max_side: int | None = None,
    adapt_seconds: float | None = None,
    on_ready: Callable[[], None] | None = None,
    cancel: CancelToken | None = None,
) -> Job[TrainedModel]:
    """Fine-tune a model on the annotated slices of `image` from weights already loaded (None: random
    init, which preset "custom" cannot have: it takes its architecture from the checkpoint): prepare the
    image for the model, then train. With `adapt_seconds`, the starting weights are
    first adapted to this image by a short self-supervised KAF pretraining on it (no labels used).
    `on_ready` runs once every input has been checked, before any training starts."""
    cancel = cancel or CancelToken()
    names = checked_label_names(label_names, annotation.classes)
    cancel.raise_if_cancelled("fine-tuning")
    if settings.preset == CUSTOM_PRESET and init is None:
        raise InputDataError(
            "The preset 'custom' takes its architecture from the checkpoint fine-tuning starts from: "
            "give a checkpoint."
        )
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


@dataclass
class Segmentation:
    """A whole volume segmented, on the grid of the image given, with the model that did it."""

    prediction: Prediction  # labels and class probabilities
    uncertainty: np.ndarray | None  # (z, y, x) float32 in [0, 1] when asked for (see Prediction.uncertainty)
    model: KafUNet
    metadata: CheckpointMetadata
    prepared: PreparedVolume  # the image as the model saw it; explanation reuses it

    @property
    def labels(self) -> np.ndarray:
        return self.prediction.labels

    @property
    def label_names(self) -> list[str]:
        return list(self.metadata.label_names)

    def voxels_per_label(self) -> dict[str, int]:
        counts = np.bincount(self.labels.ravel(), minlength=len(self.label_names))
        return dict(zip(self.label_names, counts.tolist(), strict=False))


def _model_on_image(
    image: Volume | None,
    checkpoint: str | Path | None,
    model: KafUNet | None,
    metadata: CheckpointMetadata | None,
    prepared: PreparedVolume | None,
) -> Job[tuple[KafUNet, CheckpointMetadata, PreparedVolume]]:
    """The model in memory, else the fine-tuned `checkpoint`'s; `image` as the model saw it (`prepared`)
    or, without it, with the checkpoint's preparation replayed (`prepare_for_inference`)."""
    if model is None:
        if checkpoint is None:
            raise CheckpointError(
                "There is no model yet: fine-tune one, or choose a fine-tuned checkpoint file."
            )
        yield ProgressEvent("prepare", 0, 1, message=f"loading {Path(checkpoint).name}")
        model, metadata = load_finetuned_model(checkpoint)
    elif metadata is None:
        raise ValueError("a model in memory comes with its checkpoint metadata")
    if prepared is None:
        if image is None:
            raise ValueError("without the prepared image, the image itself is needed")
        prepared = prepare_for_inference(image, metadata, checkpoint or "The model's checkpoint")
    return model, metadata, prepared


def predict_volume(
    image: Volume,
    checkpoint: str | Path | None = None,
    *,
    model: KafUNet | None = None,
    metadata: CheckpointMetadata | None = None,
    prepared: PreparedVolume | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    largest_component: bool = True,
    uncertainty: bool = False,
    cancel: CancelToken | None = None,
) -> Job[Segmentation]:
    """Segment every slice of `image` with `model` (a model in memory, with its `metadata`), or else with
    the fine-tuned `checkpoint` file. `prepared`: `image` as the model saw it in training, reused as it is;
    without it the checkpoint's preparation is replayed on `image` (`prepare_for_inference`: its
    normalisation recipe, keypoints, slice axis and scale). The labels and probabilities come back on
    the grid of `image`; `largest_component` keeps each class's largest 3D piece only."""
    source = checkpoint if model is None else None  # named in errors about the model's outputs
    model, metadata, prepared = yield from _model_on_image(image, checkpoint, model, metadata, prepared)
    prediction = yield from predict(model, prepared, device, batch_size, cancel, largest_component, source)
    return Segmentation(
        prediction, prediction.uncertainty() if uncertainty else None, model, metadata, prepared
    )


def predict_trained(image: Volume, trained: TrainedModel, **options) -> Job[Segmentation]:
    """`predict_volume` with the model just fine-tuned on `image`, on the image as it saw it;
    `options`: those of `predict_volume` after `prepared`."""
    result = trained.result
    return predict_volume(
        image, model=result.model, metadata=result.metadata, prepared=trained.prepared, **options
    )


def explain_slice(
    image: Volume | None,
    slice_index: int,
    checkpoint: str | Path | None = None,
    *,
    model: KafUNet | None = None,
    metadata: CheckpointMetadata | None = None,
    prepared: PreparedVolume | None = None,
    device: str = "auto",
) -> Job[Explanation]:
    """Keypoints and attention of slice `slice_index` (along the model's slice axis), with the model and
    preparation chosen as in `predict_volume`; `image` may be None when `prepared` is given."""
    source = checkpoint if model is None else None  # named in errors about the model's outputs
    model, _metadata, prepared = yield from _model_on_image(image, checkpoint, model, metadata, prepared)
    return (yield from explain(model, prepared, slice_index, device, source))


@dataclass
class PretrainedBackbone:
    result: PretrainResult
    volumes: int  # volumes read
    slices: int  # their slices along the slice axis
    rank: int  # this process under torchrun (0 alone); only rank 0 reports progress and writes


def _ignore(message: str) -> None:
    pass


def pretrain_volumes(
    data: Sequence[str | Path],
    settings: PretrainSettings,
    out: str | Path,
    *,
    resume: str | Path | None = None,
    checkpoint: str | Path | None = None,
    slice_axis: int = 0,
    modality: str = "auto",
    notify: Callable[[str], None] = _ignore,
    cancel: CancelToken | None = None,
) -> Job[PretrainedBackbone]:
    """Self-supervised pretraining on the volumes (and folders of volumes) `data`, saving to `out`.
    `resume`: a pretraining checkpoint this run continues exactly, with its seed and, where `settings`
    leave them None, its length, batch, rate, optimiser and view size; `checkpoint` (not with `resume`):
    weights to start the backbone from ('default': the shipped ones). Under torchrun every process runs
    this: each joins the process group and takes its own GPU; only rank 0 yields progress events.
    `notify` gets a note for the user: pretraining on the CPU, the data files left out (the first few; all
    of them in a log file beside `out`)."""
    if resume and checkpoint:
        raise InputDataError("--resume continues a run with its own weights: leave out --checkpoint")
    start = load_initialisation(checkpoint, settings.preset) if checkpoint else None
    point = None
    if resume:
        point = read_resume_point(resume, settings.method, settings.model_config())
        settings = with_resume_defaults(settings, point)
    device = rank_device(settings.device)
    comm = communicator_from_environment(device)
    if comm.rank == 0 and device.type == "cpu":
        notify("pretraining on the CPU is slow (hours on real data); use a GPU where you can")
    config = settings.model_config()
    view_size = make_method(settings.method, **settings.method_overrides()).config.view_size
    volumes = load_pretrain_data(
        data,
        input_size=config.input_size,
        min_side=view_size // 2,
        keypoints=KeypointConfig(max_keypoints=config.max_keypoints),
        slice_axis=slice_axis,
        modality=modality,
    )
    if volumes.skipped and comm.rank == 0:
        skipped = summarise(volumes.skipped, SKIPPED_LOG, Path(out).parent)
        notify(f"warning: {len(volumes.skipped)} volumes left out: {skipped}")
    job = pretrain(volumes, settings, out, point, cancel, comm, device, start=start)
    result = (yield from job) if comm.rank == 0 else drive(job)
    return PretrainedBackbone(result, len(volumes.volumes), volumes.slice_count, comm.rank)
