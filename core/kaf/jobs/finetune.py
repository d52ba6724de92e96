"""Few-slice fine-tuning: train a KAF UNet on the annotated slices of one volume."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from monai.losses import DiceCELoss

from kaf.data.annotation import SparseAnnotation
from kaf.data.augment import AugmentationSettings, augment_batch
from kaf.data.preparation import PreparedVolume
from kaf.data.slices import take_slices
from kaf.jobs.events import CancelToken, Job, StageClock
from kaf.models import KafUNet, ModelConfig, preset_config
from kaf.models.checkpoints import (
    CUSTOM_PRESET,
    CheckpointMetadata,
    TransferReport,
    fingerprint_arrays,
    load_weights,
)
from kaf.models.memory_estimate import training_step_bytes
from kaf.models.unet import check_side
from kaf.runtime import validation
from kaf.runtime.devices import (
    autocast,
    check_memory,
    grad_scaler,
    is_out_of_memory,
    out_of_memory_error,
    resolve_device,
)
from kaf.runtime.errors import InputDataError

# What KAF transfers from pretraining (METHODS.md A.5); a pretraining checkpoint names its own groups.
PRETRAINED_GROUPS = ("encoder", "bottleneck")


# The settings a user chooses and their ranges (time_budget may be None: no limit).
_SETTING_RANGES = {
    "steps": validation.STEPS,
    "time_budget": validation.TIME_BUDGET,
    "batch_size": validation.BATCH_SIZE,
    "crop_size": validation.TRAINING_SIDE,
    "learning_rate": validation.LEARNING_RATE,
    "kaf_learning_rate_scale": validation.KAF_LEARNING_RATE_SCALE,
    "seed": validation.SEED,
}


@dataclass(frozen=True)
class FinetuneSettings:
    preset: str = "interactive"
    steps: int = 150
    time_budget: float | None = None  # seconds; training stops at whichever of steps / time comes first
    batch_size: int = 4
    crop_size: int = 128  # training crops; inference runs on whole slices
    # Chosen on ACDC with 2 annotated slices (README.md, Results so far): 3e-3 converges within the
    # budget, 1e-3 did not.
    learning_rate: float = 3e-3
    final_learning_rate: float = 3e-4  # cosine per step down to this floor
    weight_decay: float = 1e-5
    seed: int = 0
    device: str = "auto"
    augmentation: AugmentationSettings = field(default_factory=AugmentationSettings)
    # True: KAF layers encode each keypoint's place in its un-augmented slice, as at inference, rather than
    # its place in the augmented crop.
    slice_frame_positions: bool = False
    # The KAF layers' learning rate as a multiple of the rest of the model's (1 = one rate for all). A tenth
    # was higher than one rate in 29 of 36 paired runs from the shipped weights, and removed KAF's failing
    # seeds (BENCHMARKS.md, "The KAF layers at a tenth of the learning rate").
    kaf_learning_rate_scale: float = 0.1

    def __post_init__(self) -> None:
        for name, bounds in _SETTING_RANGES.items():
            bounds.check_optional(getattr(self, name), name)
        check_side(self.crop_size, "crop_size")


@dataclass
class Initialisation:
    """Weights to start from: a checkpoint's tensors and metadata."""

    state: dict[str, torch.Tensor]
    metadata: CheckpointMetadata
    source: str


@dataclass
class FinetuneResult:
    model: KafUNet  # on the CPU, in eval mode
    metadata: CheckpointMetadata
    losses: list[float]
    transfer: TransferReport | None
    seconds: float


def cosine_learning_rate(step: int, total: int, start: float, floor: float) -> float:
    """lr_t = floor + (start - floor) * (1 + cos(pi t / T)) / 2 (METHODS.md A.6)."""
    return floor + 0.5 * (start - floor) * (1 + np.cos(np.pi * step / total))


