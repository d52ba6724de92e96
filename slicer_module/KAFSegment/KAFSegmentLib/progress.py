"""Turns the output of `kaf ... --progress jsonl` into progress updates and a final outcome.

stdout carries one JSON object per line: `{"event": "progress", ...}` while the job runs, then one
`{"event": "result", ...}`. stderr carries warnings ("kaf: ...") and, on exit code 2, a one-paragraph
error ("kaf finetune: error: ..."). Exit code 130 means the job was stopped and wrote nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130
EXIT_START_FAILED = 127  # what the process runners report when the program could not be started
STDERR_TAIL_LINES = 15  # of an unexpected crash (a traceback), the lines worth showing

STAGE_TITLES = {
    "prepare": "Preparing",
    "finetune": "Fine-tuning",
    "predict": "Predicting",
    "explain": "Explaining",
}


@dataclass(frozen=True)
class ProgressUpdate:
    """One progress event of the CLI."""

    stage: str
    step: int
    total: int
    loss: float | None = None
    remaining: float | None = None
    message: str = ""

    @property
    def fraction(self) -> float:
        """How much of the current stage is done, from 0 to 1."""
        return min(1.0, max(0.0, self.step / self.total)) if self.total > 0 else 0.0

    def describe(self) -> str:
        """A status line, e.g. 'Fine-tuning 2/3 · loss 1.593 · about 4 s left'."""
        parts = [f"{STAGE_TITLES.get(self.stage, self.stage.capitalize())} {self.step}/{self.total}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.remaining is not None and self.step < self.total:
            parts.append(f"about {self.remaining:.0f} s left")
        if self.message:
            parts.append(self.message)
        return " · ".join(parts)


class JobStatus(str, Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended: its status, the CLI's result payload, a message for the user, and warnings."""

    job: str
    status: JobStatus
    message: str
    result: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def succeeded(self) -> bool:
        return self.status is JobStatus.SUCCEEDED


class ProgressParser:
    """Reads one job's stdout and stderr lines; `outcome` interprets the exit code with what was read."""

    def __init__(self, job: str) -> None:
        self.job = job
        self.result: dict[str, Any] | None = None
        self.warnings: list[str] = []
        self._stderr: list[str] = []

    def read_stdout_line(self, line: str) -> ProgressUpdate | None:
        """The progress update on this line, if it is one; a result line is kept for `outcome`.
        Lines that are not JSON events (a library printing something) are ignored."""
        event = _json_object(line)
        if event is None:
            return None
        if event.get("event") == "result":
            self.result = {key: value for key, value in event.items() if key != "event"}
            return None
        if event.get("event") != "progress":
            return None
        try:
            return ProgressUpdate(
                stage=str(event.get("stage", "")),
                step=int(event.get("step", 0)),
                total=int(event.get("total", 0)),
                loss=_optional_float(event.get("loss")),
                remaining=_optional_float(event.get("remaining")),
                message=str(event.get("message") or ""),
            )
        except (TypeError, ValueError):
            return None

    def read_stderr_line(self, line: str) -> str | None:
        """Keeps the line for error reports; returns it when it is a warning to show now ('kaf: ...')."""
        self._stderr.append(line)
        text = line.strip()
        if text.startswith("kaf: ") and ": error:" not in text:
            warning = text.removeprefix("kaf: ")
            self.warnings.append(warning)
            return warning
        return None

    def outcome(self, exit_code: int, stop_requested: bool = False) -> JobOutcome:
        """What the end of the process means for the user."""
        if exit_code == EXIT_CANCELLED or (stop_requested and exit_code != EXIT_OK):
            return self._outcome(JobStatus.STOPPED, "Stopped; nothing was written.")
        if exit_code == EXIT_OK and self.result is not None:
            return self._outcome(JobStatus.SUCCEEDED, "Done.", self.result)
        return self._outcome(JobStatus.FAILED, self._failure_message(exit_code))

    def _outcome(self, status: JobStatus, message: str, result: dict | None = None) -> JobOutcome:
        return JobOutcome(self.job, status, message, result or {}, tuple(self.warnings))

    def _failure_message(self, exit_code: int) -> str:
        if exit_code == EXIT_USER_ERROR:
            return self._error_paragraph() or f"kaf {self.job} rejected its input (exit code 2)."
        if exit_code == EXIT_START_FAILED:
            return "\n".join(self._stderr) or "The kaf command line could not be started."
        if exit_code == EXIT_OK:
            return f"kaf {self.job} ended without reporting a result."
        if exit_code < 0:
            reason = f"kaf {self.job} was killed (signal {-exit_code})."
        else:
            reason = f"kaf {self.job} failed with exit code {exit_code}."
        tail = "\n".join(self._stderr[-STDERR_TAIL_LINES:])
        return f"{reason}\n{tail}" if tail else reason

    def _error_paragraph(self) -> str:
        """The text after 'kaf <command>: error: ', with any lines that follow it."""
        for index, line in enumerate(self._stderr):
            head, marker, message = line.partition(": error: ")
            if marker and head.startswith("kaf"):
                return "\n".join([message.strip(), *self._stderr[index + 1 :]]).strip()
        return ""


def _json_object(line: str) -> dict[str, Any] | None:
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
