"""Errors a user can act on.

Every front-end (CLI, napari, Slicer) shows a `KafError` as its message alone, without a traceback:
the message must name the file or parameter and say what is wrong with it.
"""

from __future__ import annotations

from pathlib import Path


class KafError(Exception):
    """A problem with the user's input or environment, reported as a one-paragraph message."""


class InputFileError(KafError):
    """A file the user named cannot be read, or its content is unusable."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class InputDataError(KafError):
    """Arrays that were read fine but do not fit together (shapes, label values, annotation)."""


class CheckpointError(KafError):
    """A checkpoint that is missing, corrupt, unsafe, or made for another model."""


class DeviceError(KafError):
    """The requested device is unavailable, or ran out of memory."""


class JobCancelled(KafError):
    """A job stopped at the user's request before it finished."""
