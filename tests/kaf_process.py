"""Run a real `kaf` process and interrupt it at a given step, as Ctrl+C, `kill` or Slicer's Stop would."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest


def run_until(
    command: list[str], stage_prefix: str, step: int, signum: signal.Signals, timeout: float = 120
) -> tuple[int, str]:
    """Start `command` (with --progress jsonl), send `signum` once it reports `step` of a stage whose
    name starts with `stage_prefix`; return its exit code and stderr.

    The child starts with SIGINT at its default, as from a terminal: a test run started in the
    background by a non-interactive shell (`pytest &`) ignores SIGINT, and children inherit that."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in process.stdout:
        event = json.loads(line)
        if event.get("stage", "").startswith(stage_prefix) and event.get("step", 0) >= step:
            process.send_signal(signum)
            break
    try:
        _, error = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # do not leave it training in the background
        process.communicate()
        pytest.fail(f"{command[3]} was still running {timeout:g} s after {signum.name}")
    return process.returncode, error
