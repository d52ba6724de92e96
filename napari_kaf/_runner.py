"""How the controller runs a job: on a napari worker thread (the plugin) or in the calling thread (tests).

A job is one of `napari_kaf._jobs`' generator tasks. Either runner reports through the same `JobHooks`:
every progress event, then the result, an error or an abort (Stop), then `finished`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kaf.jobs.events import ProgressEvent
from napari_kaf import _jobs

Task = Callable[..., Any]


@dataclass
class JobHooks:
    event: Callable[[ProgressEvent], None]
    returned: Callable[[Any], None]
    errored: Callable[[BaseException], None]
    aborted: Callable[[], None]
    finished: Callable[[], None]


class Job(Protocol):
    def start(self) -> None: ...

    def quit(self) -> None:
        """Stop at the next progress event."""


Runner = Callable[[Task, tuple, JobHooks], Job]


def thread_runner(task: Task, args: tuple, hooks: JobHooks) -> Job:
    """A napari generator worker; its signals arrive on the GUI thread."""
    from napari.qt.threading import create_worker

    worker = create_worker(_jobs.guarded, task, *args, _start_thread=False, _ignore_errors=True)
    worker.yielded.connect(hooks.event)
    worker.returned.connect(hooks.returned)
    worker.errored.connect(hooks.errored)
    worker.aborted.connect(hooks.aborted)
    worker.finished.connect(hooks.finished)
    return worker


class InlineJob:
    """Runs the task to its end inside `start`, in the calling thread: the same hooks, no event loop.
    `quit` from a hook (a Stop pressed while an event is shown) ends it after that event."""

    def __init__(self, task: Task, args: tuple, hooks: JobHooks) -> None:
        self._generator = _jobs.guarded(task, *args)
        self._hooks = hooks
        self._quit = False

    def quit(self) -> None:
        self._quit = True

    def start(self) -> None:
        try:
            self._run()
        finally:
            self._hooks.finished()

    def _run(self) -> None:
        while True:
            try:
                event = next(self._generator)
            except StopIteration as done:
                self._hooks.returned(done.value)
                return
            except Exception as error:
                self._hooks.errored(error)
                return
            self._hooks.event(event)
            if self._quit:
                self._generator.close()
                self._hooks.aborted()
                return


def inline_runner(task: Task, args: tuple, hooks: JobHooks) -> Job:
    return InlineJob(task, args, hooks)