def build_model(config: ModelConfig, init: Initialisation | None) -> tuple[KafUNet, TransferReport | None]:
    """A fresh model, then the whole checkpoint when it is a fine-tuned model of the same shape, or the
    pretrained encoder otherwise."""
    model = KafUNet(config)
    if init is None:
        return model, None
    same_model = init.metadata.model_config() == config
    groups = None if same_model and init.metadata.method == "finetune" else transfer_groups(init.metadata)
    return model, load_weights(model, init.state, groups, source=init.source)


def model_config(preset: str, classes: int, init: Initialisation | None) -> ModelConfig:
    """The preset's model, or with preset "custom" the architecture of the starting checkpoint."""
    if preset != CUSTOM_PRESET:
        return preset_config(preset, classes=classes)
    if init is None:
        raise InputDataError(
            "preset 'custom' takes its architecture from a checkpoint: give one to start from"
        )
    return init.metadata.model_config().with_classes(classes)


def transfer_groups(metadata: CheckpointMetadata) -> tuple[str, ...]:
    """The parts of a pretrained checkpoint that fine-tuning takes: those its method transfers."""
    return tuple(metadata.extra.get("transfer", PRETRAINED_GROUPS))


@dataclass
class SlicePool:
    """Labelled slices on one model grid: what the training loop draws its batches from."""

    images: torch.Tensor  # [N, 1, H, W] float32
    labels: torch.Tensor  # [N, H, W] int64
    keypoints: torch.Tensor  # [N, K, 2] int64 (row, col)
    keypoint_mask: torch.Tensor  # [N, K] bool

    def __len__(self) -> int:
        return self.images.shape[0]


def labelled_slices(
    prepared: PreparedVolume, labels: np.ndarray, slice_axis: int, indices: list[int]
) -> SlicePool:
    """The listed slices of a volume and its labels on the volume's model grid, with their keypoints."""
    stack = take_slices(labels, slice_axis)[indices].astype(np.int64)
    model_labels = prepared.layout.to_model(torch.from_numpy(stack).unsqueeze(1).float(), mode="nearest")
    keypoints = prepared.keypoint_batch(indices)
    images = prepared.model_images(indices)
    return SlicePool(images, model_labels[:, 0].long(), keypoints.coords, keypoints.mask)


def annotated_pool(prepared: PreparedVolume, annotation: SparseAnnotation) -> SlicePool:
    return labelled_slices(prepared, annotation.labels, annotation.slice_axis, list(annotation.annotated))


def parameter_groups_by_rate(model: KafUNet, kaf_scale: float) -> list[dict]:
    """The KAF layers' parameters and the rest as two optimiser groups, each with its learning-rate scale."""
    kaf = [p for name, p in model.named_parameters() if ".kaf." in f".{name}"]
    kaf_ids = {id(p) for p in kaf}
    rest = [p for p in model.parameters() if id(p) not in kaf_ids]
    return [{"params": rest, "rate_scale": 1.0}, {"params": kaf, "rate_scale": kaf_scale}]


