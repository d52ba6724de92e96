"""Writes docs/ROBUSTNESS.md: runs every hostile input of hostile_inputs.py through `kaf` and tabulates what
the user sees, so that the table is the real output rather than a description of it.

    python tests/robustness/write_table.py [--out docs/ROBUSTNESS.md]

tests/robustness/ is on the path when this file runs, as it is under pytest.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from hostile_inputs import (
    CASES,
    FAST_TRAINING,
    QUIET,
    Folders,
    HostileInput,
    make_finetuned,
    make_folders,
    run_kaf,
)

REPOSITORY = Path(__file__).resolve().parents[2]
REGENERATE = "python tests/robustness/write_table.py"
RUN_SUITE = "python -m pytest -q tests/robustness/test_hostile_inputs.py"


def bare_names(text: str, folders: Folders) -> str:
    """The text with the temporary folders' paths removed, so that files appear by their own names."""
    for folder in (folders.inputs, folders.outputs):
        text = text.replace(f"{folder}{os.sep}", "")
    return text


def without_common_options(arguments: list[str]) -> list[str]:
    """The arguments less the options every case ends with (the CPU, no progress bar, the shortest
    training), which the text above the table mentions once."""
    for common in (FAST_TRAINING + QUIET, QUIET):
        if arguments[-len(common) :] == common:
            return arguments[: -len(common)]
    return arguments


def row(case: HostileInput, root: Path, finetuned: Path) -> str:
    folders = make_folders(root, finetuned)
    arguments = case.arguments(folders)
    outcome = run_kaf(arguments)
    command = bare_names(" ".join(["kaf", *without_common_options(arguments)]), folders)
    message = " ".join(bare_names(outcome.stderr, folders).split())
    return f"| {case.what} | `{command}` | {outcome.code} | {message.replace('|', '&#124;')} |"


# Situations other than a bad file, each with its own tests; appended to the table as they are.
OTHER_SITUATIONS = Path(__file__).with_name("other_situations.md")


def document(rows: list[str]) -> str:
    machine = (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    )
    return "\n".join(
        [
            "# Robustness: what the user sees for each bad input",
            "",
            f"The suite runs {len(CASES)} hostile inputs through the `kaf` command, in the same process, as "
            "a user would meet them: damaged and foreign images, labels, DICOM series, NRRD files and "
            "checkpoints, checkpoints whose metadata holds absurd values, and flags out of range. For every "
            "row it checks that `kaf` exits with code 2 (a user error), that its message on stderr is one "
            "paragraph without a traceback, that the message names the bad file or flag "
            "and says what is wrong with it, that the output folder stays empty (not even a hidden partial "
            "file), that every input file is byte-for-byte unchanged, and, for the pickles, that their "
            f"payload never ran. Run the suite with `{RUN_SUITE}`; regenerate this file, by running every "
            f"case again, with `{REGENERATE}`.",
            "",
            "Each command below also had `--device cpu --progress none` (and, for `finetune`, the shortest "
            "training settings); file names stand for the full paths the messages show. The amounts of "
            f"memory in the *too large* row are those of the machine that generated the table: {machine}, "
            f"on {time.strftime('%Y-%m-%d')}.",
            "",
            "| bad input | command | exit code | what the user sees |",
            "|---|---|---|---|",
            *rows,
            "",
            OTHER_SITUATIONS.read_text(),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPOSITORY / "docs" / "ROBUSTNESS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        finetuned = make_finetuned(Path(work) / "valid")
        rows = [row(case, Path(work) / case.name, finetuned) for case in CASES]
    args.out.write_text(document(rows), encoding="utf-8")
    print(f"{args.out}: {len(rows)} cases")


if __name__ == "__main__":
    main()
