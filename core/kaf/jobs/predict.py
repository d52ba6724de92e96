"""Whole-volume prediction: every slice through the model, results back on the original grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent

from kaf.data.preparation import PreparedVolume
from kaf.data.slices import SliceLayout, put_slices
from kaf.jobs.events import CancelToken, Job, StageClock
from kaf.models import KafUNet, ModelConfig
from kaf.models.memory_estimate import inference_batch_bytes
from kaf.runtime.devices import (
    autocast,
    autocast_dtype,
    check_memory,
    is_out_of_memory,
    out_of_memory_error,
    resolve_device,
)
from kaf.runtime.errors import InputDataError

# Slices per forward pass when none is asked for. On the CPU one at a time is fastest per slice (2-core
# machine, 2026-11-29, batch 1 / 2 / 4: interactive 0.19 / 0.21 / 0.24 s per 256^2 slice, paper-acdc
# 2.50 / 2.65 / 3.06 s per 352^2 slice): a larger batch's feature maps no longer fit in the caches.
# Accelerators need batches to be kept busy.
CPU_INFERENCE_BATCH = 1
ACCELERATOR_INFERENCE_BATCH = 4


@dataclass
class Prediction:
    probabilities: np.ndarray  # (classes, z, y, x) float32, summing to 1 over classes
    labels: np.ndarray  # (z, y, x) uint8 (uint16 beyond 255 classes)

    def uncertainty(self) -> np.ndarray:
        """Normalised entropy per voxel in [0, 1]: 0 = certain, 1 = uniform over classes."""
        p = np.clip(self.probabilities, 1e-8, 1.0)
        return (-(p * np.log(p)).sum(0) / np.log(p.shape[0])).astype(np.float32)


def predict_slices(
    model: KafUNet, prepared: PreparedVolume, indices: list[int], device: torch.device
) -> torch.Tensor:
    """Softmax probabilities [K, C, H, W] on the original slice grid for the given slices."""
    images = prepared.model_images(indices).to(device)
    keypoints = prepared.keypoint_batch(indices).to(device)
    with torch.no_grad(), autocast(device):
        logits = model(images, keypoints.coords, keypoints.mask).logits
    return prepared.layout.from_model(logits.float().softmax(1).cpu())


def _check_finite(
    probabilities: torch.Tensor, indices: list[int], device: torch.device, checkpoint: str | Path | None
) -> None:
    """Stop before anything is written when the model outputs NaN or infinity: labels taken from them would
    be meaningless, yet look like a segmentation."""
    if bool(torch.isfinite(probabilities).all()):
        return
    where = f"slice {indices[0]}" if len(indices) == 1 else f"slices {indices[0]} to {indices[-1]}"
    # float16's small range can overflow where full precision does not.
    fallback = "; or predict on the CPU" if autocast_dtype(device) == torch.float16 else ""
    raise non_finite_outputs(checkpoint, where, "prediction", fallback)


def non_finite_outputs(
    checkpoint: str | Path | None, where: str, job: str, advice: str = ""
) -> InputDataError:
    """The error of a job whose model output NaN or infinity on `where` of the image; `advice` is added to
    the suggestions."""
    model = f"the model in {checkpoint}" if checkpoint else "the model"
    return InputDataError(
        f"{model} produced non-finite outputs (NaN or infinity) on {where} of the image, so {job} stopped "
        "without a result: the checkpoint or the image is probably corrupt. Check the image's intensities, "
        f"or choose another checkpoint{advice}."
    )


def keep_largest_components(labels: np.ndarray, classes: int) -> np.ndarray:
    """Each foreground class keeps only its largest 3D connected component; the rest becomes background.

    A few-slice model's mistakes are mostly small islands far from the structure, so this removes
    them (on the ACDC volumes of README.md's results it was worth more than 0.1 Dice); structures
    made of several separate pieces should turn it off.
    """
    keep = KeepLargestConnectedComponent(applied_labels=list(range(1, classes)), independent=True)
    return keep(torch.from_numpy(labels[None].astype(np.int64)))[0].numpy().astype(labels.dtype)


def probability_volume_bytes(classes: int, slices: int, height: int, width: int) -> int:
    """Host memory that a whole volume's prediction holds at its peak: the float32 probabilities of every
    class, and one working copy of them (put back on the image's axes, or clipped for the uncertainty)."""
    return 2 * 4 * classes * slices * height * width


def _check_prediction_memory(
    config: ModelConfig, device: torch.device, batch_size: int, total: int, layout: SliceLayout
) -> None:
    """Refuse a volume or a batch that would not fit before allocating: the probabilities stay on the host,
    the forward pass runs on `device` (the host too on the CPU, where both add up)."""
    height, width = layout.slice_shape
    classes = config.classes
    probabilities = probability_volume_bytes(classes, total, height, width)
    held = f"the class probabilities of {total} slices of {height} x {width} for {classes} classes"
    slices = min(batch_size, total)
    forward = inference_batch_bytes(config, slices, *layout.padded_shape)
    batch = f"a forward pass on {slices} slices of {' x '.join(map(str, layout.padded_shape))}"
    if device.type == "cpu":
        check_memory(device, probabilities + forward, f"{held} and {batch}")
        return
    check_memory(torch.device("cpu"), probabilities, held)
    check_memory(device, forward, batch)


def default_inference_batch(device: torch.device) -> int:
    return CPU_INFERENCE_BATCH if device.type == "cpu" else ACCELERATOR_INFERENCE_BATCH


def predict(
    model: KafUNet,
    prepared: PreparedVolume,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    cancel: CancelToken | None = None,
    largest_component: bool = True,
    checkpoint: str | Path | None = None,
) -> Job[Prediction]:
    """Probabilities and labels for every slice; `checkpoint`, the file `model` came from, is named in
    errors."""
    cancel = cancel or CancelToken()
    device = resolve_device(device) if isinstance(device, str) else device
    batch_size = default_inference_batch(device) if batch_size is None else batch_size
    if batch_size < 1:
        raise InputDataError(f"the prediction batch size must be at least 1, got {batch_size}")
    clock = StageClock()
    total = prepared.slice_count
    _check_prediction_memory(model.config, device, batch_size, total, prepared.layout)
    model.to(device).eval()
    probabilities = np.empty((model.config.classes, total, *prepared.layout.slice_shape), dtype=np.float32)
    for start in range(0, total, batch_size):
        cancel.raise_if_cancelled("prediction")
        indices = list(range(start, min(start + batch_size, total)))
        try:
            batch = predict_slices(model, prepared, indices, device)
        except RuntimeError as error:
            if is_out_of_memory(error):
                raise out_of_memory_error(device, "predicting") from error
            raise
        _check_finite(batch, indices, device, checkpoint)
        probabilities[:, indices] = batch.numpy().transpose(1, 0, 2, 3)
        yield clock.event("predict", indices[-1] + 1, total)
    probabilities = put_slices(probabilities, prepared.slice_axis)
    label_dtype = np.uint8 if model.config.classes <= 256 else np.uint16
    labels = probabilities.argmax(0).astype(label_dtype)
    if largest_component:
        labels = keep_largest_components(labels, model.config.classes)
    return Prediction(np.ascontiguousarray(probabilities), labels)
