"""The ranges of every number a user or a file can set, in one place, and the checks that enforce them.

A flag of the `kaf` command (argparse's `type=`), a job's settings and a field of a checkpoint's metadata
read the same `Bounds`, so a value refused on the command line is refused in a file too, in the same
words. The ranges are wide: they stop absurd values (a typo, a damaged or hand-edited file) before they
reach a division or an allocation, not unusual settings. Memory is checked apart, from estimates, once
the values are known to be sane (`kaf.models.memory_estimate`, `kaf.models.checkpoints`).
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from kaf.runtime.errors import InputDataError


@dataclass(frozen=True)
class Bounds:
    """The values a number may take: whole or real, always finite, between `low` and `high` (None: no
    limit). `above_low` excludes `low` itself; `why`, when given, ends the message."""

    low: float | None = None
    high: float | None = None
    whole: bool = True
    above_low: bool = False
    why: str = ""

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a finite number"
        low = None if self.low is None else _number(self.low)
        high = None if self.high is None else _number(self.high)
        if low is not None and high is not None:
            if self.above_low:
                return f"{kind} above {low} and at most {high}"
            return f"{kind} from {low} to {high}"
        if low is not None:
            return f"{kind} above {low}" if self.above_low else f"{kind}, at least {low}"
        return kind if high is None else f"{kind}, at most {high}"

    def problem(self, value: object) -> str | None:
        """What is wrong with `value`, or None when it lies in the range."""
        expected = numbers.Integral if self.whole else numbers.Real
        reason = f" ({self.why})" if self.why else ""
        if isinstance(value, bool) or not isinstance(value, expected) or not _finite(value):
            return f"must be {self.describe()}, got {value!r}{reason}"
        too_low = self.low is not None and (value <= self.low if self.above_low else value < self.low)
        if too_low or (self.high is not None and value > self.high):
            return f"must be {self.describe()}, got {_number(value)}{reason}"
        return None

    def check(self, value: object, name: str) -> int | float:
        """`value` as an int or float; InputDataError naming `name` (a setting, a flag or a field) when
        it is out of range or not a number."""
        problem = self.problem(value)
        if problem:
            raise InputDataError(f"{name} {problem}")
        return int(value) if self.whole else float(value)

    def check_optional(self, value: object, name: str) -> int | float | None:
        return None if value is None else self.check(value, name)

    def flag(self) -> Callable[[str], int | float]:
        """An argparse `type=`: the text as a number in range; argparse names the flag in its message."""

        def parse(text: str) -> int | float:
            try:
                value = int(text) if self.whole else float(text)
            except ValueError:
                value = text
            problem = self.problem(value)
            if problem:
                raise argparse.ArgumentTypeError(problem)
            return value

        parse.__name__ = "whole number" if self.whole else "number"
        return parse


def _finite(value: numbers.Real) -> bool:
    # An int of any size is finite; math.isfinite would overflow converting a huge one to float.
    return isinstance(value, numbers.Integral) or math.isfinite(value)


def _number(value: float) -> str:
    """Thousands separated for large whole numbers (10,000,000), the shortest exact form otherwise."""
    if isinstance(value, numbers.Integral) and abs(value) >= 10**15:
        return f"{value:.3e}" if abs(value) < 10**300 else f"a number of {len(str(abs(value)))} digits"
    if isinstance(value, numbers.Integral) or (value.is_integer() and abs(value) < 1e15):
        return f"{int(value):,}" if abs(value) >= 10_000 else str(int(value))
    return f"{value:g}"


# --- settings a user chooses (command-line flags and the GUIs' fields) -----------------------------------

STEPS = Bounds(1, 10_000_000)  # optimiser steps, also between pretraining saves
EPOCHS = Bounds(0, 100_000, whole=False, above_low=True)
# A batch too large for the device is refused by the memory estimate (kaf.models.memory_estimate).
BATCH_SIZE = Bounds(1, 1_000_000)
# Training crops and views; a multiple of the UNet's SIDE_MULTIPLE as well, which the jobs check.
TRAINING_SIDE = Bounds(16, 4096)
# The longest slice side the model sees (0: the native resolution); a model's input_size too.
MAX_SIDE = Bounds(0, 16_384)
LEARNING_RATE = Bounds(0, 10, whole=False, above_low=True)
# The KAF layers' fine-tuning rate as a multiple of the rest of the model's.
KAF_LEARNING_RATE_SCALE = Bounds(0, 100, whole=False, above_low=True)
TIME_BUDGET = Bounds(0, 10_000_000, whole=False, above_low=True)  # seconds (about 115 days)
SEED = Bounds(0, 2**32 - 1, why="NumPy's and PyTorch's seeds are 32-bit unsigned numbers")
INDEX = Bounds(0, 2**31 - 1)  # a slice or a keypoint; the job checks the upper end against the image

# --- a model's architecture (ModelConfig, stored in every checkpoint) -------------------------------------

BASE_WIDTH = Bounds(1, 256)
TOKEN_DIM = Bounds(1, 4096)
ATTENTION_HEADS = Bounds(1, 64)
ATTENTION_BLOCKS = Bounds(0, 64)
IN_CHANNELS = Bounds(1, 64)
CLASSES = Bounds(
    2,
    65_536,
    why="a model needs at least 2 classes, background and one structure, and a label file holds 65,536",
)
# Attention memory grows with the square of the keypoints: 4096 is 8 times the paper's 512.
MAX_KEYPOINTS = Bounds(1, 4096)

# --- the rest of a checkpoint's metadata ------------------------------------------------------------------

SLICE_AXIS = Bounds(0, 2)
STEPS_DONE = Bounds(0, None)
FORMAT_VERSION = Bounds(1, None)
# The in-plane resize factor inference replays: KAF Segment only ever shrinks slices (scale_for_max_side).
SCALE = Bounds(0, 1, whole=False, above_low=True, why="slices are only ever shrunk")
INTENSITY = Bounds(whole=False)  # a normalisation's mean and clip window
INTENSITY_STD = Bounds(1e-6, None, whole=False)