def train_on_pool(
    model: KafUNet,
    pool: SlicePool,
    settings: FinetuneSettings,
    device: torch.device,
    generator: torch.Generator,
    clock: StageClock,
    cancel: CancelToken,
) -> Job[list[float]]:
    """Adam, Dice + CE, a cosine schedule per step, augmented crops of the pool's slices; returns the loss
    of each step. Stops at the step or time budget, whichever comes first."""
    crop = tuple(min(settings.crop_size, side) for side in pool.images.shape[-2:])
    check_memory(
        device,
        training_step_bytes(model.config, settings.batch_size, *crop),
        f"fine-tuning on {settings.batch_size} crops of {crop[0]} x {crop[1]} per step",
    )
    model.to(device).train()
    optimiser = torch.optim.Adam(
        parameter_groups_by_rate(model, settings.kaf_learning_rate_scale),
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
    )
    scaler = grad_scaler(device)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    losses: list[float] = []
    clock.start_stage()
    started = time.perf_counter()
    for step in range(1, settings.steps + 1):
        cancel.raise_if_cancelled("fine-tuning")
        pick = torch.randint(0, len(pool), (settings.batch_size,), generator=generator)
        batch = augment_batch(
            pool.images[pick],
            pool.labels[pick],
            pool.keypoints[pick],
            pool.keypoint_mask[pick],
            crop,
            settings.augmentation,
            generator,
        )
        rate = cosine_learning_rate(
            step - 1, settings.steps, settings.learning_rate, settings.final_learning_rate
        )
        for group in optimiser.param_groups:
            group["lr"] = rate * group["rate_scale"]
        try:
            with autocast(device):
                positions = batch.slice_positions.to(device) if settings.slice_frame_positions else None
                logits = model(
                    batch.images.to(device),
                    batch.keypoints.to(device),
                    batch.keypoint_mask.to(device),
                    keypoint_positions=positions,
                ).logits
                loss = loss_function(logits.float(), batch.labels[:, None].to(device))
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
        except RuntimeError as error:
            if is_out_of_memory(error):
                raise out_of_memory_error(device, "fine-tuning") from error
            raise
        value = float(loss.detach())
        if not np.isfinite(value):
            raise InputDataError(
                f"the loss became {value} at step {step}: "
                "lower the learning rate or check the image intensities"
            )
        losses.append(value)
        yield clock.event("finetune", step, settings.steps, value)
        if settings.time_budget is not None and time.perf_counter() - started >= settings.time_budget:
            yield clock.event(
                "finetune", step, step, value, message=f"time budget of {settings.time_budget:g} s reached"
            )
            break
    return losses


def finetune(
    prepared: PreparedVolume,
    annotation: SparseAnnotation,
    settings: FinetuneSettings,
    init: Initialisation | None = None,
    label_names: list[str] | None = None,
    cancel: CancelToken | None = None,
) -> Job[FinetuneResult]:
    cancel = cancel or CancelToken()
    clock = StageClock()
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    config = model_config(settings.preset, annotation.classes, init)
    device = resolve_device(settings.device)

    indices = list(annotation.annotated)
    yield clock.event("prepare", 0, len(indices), message=f"detecting keypoints on {len(indices)} slices")
    pool = annotated_pool(prepared, annotation)
    yield clock.event("prepare", len(indices), len(indices), message="keypoints ready")

    model, transfer = build_model(config, init)
    started = time.perf_counter()
    losses = yield from train_on_pool(model, pool, settings, device, generator, clock, cancel)
    model.cpu().eval()
    metadata = finetune_metadata(
        prepared,
        config,
        settings,
        init,
        label_names,
        len(losses),
        fingerprint_arrays(prepared.slices, annotation.labels),
        prepared.layout.scale,
        annotated_slices=indices,
    )
    return FinetuneResult(model, metadata, losses, transfer, time.perf_counter() - started)


def finetune_metadata(
    prepared: PreparedVolume,
    config: ModelConfig,
    settings: FinetuneSettings,
    init: Initialisation | None,
    label_names: list[str] | None,
    steps: int,
    data_fingerprint: str,
    scale: float,
    **extra,
) -> CheckpointMetadata:
    """The metadata of a fine-tuned model, for both fine-tuning jobs. `prepared`: the (first) training
    volume, whose normalisation, keypoints and slice axis inference replays; `scale`: the resize factor
    inference applies; `extra`: what the job adds about its training data."""
    named_preset = settings.preset != CUSTOM_PRESET and config == preset_config(
        settings.preset, config.classes
    )
    return CheckpointMetadata(
        preset=settings.preset if named_preset else CUSTOM_PRESET,
        model=config.to_dict(),
        method="finetune",
        label_names=label_names or default_label_names(config.classes),
        normalization=prepared.normalization.to_dict(),
        keypoints=prepared.keypoint_config.to_dict(),
        slice_axis=prepared.slice_axis,
        steps=steps,
        data_fingerprint=data_fingerprint,
        extra={
            **extra,
            "finetune": asdict(settings),
            "pretrained_from": init.metadata.method if init else "random",
            "scale": scale,
        },
    )


def default_label_names(classes: int) -> list[str]:
    return ["background", *(f"label {i}" for i in range(1, classes))]
