"""What the widget's worker threads run: the core's steps chained, with arrays in and results out.

These functions run on napari worker threads. They never touch Qt or layers: the widget copies layer
data into arrays before a job starts and turns the returned results into layers on the GUI thread.
Each is a generator that yields the core's `ProgressEvent`s (the Stop point) and returns its result.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import torch

from kaf.app.workflow import explain_slice, finetune_volume, predict_volume
from kaf.data.annotation import SparseAnnotation
from kaf.data.preparation import PreparedVolume
from kaf.data.volume_io import Volume
from kaf.jobs.events import CancelToken, ProgressEvent
from kaf.jobs.explain import Explanation
from kaf.jobs.finetune import FinetuneSettings
from kaf.models import KafUNet
from kaf.models.checkpoints import CheckpointMetadata, save_checkpoint

Events = Generator[ProgressEvent, None, object]


class TaskRuntimeError(Exception):
    """A RuntimeError raised by a task, re-raised as something else on its way out of the worker.

    superqt's GeneratorWorker treats a RuntimeError from the generator as "the worker object was deleted":
    it warns and ends without emitting `errored` or `finished`, so the widget would stay busy for ever.
    torch reports most failures (out of memory included) as RuntimeError, so every task runs `guarded`.
    """

    def __init__(self, original: RuntimeError) -> None:
        super().__init__(str(original))
        self.original = original


def guarded(task, *args):
    """Run generator task `task(*args)`, yielding its events and returning its result, with any
    RuntimeError wrapped in TaskRuntimeError (see there)."""
    try:
        return (yield from task(*args))
    except RuntimeError as error:
        raise TaskRuntimeError(error) from error


def _use_threads(threads: int | None) -> None:
    """Give the worker thread the GUI thread's torch thread count (intra-op settings can be per thread)."""
    if threads:
        torch.set_num_threads(threads)


def finetune_task(
    volume: Volume,
    annotation: SparseAnnotation,
    settings: FinetuneSettings,
    checkpoint: Path | None,
    cancel: CancelToken,
    threads: int | None = None,
    adapt_seconds: float | None = None,
    label_names: list[str] | None = None,
) -> Events:
    """Fine-tune (the core's `finetune_volume`); with `adapt_seconds`, first adapt the starting weights to
    this image. `label_names` (background first, None: numbered) go into the model's metadata."""
    _use_threads(threads)
    yield ProgressEvent(
        "prepare", 0, 1, message="loading the checkpoint" if checkpoint else "preparing the image"
    )
    return (
        yield from finetune_volume(
            volume,
            annotation,
            settings,
            checkpoint,
            label_names,
            adapt_seconds=adapt_seconds,
            cancel=cancel,
        )
    )


def predict_task(
    volume: Volume,
    model: KafUNet | None,
    metadata: CheckpointMetadata | None,
    prepared: PreparedVolume | None,
    checkpoint: Path | None,
    device: str,
    cancel: CancelToken,
    threads: int | None = None,
    batch_size: int | None = None,
) -> Events:
    """Predict (the core's `predict_volume`) with the session's model, or with a fine-tuned checkpoint
    file when there is none yet; the result holds the model it used."""
    _use_threads(threads)
    return (
        yield from predict_volume(
            volume,
            checkpoint,
            model=model,
            metadata=metadata,
            prepared=prepared,
            device=device,
            batch_size=batch_size,
            uncertainty=True,
            cancel=cancel,
        )
    )


def explain_task(
    model: KafUNet,
    metadata: CheckpointMetadata,
    prepared: PreparedVolume,
    slice_index: int,
    device: str,
    threads: int | None = None,
) -> Events:
    _use_threads(threads)
    explanation = yield from explain_slice(
        None, slice_index, model=model, metadata=metadata, prepared=prepared, device=device
    )
    return explanation


def attention_task(explanation: Explanation, level: int, head: int, keypoint: int) -> Events:
    """One attention map (H, W); short, but it runs torch resampling, so it stays off the GUI thread."""
    yield ProgressEvent("attention", 0, 1)
    return (level, head, keypoint, explanation.attention_map(level, head, keypoint))


def save_checkpoint_task(path: Path, model: KafUNet, metadata: CheckpointMetadata) -> Events:
    yield ProgressEvent("save", 0, 1, message=f"writing {path.name}")
    return save_checkpoint(path, model.state_dict(), metadata)
