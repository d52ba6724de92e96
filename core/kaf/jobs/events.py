"""The job protocol shared by the CLI, napari and Slicer.

A job is a generator that yields `ProgressEvent`s and returns its result (StopIteration.value).
It checks its `CancelToken` at every step and raises `JobCancelled` there, so a Stop takes effect
within one step and nothing half-done is written.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass
from typing import TypeVar

from kaf.runtime.errors import JobCancelled

Result = TypeVar("Result")
Job = Generator["ProgressEvent", None, Result]


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # "prepare", "finetune", "predict", "explain", ...
    step: int
    total: int
    loss: float | None = None
    elapsed: float = 0.0  # seconds since the job started
    remaining: float | None = None  # estimated seconds left in this stage
    message: str = ""
    terms: dict[str, float] | None = None  # each loss term by name, when the job has several

    def to_json(self) -> str:
        return json.dumps({"event": "progress", **asdict(self)})


@dataclass(frozen=True)
class StepTime:
    """How long a finished fine-tune's steps took on one device: the basis of the next job's estimate."""

    steps: int
    seconds: float

    @property
    def per_step(self) -> float:
        return self.seconds / self.steps

    def describe(self, planned_steps: int) -> str:
        return (
            f"Measured here: {self.per_step:.2f} s per fine-tuning step ({self.steps} steps in "
            f"{self.seconds:.0f} s), so about {self.per_step * planned_steps:.0f} s for "
            f"{planned_steps} steps."
        )


class CancelToken:
    """Thread-safe Stop flag: the GUI sets it, the job checks it at every step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self, stage: str) -> None:
        if self._event.is_set():
            raise JobCancelled(f"{stage} stopped by the user; nothing was written")


class StageClock:
    """Elapsed time of the job and a linear estimate of what is left of the current stage."""

    def __init__(self) -> None:
        self.job_start = time.perf_counter()
        self.stage_start = self.job_start

    def start_stage(self) -> None:
        self.stage_start = time.perf_counter()

    def event(
        self,
        stage: str,
        step: int,
        total: int,
        loss: float | None = None,
        message: str = "",
        terms: dict[str, float] | None = None,
        first_step: int = 0,
    ) -> ProgressEvent:
        """`first_step`: the step this stage started from (a resumed run), so the estimate uses only
        the steps done in this run."""
        now = time.perf_counter()
        spent = now - self.stage_start
        done = step - first_step
        remaining = spent / done * (total - step) if done > 0 else None
        return ProgressEvent(stage, step, total, loss, now - self.job_start, remaining, message, terms)


def drive(job: Job[Result], on_event: Callable[[ProgressEvent], None] | None = None) -> Result:
    """Run a job to its end in this thread, handing every event to `on_event`; returns the job's result."""
    while True:
        try:
            event = next(job)
        except StopIteration as finished:
            return finished.value
        if on_event is not None:
            on_event(event)
