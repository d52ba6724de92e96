"""One run of the annotator's protocol, shared by the benchmarks (not a test): k slices of a real volume
annotated from its reference labels, the `interactive` preset fine-tuned on them, the whole volume
predicted, and mean foreground Dice on the other slices beside copying the nearest annotated slice."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kaf.app.workflow import finetune_from, predict_trained
from kaf.data.annotation import sparse_annotation
from kaf.data.metrics import copy_nearest_annotated, dice_on_unannotated, spread_slices
from kaf.data.volume_io import read_labels, read_volume
from kaf.jobs.events import drive
from kaf.jobs.finetune import FinetuneSettings, Initialisation


@dataclass
class AnnotatorRun:
    annotated: list[int]
    dice: float  # the fine-tuned model, on the slices not annotated
    copy: float  # copying the nearest annotated slice, on the same slices
    steps: int
    training_seconds: float
    seconds: float  # preparation, fine-tuning and prediction


def annotator_run(
    image_path: Path,
    labels_path: Path,
    slices: int,
    classes: int | None = None,
    settings: FinetuneSettings | None = None,
    init: Initialisation | None = None,
    inference_batch: int | None = None,
    adapt_seconds: float | None = None,
) -> AnnotatorRun:
    """`classes` None: one more than the largest label. `settings` None: the product's defaults on the CPU.
    `adapt_seconds`: adapt the weights to the image first (napari's Adapt), as `finetune_from` does."""
    image = read_volume(image_path)
    reference = read_labels(labels_path, image)
    classes = int(reference.max()) + 1 if classes is None else classes
    annotated = spread_slices(reference, slices)
    sparse = np.zeros_like(reference)
    sparse[annotated] = reference[annotated]
    start = time.perf_counter()
    annotation = sparse_annotation(sparse, 0, annotated, classes)
    settings = settings or FinetuneSettings(device="cpu")
    trained = drive(finetune_from(image, annotation, settings, init, adapt_seconds=adapt_seconds))
    result = trained.result
    prediction = drive(predict_trained(image, trained, device="cpu", batch_size=inference_batch))
    seconds = time.perf_counter() - start
    dice, _ = dice_on_unannotated(prediction.labels, reference, annotated, classes)
    copy = copy_nearest_annotated(reference, annotated)
    copied, _ = dice_on_unannotated(copy, reference, annotated, classes)
    return AnnotatorRun(annotated, dice, copied, len(result.losses), result.seconds, seconds)
