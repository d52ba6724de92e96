"""Writing files so that a crash, a Stop or a full disk never leaves a half-written output."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kaf.runtime.errors import InputFileError

COMPOUND_SUFFIXES = (".nii.gz", ".seg.nrrd")


def full_suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in COMPOUND_SUFFIXES if name.endswith(s)), path.suffix)


@contextmanager
def replace_atomically(path: str | Path) -> Iterator[Path]:
    """Yields a hidden temporary path beside `path` (same suffix, so writers pick the format); when the
    block completes it is renamed onto `path`, otherwise it is removed and `path` keeps what it had."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputFileError(path, "cannot be written because its folder does not exist")
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    temporary = path.with_name(f".{stem}.{secrets.token_hex(4)}.partial{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        raise InputFileError(path, f"could not be written ({error.strerror or error})") from error
    finally:
        temporary.unlink(missing_ok=True)


def refuse_overwrite(paths: list[str | Path | None], force: bool) -> None:
    """Outputs never replace a user's existing file unless they asked for it (--force)."""
    existing = [str(p) for p in paths if p is not None and Path(p).exists()]
    if existing and not force:
        raise InputFileError(
            existing[0], "already exists; choose another name or pass --force to overwrite it"
        )
