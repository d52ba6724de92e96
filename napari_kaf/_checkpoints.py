"""The checkpoint menu: the shipped default (kaf.models.default_weights), random initialisation, or a file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kaf.models.default_weights import DEFAULT_KEYWORD, RANDOM_KEYWORD, shipped_checkpoint
from kaf.runtime.errors import CheckpointError

FILE_CHOICE = "file"


@dataclass(frozen=True)
class ShippedCheckpoint:
    key: str
    label: str
    shipped: bool  # True: the package's default checkpoint; False: random initialisation


SHIPPED_CHECKPOINTS: dict[str, ShippedCheckpoint] = {
    DEFAULT_KEYWORD: ShippedCheckpoint(
        key=DEFAULT_KEYWORD, label="Default: GCL-pretrained (brain MRI, shipped)", shipped=True
    ),
    RANDOM_KEYWORD: ShippedCheckpoint(key=RANDOM_KEYWORD, label="Random initialisation", shipped=False),
}
DEFAULT_CHOICE = DEFAULT_KEYWORD


def menu_entries() -> list[tuple[str, str]]:
    """(key, label) pairs: the shipped checkpoints, then "a checkpoint file"."""
    return [(c.key, c.label) for c in SHIPPED_CHECKPOINTS.values()] + [(FILE_CHOICE, "Checkpoint file...")]


def checkpoint_path(choice: str, file_path: str = "") -> Path | None:
    """The file to initialise from, or None for random initialisation."""
    if choice == FILE_CHOICE:
        if not file_path.strip():
            raise CheckpointError(
                "'Checkpoint file' is chosen but no file is given: pick a .safetensors file."
            )
        return Path(file_path.strip()).expanduser()
    shipped = SHIPPED_CHECKPOINTS.get(choice)
    if shipped is None:
        raise CheckpointError(
            f"unknown checkpoint '{choice}'; choose one of {', '.join(SHIPPED_CHECKPOINTS)}"
        )
    return shipped_checkpoint() if shipped.shipped else None
