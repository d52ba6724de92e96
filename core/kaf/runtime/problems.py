"""Reports of many problems at once, such as every unreadable file of a folder: a message names the first
few and counts the rest, and the full list goes to a log file whose path it gives, so that a folder of a
thousand bad files makes a short message rather than a thousand lines."""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from kaf.runtime.atomic import replace_atomically
from kaf.runtime.errors import InputFileError

SHOWN = 5  # entries a message names; the rest are counted


def listed(names: Sequence[object]) -> str:
    """The first SHOWN names, comma-separated, and how many more there are: for lists that need no log
    (tensor names, the paths a user typed)."""
    shown = ", ".join(map(str, names[:SHOWN]))
    hidden = len(names) - SHOWN
    return f"{shown} and {hidden} more" if hidden > 0 else shown


def summarise(problems: Sequence[str], log_name: str, log_folder: Path | None = None) -> str:
    """The problems joined by '; ' when there are at most SHOWN; otherwise the first SHOWN, how many more,
    and the log file listing all of them, one a line: `kaf-LOG_NAME-<time>-<random>.log` in `log_folder`
    (beside the command's output) where it is a folder, else in the system's temporary folder."""
    shown = "; ".join(problems[:SHOWN])
    if len(problems) <= SHOWN:
        return shown
    more = f"{shown}; and {len(problems) - SHOWN} more"
    try:
        log = write_log(problems, log_name, log_folder)
    except InputFileError as error:
        return f"{more} (the full list of {len(problems)} could not be written: {error})"
    return f"{more} (all {len(problems)} are listed in {log})"


def write_log(lines: Sequence[str], name: str, folder: Path | None = None) -> Path:
    """Write `lines` to a new log file, atomically, and return its path."""
    if folder is None or not Path(folder).is_dir():
        folder = Path(tempfile.gettempdir())
    path = Path(folder) / f"kaf-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.log"
    with replace_atomically(path) as temporary:
        temporary.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path
