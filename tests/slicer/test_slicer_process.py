"""Tier 1: the process runners. SubprocessRunner runs small Python scripts; QProcessRunner runs against a
fake `qt` module that mimics the PythonQt calls it makes."""

from __future__ import annotations

import os
import sys
import threading
import types
from unittest.mock import MagicMock

import pytest
from KAFSegmentLib.process import LineSplitter, QProcessRunner, SubprocessRunner

WAIT_S = 30


def run_script(source: str, environment=None, stop_after_line: str | None = None, grace: float = 5.0):
    """Run `python -c source`; returns (stdout lines, stderr lines, exit code, callback thread ids)."""
    runner = SubprocessRunner(grace_seconds=grace)
    out, err, codes, threads = [], [], [], set()

    def on_stdout(line):
        threads.add(threading.get_ident())
        out.append(line)
        if line == stop_after_line:
            runner.kill()

    runner.on_stdout_line = on_stdout
    runner.on_stderr_line = err.append
    runner.on_finished = codes.append
    runner.start([sys.executable, "-c", source], environment)
    assert runner.wait(WAIT_S), "the script did not finish"
    assert not runner.running
    return out, err, codes, threads


def test_line_splitter_keeps_partial_lines_until_they_end():
    splitter = LineSplitter()
    assert splitter.feed(b'{"event": "pro') == []
    assert splitter.feed(b'gress"}\r\nsecond\nthi') == ['{"event": "progress"}', "second"]
    assert splitter.feed("rd é".encode()) == []
    assert splitter.flush() == ["third é"]
    assert splitter.flush() == []


def test_subprocess_runner_delivers_lines_then_the_exit_code_on_the_callers_thread():
    script = (
        "import sys\nfor i in range(3): print(i, flush=True)\nprint('oops', file=sys.stderr)\nsys.exit(3)"
    )
    out, err, codes, threads = run_script(script)
    assert out == ["0", "1", "2"]
    assert err == ["oops"]
    assert codes == [3]
    assert threads == {threading.get_ident()}


def test_subprocess_runner_passes_the_environment():
    out, _, codes, _ = run_script(
        "import os; print(os.environ['KAF_TEST'])", environment={**os.environ, "KAF_TEST": "yes"}
    )
    assert out == ["yes"] and codes == [0]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM handling is POSIX")
def test_kill_sends_sigterm_first_so_the_cli_can_exit_cleanly():
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(130))\n"
        "print('ready', flush=True)\ntime.sleep(30)"
    )
    _, _, codes, _ = run_script(script, stop_after_line="ready")
    assert codes == [130]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM handling is POSIX")
def test_kill_forces_a_process_that_ignores_sigterm():
    script = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\ntime.sleep(30)"
    )
    _, _, codes, _ = run_script(script, stop_after_line="ready", grace=0.2)
    assert codes == [-9]


def test_a_missing_program_reports_exit_127_and_why():
    runner = SubprocessRunner()
    err, codes = [], []
    runner.on_stderr_line, runner.on_finished = err.append, codes.append
    runner.start(["/no/such/kaf", "finetune"])
    assert runner.wait(WAIT_S)
    assert codes == [127] and err[0].startswith("Could not start /no/such/kaf")


class FakeQProcess:
    """The part of PythonQt's qt.QProcess that QProcessRunner uses."""

    NormalExit, CrashExit, FailedToStart = 0, 1, 0

    def __init__(self) -> None:
        self.slots = {}
        self.stdout = b""
        self.stderr = b""
        self.calls = []

    def connect(self, signal: str, slot) -> None:
        self.slots[signal] = slot

    def emit(self, signal: str, *args) -> None:
        self.slots[signal](*args)

    def setProcessEnvironment(self, environment) -> None:
        self.environment = environment

    def start(self, program, arguments) -> None:
        self.calls.append(("start", program, arguments))

    def terminate(self) -> None:
        self.calls.append(("terminate",))

    def kill(self) -> None:
        self.calls.append(("kill",))

    def errorString(self) -> str:
        return "No such file or directory"

    def readAllStandardOutput(self):
        data, self.stdout = self.stdout, b""
        return MagicMock(data=lambda: data)

    def readAllStandardError(self):
        data, self.stderr = self.stderr, b""
        return MagicMock(data=lambda: data)


@pytest.fixture
def fake_qt(monkeypatch):
    qt = types.ModuleType("qt")
    qt.QProcess = FakeQProcess
    qt.QProcessEnvironment = lambda: MagicMock(name="QProcessEnvironment")
    qt.QTimer = MagicMock(name="QTimer")
    monkeypatch.setitem(sys.modules, "qt", qt)
    return qt


def started_runner():
    runner = QProcessRunner(grace_seconds=2)
    events = []
    runner.on_stdout_line = lambda line: events.append(("out", line))
    runner.on_stderr_line = lambda line: events.append(("err", line))
    runner.on_finished = lambda code: events.append(("end", code))
    runner.start(["/venv/bin/python", "-m", "kaf", "predict"], {"OMP_NUM_THREADS": "1"})
    return runner, runner._process, events


def test_qprocess_runner_splits_output_into_lines_and_reports_the_exit(fake_qt):
    runner, process, events = started_runner()
    assert process.calls == [("start", "/venv/bin/python", ["-m", "kaf", "predict"])]
    process.environment.insert.assert_called_once_with("OMP_NUM_THREADS", "1")
    process.stdout = b'{"a": 1}\n{"b"'
    process.emit("readyReadStandardOutput()")
    process.stdout, process.stderr = b": 2}\nlast", b"warning\n"
    process.emit("readyReadStandardError()")
    process.emit("finished(int,QProcess::ExitStatus)", 0, FakeQProcess.NormalExit)
    assert events == [
        ("out", '{"a": 1}'),
        ("err", "warning"),
        ("out", '{"b": 2}'),
        ("out", "last"),
        ("end", 0),
    ]
    assert not runner.running


def test_qprocess_runner_kill_terminates_then_kills_after_the_grace_period(fake_qt):
    runner, process, events = started_runner()
    runner.kill()
    delay, kill_now = fake_qt.QTimer.singleShot.call_args.args
    assert process.calls[-1] == ("terminate",) and delay == 2000
    kill_now()
    assert process.calls[-1] == ("kill",)
    process.emit("finished(int,QProcess::ExitStatus)", 9, FakeQProcess.CrashExit)
    assert events == [("end", -1)]
    kill_now()  # a late timer does nothing once the process has ended
    assert process.calls.count(("kill",)) == 1


def test_qprocess_runner_reports_a_failed_start_once(fake_qt):
    _, process, events = started_runner()
    process.emit("errorOccurred(QProcess::ProcessError)", FakeQProcess.FailedToStart)
    assert events == [("err", "Could not start /venv/bin/python: No such file or directory"), ("end", 127)]
