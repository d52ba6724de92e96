"""Tier 1: reading `kaf ... --progress jsonl` output, and the plain-Python signal."""

from __future__ import annotations

from KAFSegmentLib.progress import JobStatus, ProgressParser, ProgressUpdate
from KAFSegmentLib.signal import Signal

# What `kaf finetune --progress jsonl` printed on a real run (shortened floats).
FINETUNE_STDOUT = [
    '{"event": "progress", "stage": "prepare", "step": 0, "total": 2, "loss": null, "elapsed": 0.002, '
    '"remaining": null, "message": "detecting keypoints on 2 slices"}',
    '{"event": "progress", "stage": "finetune", "step": 2, "total": 3, "loss": 1.5925, "elapsed": 10.1, '
    '"remaining": 3.96, "message": ""}',
    '{"event": "result", "checkpoint": "m.safetensors", "annotated_slices": [13, 21], "steps": 3, '
    '"final_loss": 1.5137, "training_seconds": 29.3, "seconds": 31.5}',
]
CPU_WARNING = "kaf: Running on the CPU: on a 2-core CPU the 'interactive' preset took 82 s."


def test_progress_lines_become_updates_and_the_result_is_kept():
    parser = ProgressParser("finetune")
    updates = [parser.read_stdout_line(line) for line in FINETUNE_STDOUT]

    assert updates[0] == ProgressUpdate("prepare", 0, 2, None, None, "detecting keypoints on 2 slices")
    assert updates[1].fraction == 2 / 3
    assert updates[1].describe() == "Fine-tuning 2/3 · loss 1.593 · about 4 s left"
    assert updates[2] is None
    outcome = parser.outcome(0)
    assert outcome.status is JobStatus.SUCCEEDED and outcome.succeeded
    assert outcome.result["checkpoint"] == "m.safetensors"
    assert "event" not in outcome.result


def test_lines_that_are_not_events_are_ignored():
    parser = ProgressParser("predict")
    for line in [
        "",
        "loading weights...",
        "{not json",
        "[1, 2]",
        '{"event": "other"}',
        '{"event": "progress"}',
    ]:
        update = parser.read_stdout_line(line)
        assert update is None or update.total == 0
    assert ProgressUpdate("predict", 1, 0).fraction == 0.0
    assert parser.outcome(0).status is JobStatus.FAILED  # exit 0 without a result line


def test_cli_warnings_are_reported_and_kept():
    parser = ProgressParser("finetune")
    assert parser.read_stderr_line(CPU_WARNING).startswith("Running on the CPU")
    assert parser.read_stderr_line("UserWarning: something from a library") is None
    parser.read_stdout_line(FINETUNE_STDOUT[-1])
    assert parser.outcome(0).warnings == (CPU_WARNING.removeprefix("kaf: "),)


def test_exit_code_2_shows_the_cli_error_paragraph():
    parser = ProgressParser("finetune")
    parser.read_stderr_line(CPU_WARNING)
    parser.read_stderr_line("kaf finetune: error: labels.nii: no annotated slice: paint at least one slice")
    outcome = parser.outcome(2)
    assert outcome.status is JobStatus.FAILED
    assert outcome.message == "labels.nii: no annotated slice: paint at least one slice"


def test_stop_and_kill_outcomes():
    assert ProgressParser("finetune").outcome(130).status is JobStatus.STOPPED
    assert ProgressParser("finetune").outcome(-9, stop_requested=True).status is JobStatus.STOPPED
    killed = ProgressParser("predict").outcome(-9)
    assert killed.status is JobStatus.FAILED and "killed (signal 9)" in killed.message


def test_a_crash_shows_the_end_of_stderr_and_a_start_failure_its_reason():
    parser = ProgressParser("predict")
    for number in range(30):
        parser.read_stderr_line(f"traceback line {number}")
    crashed = parser.outcome(1)
    assert crashed.message.startswith("kaf predict failed with exit code 1.")
    assert "traceback line 29" in crashed.message and "traceback line 5\n" not in crashed.message

    missing = ProgressParser("predict")
    missing.read_stderr_line("Could not start /no/python: No such file or directory")
    assert missing.outcome(127).message == "Could not start /no/python: No such file or directory"


def test_signal_calls_slots_in_order_and_allows_disconnecting():
    signal, calls = Signal(), []

    def once(value):
        calls.append(("once", value))
        signal.disconnect(once)

    signal.connect(once)
    signal.connect(lambda value: calls.append(("always", value)))
    signal.emit(1)
    signal.emit(2)
    assert calls == [("once", 1), ("always", 1), ("always", 2)]
