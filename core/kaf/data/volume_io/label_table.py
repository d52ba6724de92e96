"""Class names and colours beside a segmentation: a colour table in 3D Slicer's CSV format.

NIfTI has no place for the names of its label values, so a segmentation `seg.nii.gz` gets `seg.csv`
beside it, with the columns LabelValue, Name, Color_R, Color_G, Color_B, Color_A (integers 0-255, one row
per class, background 0 left out). Slicer loads it as a colour table; napari and Slicer's module read it
to name and colour the classes. Every front-end colours class k with `PALETTE`, so a class looks the same
in napari, in Slicer and in the file. Slicer's CSV reader cannot read a value holding a double quote, so
names with one (or with a line break) are refused where they enter (`check_label_names`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kaf.runtime.atomic import replace_atomically
from kaf.runtime.errors import InputDataError, InputFileError

COLUMNS = ("LabelValue", "Name", "Color_R", "Color_G", "Color_B", "Color_A")
SEGMENTATION_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd")
# Sasha Trubetskoy's 20 distinct colours (RGB 0-255), for classes 1, 2, ... (background is transparent).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)
FORBIDDEN = {'"': "a double quote", "\n": "a line break", "\r": "a line break"}


def label_color(value: int) -> tuple[int, int, int]:
    """The colour (RGB 0-255) of label `value` >= 1; the palette repeats after its 20 colours."""
    return PALETTE[(value - 1) % len(PALETTE)]


def check_label_names(names: Sequence[str]) -> list[str]:
    """The names as a list, or InputDataError naming the first one a colour table cannot hold."""
    for name in names:
        for character, what in FORBIDDEN.items():
            if character in name:
                raise InputDataError(
                    f"The class name {name!r} contains {what}, which the colour table saved beside the "
                    "segmentation (3D Slicer's CSV format) cannot hold: rename that class."
                )
    return list(names)


def label_table_path(segmentation: str | Path) -> Path:
    """`seg.csv` for `seg.nii.gz`, `seg.nii`, `seg.nrrd` or `seg.seg.nrrd`."""
    path = Path(segmentation)
    lowered = path.name.lower()
    suffix = next((s for s in SEGMENTATION_SUFFIXES if lowered.endswith(s)), path.suffix)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f"{stem}.csv")


def write_label_table(path: str | Path, names: Sequence[str]) -> Path:
    """Write the names of labels 1.. (`names` holds background first) with their palette colours."""
    path = Path(path)
    names = check_label_names(names)
    with replace_atomically(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        for value, name in enumerate(names[1:], start=1):
            writer.writerow([value, name, *label_color(value), 255])
    return path


@dataclass(frozen=True)
class LabelTable:
    """What a colour table says: the name and colour (RGBA 0-255) of each label value it lists."""

    names: dict[int, str]
    colors: dict[int, tuple[int, int, int, int]]

    def label_names(self) -> list[str]:
        """Names of labels 0..the highest listed, background first; unlisted values are numbered."""
        highest = max(self.names, default=0)
        numbered = ["background", *(f"label {value}" for value in range(1, highest + 1))]
        return [self.names.get(value) or name for value, name in enumerate(numbered)]


def read_label_table(path: str | Path) -> LabelTable | None:
    """The table at `path`; None when there is none; InputFileError when it is not a colour table."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            rows, header = list(reader), reader.fieldnames
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputFileError(path, f"is not a readable colour table ({error})") from error
    missing = [column for column in COLUMNS[:5] if column not in (header or ())]
    if missing:
        raise InputFileError(
            path, f"is not a colour table: it lacks the column(s) {', '.join(missing)} ({', '.join(COLUMNS)})"
        )
    names: dict[int, str] = {}
    colors: dict[int, tuple[int, int, int, int]] = {}
    for line, row in enumerate(rows, start=2):
        value = _whole_number(path, line, "LabelValue", row["LabelValue"], 0, None)
        if value in names:
            raise InputFileError(path, f"line {line}: label value {value} is listed twice")
        names[value] = (row["Name"] or "").strip()
        rgba = [row[c] for c in COLUMNS[2:5]] + [row.get("Color_A") or "255"]
        colors[value] = tuple(  # type: ignore[assignment]
            _whole_number(path, line, column, text, 0, 255)
            for column, text in zip(COLUMNS[2:], rgba, strict=True)
        )
    return LabelTable(names, colors)


def _whole_number(path: Path, line: int, column: str, text: str | None, low: int, high: int | None) -> int:
    try:
        number = int((text or "").strip())
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        allowed = f"{low} to {high}" if high is not None else f"{low} or more"
        raise InputFileError(path, f"line {line}: {column} is {text!r}, not a whole number {allowed}")
    return number
