"""Process runners for the `kaf` CLI: `qt.QProcess` inside Slicer, `subprocess.Popen` elsewhere.

Both follow `ProcessRunner`: `start(args, environment)`, `kill()`, `running`, and three callbacks set by
the caller. Callbacks always arrive on the caller's thread: QProcess delivers its signals through
Slicer's event loop, and `SubprocessRunner` queues them until `process_events` or `wait` is called.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Protocol

from .progress import EXIT_START_FAILED

STOP_GRACE_SECONDS = 5.0  # after SIGTERM, how long the CLI gets to stop cleanly before it is killed


def _ignore(*_args) -> None:
    pass


class ProcessRunner(Protocol):
    on_stdout_line: Callable[[str], None]
    on_stderr_line: Callable[[str], None]
    on_finished: Callable[[int], None]  # exit code; negative when killed by a signal

    @property
    def running(self) -> bool: ...

    def start(self, args: Sequence[str], environment: Mapping[str, str] | None = None) -> None:
        """Start `args[0]` with the other arguments; `environment` replaces the inherited one."""

    def kill(self) -> None:
        """Ask the process to stop (SIGTERM: the CLI exits with 130), and kill it if it does not."""


class LineSplitter:
    """Cuts a byte stream into text lines, holding back an unfinished last line until more arrives."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[str]:
        *lines, self._pending = (self._pending + data).split(b"\n")
        return [_decode(line) for line in lines]

    def flush(self) -> list[str]:
        rest, self._pending = self._pending, b""
        return [_decode(rest)] if rest else []


def _kill_if_running(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()


def _decode(line: bytes) -> str:
    return line.decode("utf-8", errors="replace").rstrip("\r")


class SubprocessRunner:
    """Runs the CLI with `subprocess.Popen`; reader threads queue its output for the caller's thread."""

    def __init__(self, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        self.on_stdout_line: Callable[[str], None] = _ignore
        self.on_stderr_line: Callable[[str], None] = _ignore
        self.on_finished: Callable[[int], None] = _ignore
        self._grace_seconds = grace_seconds
        self._events: queue.Queue[tuple[str, str | int]] = queue.Queue()
        self._process: subprocess.Popen | None = None
        self._finished = False

    @property
    def running(self) -> bool:
        return self._process is not None and not self._finished

    def start(self, args: Sequence[str], environment: Mapping[str, str] | None = None) -> None:
        env = dict(environment) if environment is not None else None
        try:
            process = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        except OSError as error:
            self._events.put(("stderr", f"Could not start {args[0]}: {error}"))
            self._events.put(("finished", EXIT_START_FAILED))
            return
        self._process = process
        readers = [
            threading.Thread(target=self._read, args=(process.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._read, args=(process.stderr, "stderr"), daemon=True),
        ]
        for reader in readers:
            reader.start()
        threading.Thread(target=self._watch, args=(process, readers), daemon=True).start()

    def kill(self) -> None:
        if not self.running:
            return
        self._process.terminate()
        timer = threading.Timer(self._grace_seconds, _kill_if_running, args=(self._process,))
        timer.daemon = True
        timer.start()

    def process_events(self, timeout: float = 0.0) -> None:
        """Deliver what the process said since the last call, waiting up to `timeout` for the first item."""
        try:
            event = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._dispatch(*event)
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return

    def wait(self, timeout: float) -> bool:
        """Deliver events until the process has finished (True) or `timeout` seconds have passed."""
        deadline = time.monotonic() + timeout
        while not self._finished and time.monotonic() < deadline:
            self.process_events(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        return self._finished

    def _dispatch(self, kind: str, payload: str | int) -> None:
        if kind == "stdout":
            self.on_stdout_line(payload)
        elif kind == "stderr":
            self.on_stderr_line(payload)
        else:
            self._finished = True
            self.on_finished(payload)

    def _read(self, stream: IO[bytes], kind: str) -> None:
        for line in iter(stream.readline, b""):
            self._events.put((kind, _decode(line.rstrip(b"\n"))))
        stream.close()

    def _watch(self, process: subprocess.Popen, readers: list[threading.Thread]) -> None:
        for reader in readers:  # all output is queued before the end is
            reader.join()
        self._events.put(("finished", process.wait()))


class QProcessRunner:
    """Runs the CLI as a `qt.QProcess`: its signals arrive on Slicer's main thread, which never blocks."""

    def __init__(self, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        import qt  # only inside Slicer; the rest of this module runs anywhere

        self._qt = qt
        self.on_stdout_line: Callable[[str], None] = _ignore
        self.on_stderr_line: Callable[[str], None] = _ignore
        self.on_finished: Callable[[int], None] = _ignore
        self._grace_ms = int(grace_seconds * 1000)
        self._process = None
        self._program = ""
        self._stdout = LineSplitter()
        self._stderr = LineSplitter()
        self._finished = False

    @property
    def running(self) -> bool:
        return self._process is not None and not self._finished

    def start(self, args: Sequence[str], environment: Mapping[str, str] | None = None) -> None:
        qt = self._qt
        process = qt.QProcess()
        if environment is not None:
            process_environment = qt.QProcessEnvironment()
            for key, value in environment.items():
                process_environment.insert(key, value)
            process.setProcessEnvironment(process_environment)
        # Full signatures: `finished` is overloaded in Qt 5, and PythonQt must pick the two-argument one.
        process.connect("readyReadStandardOutput()", self._read_stdout)
        process.connect("readyReadStandardError()", self._read_stderr)
        process.connect("finished(int,QProcess::ExitStatus)", self._on_finished)
        process.connect("errorOccurred(QProcess::ProcessError)", self._on_error)
        self._process = process  # keep a reference, or Python deletes the QProcess while it runs
        self._program = args[0]
        process.start(args[0], list(args[1:]))

    def kill(self) -> None:
        if not self.running:
            return
        self._process.terminate()  # SIGTERM on Unix; on Windows console programs ignore it, hence the timer
        self._qt.QTimer.singleShot(self._grace_ms, self._kill_now)

    def _kill_now(self) -> None:
        if self.running:
            self._process.kill()

    def _read_stdout(self) -> None:
        for line in self._stdout.feed(bytes(self._process.readAllStandardOutput().data())):
            self.on_stdout_line(line)

    def _read_stderr(self) -> None:
        for line in self._stderr.feed(bytes(self._process.readAllStandardError().data())):
            self.on_stderr_line(line)

    def _on_error(self, error) -> None:
        if error == self._qt.QProcess.FailedToStart:  # no `finished` signal follows this one
            self.on_stderr_line(f"Could not start {self._program}: {self._process.errorString()}")
            self._finish(EXIT_START_FAILED)

    def _on_finished(self, exit_code: int, exit_status) -> None:
        self._read_stdout()
        self._read_stderr()
        for line in self._stdout.flush():
            self.on_stdout_line(line)
        for line in self._stderr.flush():
            self.on_stderr_line(line)
        self._finish(-1 if exit_status == self._qt.QProcess.CrashExit else exit_code)

    def _finish(self, exit_code: int) -> None:
        if not self._finished:
            self._finished = True
            self.on_finished(exit_code)
