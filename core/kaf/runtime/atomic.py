"""Writing files so that a crash, a Stop or a full disk never leaves a half-written output."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
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
        give_default_permissions(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise InputFileError(path, f"could not be written ({error.strerror or error})") from error
    finally:
        temporary.unlink(missing_ok=True)


def umask() -> int:
    """The process's umask, read without changing it where the system shows it (Linux); setting it to read
    it, the only portable way, briefly changes it for every thread of the process."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    shown = [line.split()[1] for line in lines if line.startswith("Umask:")]
    if shown:
        return int(shown[0], 8)
    current = os.umask(0o022)
    os.umask(current)
    return current


def give_default_permissions(path: Path) -> None:
    """Give a written file the permissions any new file of the user gets (0666 less the umask): writers
    that create private temporaries (safetensors, mkstemp) would otherwise leave it readable by its owner
    only."""
    os.chmod(path, 0o666 & ~umask())


PathArgument = str | Path | None
# Flag -> the path(s) it names: one path, or several (pretraining's --data, the files of an output folder).
PathArguments = Mapping[str, PathArgument | Sequence[PathArgument]]


def same_file(first: str | Path, second: str | Path) -> bool:
    """Whether two paths name one file: the same inode where both exist (hard and symbolic links, other
    spellings of the path), else the same resolved path."""
    first, second = Path(first), Path(second)
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


def check_outputs(outputs: PathArguments, inputs: PathArguments, force: bool) -> None:
    """Refuse, before any work, an output that is also an input or another output of the same command
    (even with --force: the input would be lost while it is still needed), and an existing output the user
    did not ask to overwrite (--force)."""
    written = list(_each_path(outputs))
    for index, (out_flag, out) in enumerate(written):
        for in_flag, source in [*_each_path(inputs), *written[:index]]:
            if same_file(out, source):
                raise InputFileError(
                    out,
                    f"is given as {in_flag} and also as the output {out_flag}; a command never writes over "
                    f"its own inputs or outputs, even with --force: choose another {out_flag}",
                )
    existing = [out for _, out in written if out.exists()]
    if existing and not force:
        raise InputFileError(
            existing[0], "already exists; choose another name or pass --force to overwrite it"
        )


def _each_path(arguments: PathArguments) -> Iterator[tuple[str, Path]]:
    for flag, value in arguments.items():
        values = value if isinstance(value, list | tuple) else [value]
        yield from ((flag, Path(path)) for path in values if path is not None)
