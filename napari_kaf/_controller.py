"""The session's state and job lifecycle, with no Qt widgets and no viewer: the widget asks, this does.

`KafController` owns the fine-tuned model, the prepared image it last saw, the prediction's uncertainty
and the explanation (keypoints and attention) of one slice. It runs one job at a time (fine-tune,
predict, explain, save) through a `Runner` (napari worker threads in the plugin, the calling thread in
tests) and tells its listeners through plain-Python signals, so tests drive it without a viewer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kaf.app.workflow import Segmentation, TrainedModel
from kaf.data.annotation import SparseAnnotation
from kaf.data.volume_io import Volume
from kaf.jobs.events import CancelToken, ProgressEvent, StepTime
from kaf.jobs.finetune import FinetuneSettings
from kaf.runtime.devices import is_out_of_memory
from kaf.runtime.errors import DeviceError, JobCancelled, KafError
from napari_kaf import _jobs
from napari_kaf._runner import Job, JobHooks, Runner, Task, thread_runner

LOG = logging.getLogger(__name__)


class Signal:
    """A plain-Python signal (SlicerNNUnet's pattern): `connect` a callable, `emit` calls each in turn."""

    def __init__(self) -> None:
        self._slots: list[Callable[..., Any]] = []

    def connect(self, slot: Callable[..., Any]) -> None:
        self._slots.append(slot)

    def emit(self, *args: Any) -> None:
        for slot in list(self._slots):
            slot(*args)


@dataclass(frozen=True)
class ImageRef:
    """An image layer as the controller knows it: which data it was (no layer object), its grid and shape."""

    source: tuple[Any, int]  # (layer unique_id, id of its data): changes when the data is replaced
    shape: tuple[int, ...]
    grid: dict[str, Any] = field(default_factory=dict)  # scale and translate, for layers made from it
    grid_metadata: dict[str, Any] = field(default_factory=dict)  # its affine, for the writer


@dataclass(frozen=True)
class AttentionMap:
    level: int
    head: int
    keypoint: int
    weights: np.ndarray  # (H, W) on the explained slice, in [0, 1]


@dataclass
class RunningJob:
    name: str  # "fine-tuning": what the messages say
    key: str  # which action runs it ("finetune", "predict", "explain", "save"): its button is its Stop
    image: ImageRef | None
    cancel: CancelToken | None
    handle: Job | None = None


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "estimating time left"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s left"
    return f"{seconds // 60} min {seconds % 60:02d} s left"


def describe_event(event: ProgressEvent) -> str:
    """One line for the progress bar and the status label."""
    if event.stage == "finetune":
        loss = f", loss {event.loss:.3f}" if event.loss is not None else ""
        text = f"Fine-tuning: step {event.step}/{event.total}{loss}, {format_seconds(event.remaining)}"
        return f"{text} ({event.message})" if event.message else text
    if event.stage == "predict":
        return f"Predicting: slice {event.step}/{event.total}, {format_seconds(event.remaining)}"
    if event.message:
        return event.message[0].upper() + event.message[1:]
    return f"{event.stage} {event.step}/{event.total}"


def describe_error(error: BaseException, job_name: str) -> str:
    """What the user reads when a job fails: our own messages as they are, out-of-memory with advice."""
    if isinstance(error, _jobs.TaskRuntimeError):
        error = error.original
    if isinstance(error, KafError):
        return str(error)
    if is_out_of_memory(error):
        return str(
            DeviceError(
                f"Ran out of memory while {job_name}. Try the 'interactive' preset, a smaller batch size "
                "or crop, or another device."
            )
        )
    LOG.error("KAF Segment: %s failed", job_name, exc_info=error)
    return f"{job_name[0].upper()}{job_name[1:]} failed: {type(error).__name__}: {error}"


class KafController:
    """One annotation session: its model, prepared image, explanation, and the job that runs now."""

    def __init__(self, runner: Runner = thread_runner) -> None:
        self._runner = runner
        self.model: Any = None
        self.metadata: Any = None
        self.prepared: Any = None
        self.prepared_source: tuple[Any, int] | None = None
        self.uncertainty: np.ndarray | None = None
        self.explanation: Any = None
        self.explained_image: ImageRef | None = None
        self.job: RunningJob | None = None
        self.last_event: ProgressEvent | None = None
        self.step_times: dict[str, StepTime] = {}  # by the device name a fine-tune was asked to run on
        self._follow_up: Callable[[], Any] | None = None
        self._attention_job: Job | None = None
        self._attention_wanted: tuple[int, int, int] | None = None
        # Each emits (text,) except where noted; severity "status" only updates the panel's status line.
        self.notified = Signal()  # (severity: "status" | "info" | "warning" | "error", text)
        self.busy_changed = Signal()  # (busy: bool)
        self.progressed = Signal()  # (ProgressEvent)
        self.predicted = Signal()  # (Segmentation, ImageRef)
        self.explained = Signal()  # (Explanation, ImageRef)
        self.attention_ready = Signal()  # (AttentionMap)

    # --- the running job -----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A job runs, or one that just ended has a follow-up (the prediction after a fine-tune) to start."""
        return self.job is not None or self._follow_up is not None

    def running(self, key: str) -> bool:
        return self.job is not None and self.job.key == key

    def refuse_if_busy(self) -> bool:
        """One job at a time: a second request is refused with a warning (the running one is untouched)."""
        if self.job is not None:
            self.notified.emit(
                "warning", f"KAF Segment is already {self.job.name}: wait for it to end, or press Stop."
            )
        return self.job is not None

    def stop(self) -> None:
        """Stop the running job at its next step; nothing it was making is kept."""
        self._follow_up = None
        if self.job is None:
            return
        if self.job.cancel is not None:
            self.job.cancel.cancel()
        if self.job.handle is not None:
            self.job.handle.quit()
        self.notified.emit("status", f"Stopping {self.job.name}...")

    def _start(
        self,
        name: str,
        key: str,
        task: Task,
        args: tuple,
        on_returned: Callable[[Any], None],
        image: ImageRef | None = None,
        cancel: CancelToken | None = None,
    ) -> bool:
        if self.refuse_if_busy():
            return False
        job = RunningJob(name, key, image, cancel)
        hooks = JobHooks(self._on_event, on_returned, self._on_error, self._on_aborted, self._on_finished)
        job.handle = self._runner(task, args, hooks)
        self.job = job
        self.busy_changed.emit(True)
        self.notified.emit("status", f"{name[0].upper()}{name[1:]}...")
        job.handle.start()
        return True

    def _on_event(self, event: ProgressEvent) -> None:
        self.last_event = event
        self.progressed.emit(event)

    def _on_error(self, error: BaseException) -> None:
        original = error.original if isinstance(error, _jobs.TaskRuntimeError) else error
        if isinstance(original, JobCancelled):
            self._on_aborted()
            return
        self._follow_up = None
        self.notified.emit("error", describe_error(original, self.job.name if self.job else "working"))

    def _on_aborted(self) -> None:
        self._follow_up = None
        name = self.job.name if self.job else "the job"
        self.notified.emit("info", f"Stopped {name}; nothing was changed.")

    def _on_finished(self) -> None:
        self.job = None
        follow_up, self._follow_up = self._follow_up, None
        self.busy_changed.emit(False)
        if follow_up is not None:
            follow_up()

    def _image(self) -> ImageRef | None:
        return self.job.image if self.job is not None else None

    # --- fine-tune and predict -----------------------------------------------------------------------

    def start_finetune(
        self,
        volume: Volume,
        annotation: SparseAnnotation,
        settings: FinetuneSettings,
        checkpoint: Path | None,
        image: ImageRef,
        adapt_seconds: float | None = None,
        then_predict: bool = True,
        label_names: list[str] | None = None,
    ) -> bool:
        """Fine-tune on the annotated slices; with `then_predict`, predict the volume when done (the
        fine-tune's Stop stops that too). `label_names` (background first; None: numbered) are stored in
        the model."""
        cancel = CancelToken()
        threads = torch.get_num_threads()
        args = (volume, annotation, settings, checkpoint, cancel, threads, adapt_seconds, label_names)

        def trained(result: TrainedModel) -> None:
            self._on_trained(result, image, settings.device)
            if then_predict:
                self._follow_up = lambda: self.start_predict(volume, image, None, settings.device, "finetune")

        return self._start("fine-tuning", "finetune", _jobs.finetune_task, args, trained, image, cancel)

    def _on_trained(self, trained: TrainedModel, image: ImageRef, device: str) -> None:
        result = trained.result
        self.model, self.metadata = result.model, result.metadata
        if result.losses:
            self.step_times[device] = StepTime(len(result.losses), result.seconds)
        self.prepared, self.prepared_source = trained.prepared, image.source
        self.explanation = None
        self.notified.emit(
            "status",
            f"Fine-tuned {len(result.losses)} steps in {result.seconds:.0f} s; final loss "
            f"{result.losses[-1]:.3f}.",
        )

    def prepared_for(self, image: ImageRef) -> Any:
        """The prepared image of the session, if it was made from this layer's current data."""
        return self.prepared if self.prepared is not None and self.prepared_source == image.source else None

    def start_predict(
        self, volume: Volume, image: ImageRef, checkpoint: Path | None, device: str, key: str = "predict"
    ) -> bool:
        """Predict with the session's model, or with `checkpoint` (a fine-tuned file) when there is none."""
        cancel = CancelToken()
        args = (
            volume,
            self.model,
            self.metadata,
            self.prepared_for(image),
            checkpoint,
            device,
            cancel,
            torch.get_num_threads(),
        )
        return self._start("predicting", key, _jobs.predict_task, args, self._on_predicted, image, cancel)

    def _on_predicted(self, outcome: Segmentation) -> None:
        image = self._image()
        self.model, self.metadata = outcome.model, outcome.metadata  # the file's, when there was none
        self.prepared, self.prepared_source = outcome.prepared, image.source
        self.uncertainty = outcome.uncertainty
        self.predicted.emit(outcome, image)
        counts = list(outcome.voxels_per_label().items())[1:]  # background left out
        summary = ", ".join(f"{name}: {count}" for name, count in counts)
        self.notified.emit("status", f"Predicted every slice ({summary} voxels).")

    def label_names(self) -> list[str] | None:
        """The class names of the session's model (fine-tuned, or read for a prediction), if any."""
        return list(self.metadata.label_names) if self.metadata is not None else None

    def model_axis(self, view_axis: int) -> int:
        """The slice axis the model was trained on, else the one the view cuts through."""
        if self.prepared is not None:
            return self.prepared.slice_axis
        if self.metadata is not None:
            return self.metadata.slice_axis
        return view_axis

    # --- inspect -------------------------------------------------------------------------------------

    def start_explain(self, image: ImageRef, slice_index: int, device: str) -> bool:
        """Keypoints and attention of slice `slice_index` along the model's slice axis."""
        if self.refuse_if_busy():
            return False
        prepared = self.prepared_for(image)
        if self.model is None:
            self.notified.emit(
                "error",
                "There is no model to inspect yet: fine-tune (or predict with a checkpoint) first.",
            )
            return False
        if prepared is None:
            self.notified.emit(
                "error", "The model has not seen this image yet: predict it first, then inspect."
            )
            return False
        args = (self.model, self.metadata, prepared, slice_index, device, torch.get_num_threads())
        return self._start("explaining", "explain", _jobs.explain_task, args, self._on_explained, image)

    def _on_explained(self, explanation: Any) -> None:
        self.explanation = explanation
        self.explained_image = self._image()
        self._attention_wanted = None
        self.explained.emit(explanation, self.explained_image)
        self.notified.emit(
            "status",
            f"{len(explanation.keypoints)} keypoints on slice {explanation.slice_index}: click one to see "
            "where its attention goes.",
        )

    def request_attention(self, level: int, head: int, keypoint: int) -> None:
        """Compute one keypoint's attention map; a request made while one runs replaces any pending one."""
        if self.explanation is None or keypoint < 0:
            return
        self._attention_wanted = (level, head, keypoint)
        if self._attention_job is None:
            self._next_attention()

    def _next_attention(self) -> None:
        wanted, self._attention_wanted = self._attention_wanted, None
        if wanted is None or self.explanation is None:
            return
        hooks = JobHooks(
            event=lambda _event: None,
            returned=lambda result: self.attention_ready.emit(AttentionMap(*result)),
            errored=lambda error: self.notified.emit("error", describe_error(error, "computing attention")),
            aborted=lambda: None,
            finished=self._on_attention_finished,
        )
        self._attention_job = self._runner(_jobs.attention_task, (self.explanation, *wanted), hooks)
        self._attention_job.start()

    def _on_attention_finished(self) -> None:
        self._attention_job = None
        self._next_attention()

    # --- save ----------------------------------------------------------------------------------------

    def start_save_checkpoint(self, path: Path) -> bool:
        """Write the fine-tuned model (safetensors with its metadata)."""
        if self.model is None:
            self.notified.emit("error", "There is no fine-tuned model to save yet: fine-tune first.")
            return False
        return self._start(
            "saving the checkpoint",
            "save",
            _jobs.save_checkpoint_task,
            (Path(path), self.model, self.metadata),
            lambda written: self.notified.emit("status", f"Saved the model to {written}."),
        )

    def report(self, error: KafError | str) -> None:
        """Show an input problem found by the panel the way job errors are shown."""
        self.notified.emit("error", str(error))
